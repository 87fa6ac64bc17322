#include "hostfn.h"
#include "raw_args.h"

#include <dlfcn.h>

#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>

namespace nb = nanobind;
using namespace nb::literals;

namespace lk {
namespace {

// Sums written by CUDA's callback thread (or the stand-in executor's) and
// worker 0, read by the metrics thread; see hostfn.h.
enum TimeField { kCalls, kGaps, kGapNs, kSubmitNs, kToWaitNs, kWaitNs, kDoneToReturnNs, kDoorbellWorker, kDoorbellBackstop, kTimeFields };
constexpr const char* kTimeFieldNames[kTimeFields] = {
    "calls", "gaps", "gap_ns", "submit_ns", "to_wait_ns", "wait_ns", "done_to_return_ns", "doorbell_worker", "doorbell_backstop"};
std::atomic<uint64_t> g_sums[kTimeFields];
std::atomic<int64_t> g_last_return_ns{0};
constexpr int64_t kIdleGapNs = 50'000'000;

void add(TimeField f, int64_t v) { g_sums[f].fetch_add(uint64_t(std::max<int64_t>(v, 0)), std::memory_order_relaxed); }

void record(const HostCall& c, int64_t wait_entered, int64_t wait_returned, int64_t engine_done) {
  const int64_t prev = g_last_return_ns.exchange(wait_returned, std::memory_order_relaxed);
  if (c.args.M != 1) return;
  add(kCalls, 1);
  const int64_t gap = c.submit_entered_ns - prev;
  if (prev > 0 && gap >= 0 && gap < kIdleGapNs) {
    add(kGaps, 1);
    add(kGapNs, gap);
  }
  add(kSubmitNs, c.submit_returned_ns - c.submit_entered_ns);
  add(kToWaitNs, wait_entered - c.submit_returned_ns);
  add(kWaitNs, wait_returned - wait_entered);
  add(kDoneToReturnNs, wait_returned - std::max(engine_done, wait_entered));
}

// CUDA's callback thread submits and then waits: keep it off the workers' cores (once per thread).
void place_callback_thread(Engine& engine) {
  static thread_local bool placed = false;
  if (!placed) {
    engine.pool().keep_caller_off_workers();
    placed = true;
  }
}

// Doorbell calls by id (the value the stream writes to the bell).  Ids are
// handed out at capture time and looked up by the ringing worker without a lock.
constexpr uint32_t kMaxDoorbellCalls = 1u << 16;
std::atomic<HostCall*> g_doorbell_calls[kMaxDoorbellCalls];
std::mutex g_doorbell_mu;

uint32_t register_doorbell_call(HostCall* c) {
  std::lock_guard<std::mutex> lock(g_doorbell_mu);
  for (uint32_t id = 1; id < kMaxDoorbellCalls; ++id) {
    HostCall* expected = nullptr;
    if (g_doorbell_calls[id].compare_exchange_strong(expected, c)) return id;
  }
  throw std::runtime_error("more than 65535 captured CPU-expert calls; use LVLLM_STREAM_SYNC=hostfn");
}

// Claim the bell (it still holds c's id) and post c's job; false if someone else did.
bool claim_and_submit(HostCall* c) {
  uint32_t expected = c->id;
  if (!__atomic_compare_exchange_n(c->bell, &expected, 0u, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return false;
  c->submit_entered_ns = now_ns();
  c->layer->engine().submit(c->layer, c->args, c->done);
  c->submit_returned_ns = now_ns();
  return true;
}

// Worker 0 saw `id` on the bell while spinning.  It must not allocate or wait
// for itself, so a call that needs more scratch is left to the backstop.
void ring(void*, uint32_t id) {
  HostCall* c = id < kMaxDoorbellCalls ? g_doorbell_calls[id].load(std::memory_order_acquire) : nullptr;
  if (!c || !c->layer->engine().fits_without_growing(*c->layer, c->args.M, c->args.k)) return;
  if (claim_and_submit(c)) add(kDoorbellWorker, 1);
}

}  // namespace

}  // namespace lk

// Writes the steady clock (ns) to *(int64_t*)slot: for measuring how late host functions run.
extern "C" void lk_hostfn_stamp(void* slot) { *static_cast<int64_t*>(slot) = lk::now_ns(); }

// Runs right after the stream rang the bell: posts the job if worker 0 was
// not spinning (asleep after LK_SPIN_US idle) and so did not claim it.
extern "C" void lk_hostfn_backstop(void* p) {
  lk::HostCall* c = static_cast<lk::HostCall*>(p);
  lk::place_callback_thread(c->layer->engine());
  if (lk::claim_and_submit(c)) lk::add(lk::kDoorbellBackstop, 1);
}

extern "C" void lk_hostfn_submit(void* p) {
  lk::HostCall* c = static_cast<lk::HostCall*>(p);
  c->submit_entered_ns = lk::now_ns();
  lk::place_callback_thread(c->layer->engine());
  c->layer->engine().submit(c->layer, c->args);
  c->submit_returned_ns = lk::now_ns();
}

extern "C" void lk_hostfn_wait(void* p) {
  lk::HostCall* c = static_cast<lk::HostCall*>(p);
  const int64_t entered = lk::now_ns();
  lk::Engine& engine = c->layer->engine();
  engine.wait();
  lk::record(*c, entered, lk::now_ns(), engine.last_end_ns());
  if (c->owned_by_stream) delete c;
}

namespace lk {
namespace {

using CUresult = int;
using CUhostFn = void (*)(void*);
using LaunchHostFn = CUresult (*)(void* stream, CUhostFn fn, void* user);
using GetErrorString = CUresult (*)(CUresult, const char**);

using CUdeviceptr = unsigned long long;
using StreamValue32 = CUresult (*)(void* stream, CUdeviceptr addr, uint32_t value, unsigned flags);
using HostDevicePointer = CUresult (*)(CUdeviceptr* dptr, void* p, unsigned flags);
constexpr unsigned kWaitValueEq = 0x1;  // CU_STREAM_WAIT_VALUE_EQ

struct CudaDriver {
  LaunchHostFn launch = nullptr;
  GetErrorString error_string = nullptr;
  StreamValue32 write_value = nullptr, wait_value = nullptr;
  HostDevicePointer device_pointer = nullptr;
  std::string problem;
};

template <class F>
F symbol(void* h, const char* v2, const char* v1) {
  void* s = dlsym(h, v2);
  return reinterpret_cast<F>(s ? s : dlsym(h, v1));
}

const CudaDriver& driver() {
  static CudaDriver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      d.problem = std::string("cannot open the CUDA driver (libcuda.so.1): ") + dlerror();
      return;
    }
    d.launch = reinterpret_cast<LaunchHostFn>(dlsym(h, "cuLaunchHostFunc"));
    d.error_string = reinterpret_cast<GetErrorString>(dlsym(h, "cuGetErrorString"));
    d.write_value = symbol<StreamValue32>(h, "cuStreamWriteValue32_v2", "cuStreamWriteValue32");
    d.wait_value = symbol<StreamValue32>(h, "cuStreamWaitValue32_v2", "cuStreamWaitValue32");
    d.device_pointer = symbol<HostDevicePointer>(h, "cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer");
    if (!d.launch) d.problem = "the CUDA driver has no cuLaunchHostFunc (driver older than CUDA 10)";
  });
  return d;
}

void check(CUresult r, const char* what) {
  if (r == 0) return;
  const char* s = nullptr;
  if (driver().error_string) driver().error_string(r, &s);
  throw std::runtime_error(std::string(what) + " failed: " + (s ? s : "error ") + " (" + std::to_string(r) + ")");
}

void enqueue(uintptr_t stream, uintptr_t call, CUhostFn fn) {
  const CudaDriver& d = driver();
  if (!d.launch) throw std::runtime_error(d.problem);
  check(d.launch(reinterpret_cast<void*>(stream), fn, reinterpret_cast<void*>(call)), "cuLaunchHostFunc");
}

const CudaDriver& memops_driver() {
  const CudaDriver& d = driver();
  if (!d.launch) throw std::runtime_error(d.problem);
  if (!d.write_value || !d.wait_value || !d.device_pointer)
    throw std::runtime_error("the CUDA driver has no stream memory operations (cuStreamWriteValue32/cuStreamWaitValue32)");
  return d;
}

}  // namespace

