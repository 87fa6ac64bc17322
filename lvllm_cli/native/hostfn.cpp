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

// Written only by CUDA's callback thread (or the stand-in executor's), read by the metrics thread.
struct TimeSums {
  std::atomic<uint64_t> calls{0}, gaps{0}, gap_ns{0}, submit_ns{0}, to_wait_ns{0}, wait_ns{0}, done_to_return_ns{0};
  std::atomic<int64_t> last_return_ns{0};
};
TimeSums g_times;
constexpr int64_t kIdleGapNs = 50'000'000;

void add(std::atomic<uint64_t>& a, int64_t v) { a.fetch_add(uint64_t(std::max<int64_t>(v, 0)), std::memory_order_relaxed); }

void record(const HostCall& c, int64_t wait_entered, int64_t wait_returned, int64_t engine_done) {
  const int64_t prev = g_times.last_return_ns.exchange(wait_returned, std::memory_order_relaxed);
  if (c.args.M != 1) return;
  add(g_times.calls, 1);
  const int64_t gap = c.submit_entered_ns - prev;
  if (prev > 0 && gap >= 0 && gap < kIdleGapNs) {
    add(g_times.gaps, 1);
    add(g_times.gap_ns, gap);
  }
  add(g_times.submit_ns, c.submit_returned_ns - c.submit_entered_ns);
  add(g_times.to_wait_ns, wait_entered - c.submit_returned_ns);
  add(g_times.wait_ns, wait_returned - wait_entered);
  add(g_times.done_to_return_ns, wait_returned - std::max(engine_done, wait_entered));
}

}  // namespace

HostFnTimes hostfn_times() {
  HostFnTimes t;
  t.calls = g_times.calls.load();
  t.gaps = g_times.gaps.load();
  t.gap_ns = g_times.gap_ns.load();
  t.submit_ns = g_times.submit_ns.load();
  t.to_wait_ns = g_times.to_wait_ns.load();
  t.wait_ns = g_times.wait_ns.load();
  t.done_to_return_ns = g_times.done_to_return_ns.load();
  return t;
}

void reset_hostfn_times() {
  for (auto* a : {&g_times.calls, &g_times.gaps, &g_times.gap_ns, &g_times.submit_ns, &g_times.to_wait_ns, &g_times.wait_ns,
                  &g_times.done_to_return_ns})
    a->store(0);
  g_times.last_return_ns.store(0);
}

}  // namespace lk

// Writes the steady clock (ns) to *(int64_t*)slot: for measuring how late host functions run.
extern "C" void lk_hostfn_stamp(void* slot) { *static_cast<int64_t*>(slot) = lk::now_ns(); }

extern "C" void lk_hostfn_submit(void* p) {
  lk::HostCall* c = static_cast<lk::HostCall*>(p);
  c->submit_entered_ns = lk::now_ns();
  // CUDA's callback thread submits and then waits: keep it off the workers' cores (once per thread).
  static thread_local bool placed = false;
  if (!placed) {
    c->layer->engine().pool().keep_caller_off_workers();
    placed = true;
  }
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

struct CudaDriver {
  LaunchHostFn launch = nullptr;
  GetErrorString error_string = nullptr;
  std::string problem;
};

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
    if (!d.launch) d.problem = "the CUDA driver has no cuLaunchHostFunc (driver older than CUDA 10)";
  });
  return d;
}

void enqueue(uintptr_t stream, uintptr_t call, CUhostFn fn) {
  const CudaDriver& d = driver();
  if (!d.launch) throw std::runtime_error(d.problem);
  CUresult r = d.launch(reinterpret_cast<void*>(stream), fn, reinterpret_cast<void*>(call));
  if (r != 0) {
    const char* s = nullptr;
    if (d.error_string) d.error_string(r, &s);
    throw std::runtime_error("cuLaunchHostFunc failed: " + std::string(s ? s : "error ") + " (" + std::to_string(r) + ")");
  }
}

}  // namespace

void bind_hostfn(nb::module_& m) {
  m.def(
      "make_host_call",
      [](MoELayer& l, uintptr_t x, const std::string& xt, uintptr_t ids, bool ids64, uintptr_t tw, int M, int k, uintptr_t out,
         const std::string& ot, bool owned_by_stream) {
        ForwardArgs args = raw_forward_args(l, x, xt, 0, ids, ids64, tw, M, k, out, ot, 0);
        HostCall* c = new HostCall();
        c->layer = &l;
        c->args = args;
        c->owned_by_stream = owned_by_stream;
        return reinterpret_cast<uintptr_t>(c);
      },
      "layer"_a, "x"_a, "x_dtype"_a, "topk_ids"_a, "ids_int64"_a, "topk_weights"_a, "tokens"_a, "k"_a, "out"_a,
      "out_dtype"_a, "owned_by_stream"_a,
      "A call descriptor on pinned buffers (contiguous [tokens, hidden] x/out, [tokens, k] ids/weights).  The layer must "
      "outlive it.");
  m.def("free_host_call", [](uintptr_t c) { delete reinterpret_cast<HostCall*>(c); }, "call"_a,
        "Free a descriptor that is not owned by the stream (never while a graph that uses it may replay).");
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
    const HostFnTimes t = hostfn_times();
    nb::dict d;
    d["calls"] = t.calls; d["gaps"] = t.gaps; d["gap_ns"] = t.gap_ns; d["submit_ns"] = t.submit_ns;
    d["to_wait_ns"] = t.to_wait_ns; d["wait_ns"] = t.wait_ns; d["done_to_return_ns"] = t.done_to_return_ns;
    return d;
  }, "Sums over one-token host calls of this process: where a CPU layer's time goes as the stream sees it (see hostfn.h).");
  m.def("reset_hostfn_times", &reset_hostfn_times);
  m.def("cuda_driver_problem", []() { return driver().problem; }, "Empty when the CUDA driver could be opened.");
}

}  // namespace lk
