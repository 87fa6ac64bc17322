// Portable reference kernels: any CPU, any compiler flags.
#include <cmath>

#include "kernels.h"

namespace lk {
namespace {

template <DType W>
float wload(const uint16_t* p) {
  return W == DType::bf16 ? bf16_to_f32(*p) : f16_to_f32(*p);
}

template <DType W>
void panel_dot(const void* xv, size_t ldx, int n, const void* pv, int K, float* y) {
  const float* x = static_cast<const float*>(xv);
  const uint16_t* p = static_cast<const uint16_t*>(pv);
  for (int t = 0; t < n; ++t) {
    float acc[32] = {0};
    const float* xr = x + size_t(t) * ldx;
    for (int j = 0; j < K / 2; ++j) {
      const uint16_t* pj = p + size_t(j) * 64;
      float x0 = xr[2 * j], x1 = xr[2 * j + 1];
      for (int c = 0; c < 32; ++c) {
        const uint16_t* e = pj + (c / 16) * 32 + (c % 16) * 2;
        acc[c] += wload<W>(e) * x0 + wload<W>(e + 1) * x1;
      }
    }
    for (int c = 0; c < 32; ++c) y[t * 32 + c] = acc[c];
  }
}

void silu_mul(const float* y, int n, void* hv, size_t ldh) {
  float* h = static_cast<float*>(hv);
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < 16; ++c) {
      float g = y[t * 32 + c], u = y[t * 32 + 16 + c];
      h[t * ldh + c] = g / (1.0f + std::exp(-g)) * u;
    }
}

const KernelSet kBf16{Isa::scalar, "scalar", DType::bf16, DType::f32, panel_dot<DType::bf16>, silu_mul, q4_dot_f32,
                      f8_dot_f32};
const KernelSet kF16{Isa::scalar, "scalar", DType::f16, DType::f32, panel_dot<DType::f16>, silu_mul};

}  // namespace

const KernelSet* const kScalarSets[2] = {&kBf16, &kF16};

}  // namespace lk