void bind_hostfn(nb::module_& m) {
  m.def(
      "make_host_call",
      [](MoELayer& l, uintptr_t x, const std::string& xt, uintptr_t ids, bool ids64, uintptr_t tw, int M, int k, uintptr_t out,
         const std::string& ot, bool owned_by_stream, uintptr_t bell, uintptr_t done) {
        ForwardArgs args = raw_forward_args(l, x, xt, 0, ids, ids64, tw, M, k, out, ot, 0);
        if ((bell == 0) != (done == 0)) throw nb::value_error("a doorbell call needs both the bell and the done flag");
        if (bell && owned_by_stream) throw nb::value_error("doorbell calls are kept (captured), not owned by the stream");
        HostCall* c = new HostCall();
        c->layer = &l;
        c->args = args;
        c->owned_by_stream = owned_by_stream;
        if (bell) {
          c->bell = reinterpret_cast<uint32_t*>(bell);
          c->done = reinterpret_cast<uint32_t*>(done);
          try {
            c->id = register_doorbell_call(c);
          } catch (...) {
            delete c;
            throw;
          }
          l.engine().pool().watch_doorbell(c->bell, &ring, nullptr);
        }
        return reinterpret_cast<uintptr_t>(c);
      },
      "layer"_a, "x"_a, "x_dtype"_a, "topk_ids"_a, "ids_int64"_a, "topk_weights"_a, "tokens"_a, "k"_a, "out"_a,
      "out_dtype"_a, "owned_by_stream"_a, "bell"_a = 0, "done"_a = 0,
      "A call descriptor on pinned buffers (contiguous [tokens, hidden] x/out, [tokens, k] ids/weights).  The layer must "
      "outlive it.  With `bell`/`done` (pinned uint32 words) it is a doorbell call (see hostfn.h).");
  m.def("host_call_id", [](uintptr_t c) { return reinterpret_cast<HostCall*>(c)->id; }, "call"_a,
        "The value the stream writes to the bell for this call (0: not a doorbell call).");
  m.def("free_host_call", [](uintptr_t p) {
    HostCall* c = reinterpret_cast<HostCall*>(p);
    if (c->id) g_doorbell_calls[c->id].store(nullptr, std::memory_order_release);
    delete c;
  }, "call"_a, "Free a descriptor that is not owned by the stream (never while a graph that uses it may replay).");
  m.def("stop_doorbell", [](Engine& e) { e.pool().watch_doorbell(nullptr, nullptr, nullptr); }, "engine"_a,
        "Worker 0 stops watching the bell (before its memory goes).");
  m.def("enqueue_backstop", [](uintptr_t stream, uintptr_t c) { enqueue(stream, c, &lk_hostfn_backstop); }, "stream"_a,
        "call"_a, "cuLaunchHostFunc(stream, backstop, call): post the doorbell call's job if nobody claimed the bell.");
  m.def("run_hostfn_backstop", [](uintptr_t c) { lk_hostfn_backstop(reinterpret_cast<void*>(c)); }, "call"_a,
        nb::call_guard<nb::gil_scoped_release>(), "Run the backstop host function on this thread.");
  m.def("host_device_pointer", [](uintptr_t host) {
    CUdeviceptr d = 0;
    check(memops_driver().device_pointer(&d, reinterpret_cast<void*>(host), 0), "cuMemHostGetDevicePointer");
    return uintptr_t(d);
  }, "host"_a, "The device address of pinned host memory (for stream memory operations).");
  m.def("enqueue_write_value32", [](uintptr_t stream, uintptr_t dev, uint32_t v) {
    check(memops_driver().write_value(reinterpret_cast<void*>(stream), dev, v, 0), "cuStreamWriteValue32");
  }, "stream"_a, "device_address"_a, "value"_a, "Stream-ordered store of `value` (after a memory barrier).");
  m.def("enqueue_wait_value32", [](uintptr_t stream, uintptr_t dev, uint32_t v) {
    check(memops_driver().wait_value(reinterpret_cast<void*>(stream), dev, v, kWaitValueEq), "cuStreamWaitValue32");
  }, "stream"_a, "device_address"_a, "value"_a, "The stream waits until the word equals `value`.");
  m.def("poke32", [](uintptr_t addr, uint32_t v) { __atomic_store_n(reinterpret_cast<uint32_t*>(addr), v, __ATOMIC_RELEASE); },
        "address"_a, "value"_a, "Store to a host word as the stream would (CPU stand-in for tests).");
  m.def("peek32", [](uintptr_t addr) { return __atomic_load_n(reinterpret_cast<uint32_t*>(addr), __ATOMIC_ACQUIRE); },
        "address"_a, "Load a host word (CPU stand-in for tests).");
  m.def("hostfn_addresses", []() {
    return std::make_pair(reinterpret_cast<uintptr_t>(&lk_hostfn_submit), reinterpret_cast<uintptr_t>(&lk_hostfn_wait));
  }, "Addresses of the submit and wait host functions (void fn(void* call)).");
  m.def("run_hostfn_submit", [](uintptr_t c) { lk_hostfn_submit(reinterpret_cast<void*>(c)); }, "call"_a,
        nb::call_guard<nb::gil_scoped_release>(), "Run the submit host function on this thread (what CUDA's callback thread does).");
  m.def("run_hostfn_wait", [](uintptr_t c) { lk_hostfn_wait(reinterpret_cast<void*>(c)); }, "call"_a,
        nb::call_guard<nb::gil_scoped_release>(), "Run the wait host function on this thread.");
  m.def("enqueue_submit", [](uintptr_t stream, uintptr_t c) { enqueue(stream, c, &lk_hostfn_submit); }, "stream"_a, "call"_a,
        "cuLaunchHostFunc(stream, submit, call).");
  m.def("enqueue_wait", [](uintptr_t stream, uintptr_t c) { enqueue(stream, c, &lk_hostfn_wait); }, "stream"_a, "call"_a,
        "cuLaunchHostFunc(stream, wait, call).");
  m.def("enqueue_stamp", [](uintptr_t stream, uintptr_t slot) { enqueue(stream, slot, &lk_hostfn_stamp); }, "stream"_a,
        "slot"_a, "cuLaunchHostFunc(stream, write now_ns() to the int64 at `slot`): host-function latency benchmarks.");
  m.def("now_ns", &now_ns, "The steady clock the host functions stamp with (ns).");
  m.def("hostfn_times", []() {
    nb::dict d;
    for (int f = 0; f < kTimeFields; ++f) d[kTimeFieldNames[f]] = g_sums[f].load();
    return d;
  }, "Sums over one-token host calls of this process: where a CPU layer's time goes as the stream sees it (see hostfn.h).");
  m.def("reset_hostfn_times", []() {
    for (auto& v : g_sums) v.store(0);
    g_last_return_ns.store(0);
  });
  m.def("cuda_driver_problem", []() { return driver().problem; }, "Empty when the CUDA driver could be opened.");
}

}  // namespace lk
