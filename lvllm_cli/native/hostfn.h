// Stream-ordered CPU work for the vLLM plugin.
//
// A HostCall describes one expert computation on pinned host buffers.  Two C
// host functions run it from a CUDA stream: lk_hostfn_submit posts it to the
// engine's workers and returns at once (the GPU goes on with shared experts),
// lk_hostfn_wait blocks the stream until it is done.  Enqueued with
// cuLaunchHostFunc they are captured into CUDA graphs like any kernel.  The
// CUDA driver is opened at run time, so the module builds and imports on
// machines without CUDA.
#pragma once
#include <nanobind/nanobind.h>

#include "engine.h"

namespace lk {

struct HostCall {
  MoELayer* layer = nullptr;
  ForwardArgs args;
  // Eager calls are freed by lk_hostfn_wait; calls captured in a graph live
  // until free_host_call (the graph replays them).
  bool owned_by_stream = false;
};

void bind_hostfn(nanobind::module_& m);

}  // namespace lk

extern "C" {
void lk_hostfn_submit(void* call);
void lk_hostfn_wait(void* call);
}
