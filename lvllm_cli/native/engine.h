// The lk_moe engine: NUMA-split expert weights and the fused-experts forward.
//
// Semantics are vLLM's fused_experts: w13 [E, 2I, H] (gate rows, then up
// rows), w2 [E, H, I];
//   out[m] = sum_j topk_w[m,j] * w2[e] (silu(gate_e x_m) * up_e x_m),  e = topk_ids[m,j]
// with fp32 accumulation.  Each expert is split along I across the engine's
// node groups (no replication): a group holds its I-slice of every expert in
// its own node's memory and yields a partial [M, H] that is summed at the end.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "numa_mem.h"
#include "pool.h"

namespace lk {

class MoELayer;

struct EngineConfig {
  std::vector<NodeGroup> groups;
  int spin_us = 2000;
  Isa isa_cap = Isa::amx;
};

struct ForwardArgs {
  const void* x = nullptr;
  DType x_type = DType::bf16;
  size_t ldx = 0;  // row stride of x, elements
  const void* topk_ids = nullptr;
  bool ids_int64 = false;
  const float* topk_weights = nullptr;
  int M = 0, k = 0;
  void* out = nullptr;
  DType out_type = DType::bf16;
  size_t ldo = 0;  // row stride of out, elements
};

struct EngineStats {
  uint64_t calls = 0;
  uint64_t tokens = 0;
  uint64_t assignments = 0;  // token x expert pairs computed
  uint64_t invalid_ids = 0;  // expert ids out of range (skipped)
  uint64_t busy_ns = 0;      // submit -> completion
  // Sums over calls, ns: wall time of each phase (seen by worker 0) and the
  // slowest / average worker's own work in the two expert phases (their gap
  // is load imbalance).
  uint64_t route_ns = 0, gather_ns = 0, gateup_ns = 0, down_ns = 0, reduce_ns = 0;
  uint64_t gateup_work_max_ns = 0, gateup_work_mean_ns = 0, down_work_max_ns = 0, down_work_mean_ns = 0;
  // Sums over calls, ns: submit -> the first / the last worker starting the
  // job (wake-up latency; a late last worker is a descheduled one).
  uint64_t wake_first_ns = 0, wake_last_ns = 0;
};

class Engine {
 public:
  explicit Engine(EngineConfig cfg);
  ~Engine();

  Pool& pool() { return *pool_; }
  const EngineConfig& config() const { return cfg_; }
  int num_groups() const { return pool_->num_groups(); }

  // Asynchronous forward: returns once the job is posted.  `args` pointers
  // must stay valid until wait() returns.  Invalid expert ids are skipped
  // and counted (the asynchronous path cannot raise).
  // `done_flag`: also store 1 there when the job is done (Pool::submit).
  void submit(MoELayer* layer, const ForwardArgs& args, uint32_t* done_flag = nullptr);
  void wait();
  // Whether a call of M tokens x k fits the scratch already reserved, i.e.
  // submit() would not allocate (a submit from a worker thread must not).
  bool fits_without_growing(const MoELayer& layer, int M, int k);
  bool idle() const { return pool_->done(); }
  // When the last job waited for finished (steady clock, ns): the host
  // functions' timing compares it with when the stream reached the wait.
  int64_t last_end_ns() const { return last_end_ns_.load(std::memory_order_relaxed); }

  // Make room for `tokens` x `k` so later calls do not allocate.
  void reserve(int tokens, int k, const MoELayer& layer);

  EngineStats stats() const;
  void reset_stats();

  // Runs `fn(i)` for i in [0, n) spread over all workers; blocks.
  void parallel_for(size_t n, void (*fn)(void* ctx, size_t begin, size_t end, const WorkerInfo& w), void* ctx);

  struct Job;

 private:
  friend class MoELayer;
  static void run_job(void* ctx, const WorkerInfo& w);

  EngineConfig cfg_;
  std::unique_ptr<Pool> pool_;
  std::unique_ptr<Job> job_;
  std::mutex submit_mu_;
  std::atomic<uint64_t> calls_{0}, tokens_{0}, assignments_{0}, invalid_{0}, busy_ns_{0};
  std::atomic<uint64_t> ph_[11] = {};
  std::atomic<int64_t> last_end_ns_{0};
};

enum class Part : int { gate = 0, up = 1, down = 2, gate_up = 3 };

struct Slice {
  int i0 = 0, in = 0, inp = 0;  // I range [i0, i0+in), padded to inp
  NodeBuffer w13, w2;
};

struct WeightFormat {
  WKind kind = WKind::bf16;
  int group = 0;  // quantized: scale group along K (0: one group per row, "per channel")
  // int4 decode with int8 activations (16-value blocks) where the CPU has an
  // int8 dot product: the unpacking, not memory, bounds the bf16-activation
  // kernel, and the int8 rounding is small next to the int4 weights' own.
  bool int8_activations = true;
};

class MoELayer {
 public:
  MoELayer(std::shared_ptr<Engine> engine, int E, int H, int I, WeightFormat wf);
  MoELayer(const MoELayer&) = delete;
  MoELayer& operator=(const MoELayer&) = delete;

  int E() const { return E_; }
  int H() const { return H_; }
  int I() const { return I_; }
  int Hp() const { return Hp_; }
  // Unquantized element type (bf16/f16); quantized layers report bf16 (their dequantized panels).
  DType weight_type() const { return wf_.kind == WKind::f16 ? DType::f16 : DType::bf16; }
  const WeightFormat& format() const { return wf_; }
  bool quantized() const { return is_quantized(wf_.kind); }
  int group_for(int K) const { return wf_.group > 0 ? wf_.group : K; }
  // Whether int4 decode runs on int8 activations (asked for and available).
  bool int8_activations() const { return int8_act_; }
  size_t panel_bytes(int K) const;  // one panel of 32 rows x K, scales included
  // out-of-cache bytes of expert e's weights in one slice; for the benchmark's bandwidth figures
  size_t expert_bytes() const;
  const KernelSet* kernels() const { return ks_; }
  Engine& engine() const { return *engine_; }
  const std::vector<Slice>& slices() const { return slices_; }
  size_t packed_bytes() const;

  // Pack one expert's part from a row-major source (rows x cols, row stride
  // `ld` elements): gate/up [I, H], gate_up [2I, H], down [H, I].  Runs on the
  // engine's workers.  Throws std::invalid_argument on bad input.
  void load(int e, Part part, const void* src, DType src_type, size_t ld);
  // Random weights (uniform in [-scale, scale]) for every expert part not
  // loaded yet; padding stays zero.  Used for --load-format dummy.
  void fill_random(uint64_t seed, float scale);
  // Quantized parts: q [rows, cols] (int4: int8 values in [-8, 7]; fp8: e4m3
  // bytes), scales [rows, ceil(cols / group)] float32.  Same parts as load().
  void load_quantized(int e, Part part, const void* q, size_t ldq, const float* scales, size_t lds);
  // Bit mask per expert: 1 gate, 2 up, 4 down.
  const std::vector<uint8_t>& loaded() const { return loaded_; }
  bool complete() const;

  // Synchronous forward (validates ids first; throws on bad input).
  void forward(const ForwardArgs& args);

 private:
  friend class Engine;
  std::shared_ptr<Engine> engine_;
  int E_, H_, I_, Hp_;
  WeightFormat wf_;
  const KernelSet* ks_;
  bool int8_act_ = false;
  std::vector<Slice> slices_;
  std::vector<uint8_t> loaded_;
};

}  // namespace lk
