#include "bench_native.h"

#include <algorithm>
#include <chrono>

#include <pthread.h>
#include <sched.h>

namespace lk {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Cheap reproducible fill data.
uint64_t xorshift(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

struct BwCtx {
  Engine* eng;
  std::vector<NodeBuffer> bufs;  // one per group
  bool fill;
  std::vector<uint64_t> sink;    // per worker, defeats dead-code elimination
};

void bw_work(void* vctx, size_t b, size_t e, const WorkerInfo& w) {
  BwCtx& c = *static_cast<BwCtx*>(vctx);
  Pool& P = c.eng->pool();
  const NodeBuffer& buf = c.bufs[w.group];
  const size_t words = buf.size() / 8, T = P.group_size(w.group);
  const size_t lo = words * w.lid / T / 8 * 8, hi = words * (w.lid + 1) / T / 8 * 8;
  uint64_t* p = buf.as<uint64_t>();
  if (c.fill) {
    uint64_t s = 0x9e3779b97f4a7c15ull * (w.gid + 1);
    for (size_t i = lo; i < hi; ++i) p[i] = xorshift(s);
    return;
  }
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
  for (size_t i = lo; i < hi; i += 8) {
    a0 ^= p[i]; a1 ^= p[i + 1]; a2 ^= p[i + 2]; a3 ^= p[i + 3];
    a4 ^= p[i + 4]; a5 ^= p[i + 5]; a6 ^= p[i + 6]; a7 ^= p[i + 7];
  }
  c.sink[w.gid] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7;
}

}  // namespace

double read_bandwidth(Engine& eng, size_t bytes, int reps) {
  Pool& P = eng.pool();
  BwCtx c{&eng, {}, true, std::vector<uint64_t>(P.total())};
  for (int g = 0; g < P.num_groups(); ++g) {
    size_t share = bytes / P.num_groups() / 4096 * 4096;
    c.bufs.emplace_back(std::max<size_t>(share, 4096), P.group_numa_node(g));
  }
  size_t total = 0;
  for (auto& b : c.bufs) total += b.size();
  eng.parallel_for(P.total(), &bw_work, &c);  // one item per worker: each fills its own part
  c.fill = false;
  std::vector<double> gbps;
  for (int r = 0; r < reps + 1; ++r) {
    double t0 = now_s();
    eng.parallel_for(P.total(), &bw_work, &c);
    double dt = now_s() - t0;
    if (r > 0) gbps.push_back(double(total) / dt / 1e9);
  }
  std::sort(gbps.begin(), gbps.end());
  return gbps[gbps.size() / 2];
}

std::vector<double> time_layers(const std::vector<MoELayer*>& layers, const ForwardArgs& a, int steps, int passes) {
  // Time like the plugin runs: the submitting thread on a core of its own (restored after).
  cpu_set_t saved;
  const bool have_saved = pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved) == 0;
  layers[0]->engine().pool().keep_caller_off_workers();
  std::vector<double> ns;
  ns.reserve(layers.size() * passes);
  const size_t per = size_t(a.M) * a.k, isz = a.ids_int64 ? 8 : 4;
  size_t call = 0;
  for (int p = 0; p < passes; ++p)
    for (MoELayer* l : layers) {
      ForwardArgs c = a;
      const size_t s = call++ % size_t(steps);
      c.topk_ids = static_cast<const char*>(a.topk_ids) + s * per * isz;
      c.topk_weights = a.topk_weights + s * per;
      double t0 = now_s();
      l->engine().submit(l, c);
      l->engine().wait();
      ns.push_back((now_s() - t0) * 1e9);
    }
  if (have_saved) pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
  return ns;
}

namespace {

// One panel product's operands for n tokens: activations with 32 slack rows
// (padded AMX tiles read them) in the family's format, and room for y.
struct KernelOperands {
  size_t ld;
  std::vector<char> x;
  std::vector<float> y;
  KernelOperands(const KernelSet& ks, int n, size_t ld_) : ld(ld_), x((size_t(n) + 32) * ld_ * dtype_size(ks.act)), y((size_t(n) + 32) * 32) {
    for (size_t i = 0; i < (size_t(n) + 32) * ld; ++i) store_from_f32(x.data(), i, ks.act, float(int(i % 13) - 6) * 0.1f);
  }
};

// ns per call of `call`, after one untimed call (warms the caches it measures in).
template <class F>
double ns_per_call(int reps, F&& call) {
  call();
  double t0 = now_s();
  for (int r = 0; r < reps; ++r) call();
  return (now_s() - t0) * 1e9 / reps;
}

}  // namespace

double kernel_ns(Isa isa, DType weights, int n, int K, int reps, int ld_pad) {
  const KernelSet* ks = kernel_set(isa, weights);
  if (!ks || !isa_supported(isa)) return -1.0;
  KernelOperands o(*ks, n, size_t(K) + size_t(ld_pad));
  std::vector<uint16_t> panel(panel_elems(K));
  uint64_t s = 88172645463325252ull;
  for (auto& v : panel) v = f32_to_bf16(float(int(xorshift(s) % 2001) - 1000) * 1e-4f);
  return ns_per_call(reps, [&] { ks->panel_dot(o.x.data(), o.ld, n, panel.data(), K, o.y.data()); });
}

double qkernel_ns(Isa isa, WKind kind, bool int8, int n, int K, int G, int reps) {
  const KernelSet* ks = kernel_set(isa, DType::bf16);
  if (!ks || !isa_supported(isa)) return -1.0;
  auto dot = kind == WKind::int4 ? ks->q4_dot : ks->f8_dot;
  if (!dot || (int8 && (kind != WKind::int4 || !ks->q4_dot_q8))) return -1.0;
  KernelOperands o(*ks, n, size_t(K) + 32);
  std::vector<uint8_t> panel(qpanel_bytes(kind, K, G));
  uint64_t s = 88172645463325252ull;
  // Random codes (fp8: without the NaN codes 0x7f / 0xff); scales fp16 0.01, so the arithmetic stays ordinary.
  for (size_t i = 0; i < qpanel_data_bytes(kind, K); ++i) panel[i] = uint8_t(xorshift(s)) & (kind == WKind::fp8 ? 0xbf : 0xff);
  uint16_t* sc = reinterpret_cast<uint16_t*>(panel.data() + qpanel_data_bytes(kind, K));
  for (size_t i = 0; i < size_t(K / G) * 32; ++i) sc[i] = 0x211f;
  if (int8) {
    const size_t ldq = q8_row_bytes(size_t(K)) + 64;
    std::vector<uint8_t> xq(size_t(n) * ldq);
    for (int t = 0; t < n; ++t) ks->quantize_q8(o.x.data() + size_t(t) * o.ld * dtype_size(ks->act), K, xq.data() + t * ldq);
    return ns_per_call(reps, [&] { ks->q4_dot_q8(xq.data(), ldq, n, panel.data(), K, G, o.y.data()); });
  }
  return ns_per_call(reps, [&] { dot(o.x.data(), o.ld, n, panel.data(), K, G, o.y.data()); });
}

}  // namespace lk
