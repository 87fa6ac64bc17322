#include "hostfn.h"
#include "raw_args.h"

#include <dlfcn.h>

#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <mutex>
#include <string>

namespace nb = nanobind;
using namespace nb::literals;

extern "C" void lk_hostfn_submit(void* p) {
  lk::HostCall* c = static_cast<lk::HostCall*>(p);
  // CUDA's callback thread submits and then waits: keep it off the workers' cores (once per thread).
  static thread_local bool placed = false;
  if (!placed) {
    c->layer->engine().pool().keep_caller_off_workers();
    placed = true;
  }
  c->layer->engine().submit(c->layer, c->args);
}

extern "C" void lk_hostfn_wait(void* p) {
  lk::HostCall* c = static_cast<lk::HostCall*>(p);
  c->layer->engine().wait();
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
  m.def("cuda_driver_problem", []() { return driver().problem; }, "Empty when the CUDA driver could be opened.");
}

}  // namespace lk
