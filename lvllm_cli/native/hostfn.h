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
  int64_t submit_entered_ns = 0, submit_returned_ns = 0;  // this call's last run, for the timing sums
  // Doorbell calls (graph-captured, LVLLM_STREAM_SYNC=memops): the stream
  // writes `id` to *bell, the engine's spinning worker 0 (or the backstop
  // host function, whichever claims the bell first) submits the job, and the
  // stream waits for the engine to store 1 to *done.  0: an ordinary call.
  uint32_t id = 0;
  uint32_t* bell = nullptr;
  uint32_t* done = nullptr;
};

// Where a CPU layer's time goes as the stream sees it, summed over calls of
// one token (batch-1 decode, the case the roofline target is about); the
// Python side reads them as `hostfn_times()`.  Per call: `gap` = the previous
// call's wait returning -> this submit starting (the GPU's work between two
// CPU layers plus the copies and the callback thread's dispatch latency; gaps
// over 50 ms, idle server, are not summed), `submit` = inside the submit host
// function, `to_wait` = submit returned -> the stream's wait host function
// starting, `wait` = inside the wait, `done_to_return` = the engine finishing
// (or the wait starting, if later) -> the wait returning.  Doorbell calls (any
// token count) count who posted them: the spinning worker 0 or the backstop.
void bind_hostfn(nanobind::module_& m);

}  // namespace lk

extern "C" {
void lk_hostfn_submit(void* call);
void lk_hostfn_wait(void* call);
void lk_hostfn_stamp(void* slot);
void lk_hostfn_backstop(void* call);
}
