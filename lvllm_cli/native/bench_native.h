// Measurements the benchmark needs inside the engine's own threads: the
// machine's read bandwidth (the decode roofline) and per-call layer times
// without Python in the loop.
#pragma once
#include <vector>

#include "engine.h"

namespace lk {

// Read bandwidth in GB/s of all workers streaming node-local buffers
// (`bytes` in total, split over the groups like expert weights); the
// median of `reps` passes after one warm-up pass.
double read_bandwidth(Engine& eng, size_t bytes, int reps);

// Runs forward over `layers` in turn (like a forward pass), `passes` times;
// call i routes with the (i % steps)-th of `steps` [M, k] id/weight sets, so
// the experts touched change like in real decoding.  Nanoseconds per call.
std::vector<double> time_layers(const std::vector<MoELayer*>& layers, const ForwardArgs& a, int steps, int passes);

// Nanoseconds per panel_dot call of one kernel family on data that stays in
// cache (n token rows, K inputs): the kernel's compute speed, not memory's.
double kernel_ns(Isa isa, DType weights, int n, int K, int reps, int ld_pad = 32);
// The same for a quantized panel (int4 or fp8, group G) through the family's decode kernel.
// int8: int4 panels on int8 activations (q4_dot_q8, activations quantized once, untimed).
double qkernel_ns(Isa isa, WKind kind, bool int8, int n, int K, int G, int reps);

}  // namespace lk
