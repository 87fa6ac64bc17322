// AVX512-BF16: bf16 activations x bf16 weights with vdpbf16ps, fp32
// accumulation.  The decode kernel: one 64-byte load and one dot product per
// 16 rows x 2 k, so a core streams weights at memory speed.
#include <immintrin.h>

#include "kernels.h"
#include "vec_math.h"

namespace lk {
namespace {

template <int MT>
void dot(const uint16_t* x, size_t ldx, const uint16_t* p, int K, float* y) {
  __m512 a0[MT], a1[MT];
  for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int j = 0; j < K / 2; ++j) {
    const uint16_t* pj = p + size_t(j) * 64;
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(pj), w1 = (__m512bh)_mm512_loadu_si512(pj + 32);
    for (int t = 0; t < MT; ++t) {
      __m512bh xb = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int*>(x + t * ldx + 2 * j));
      a0[t] = _mm512_dpbf16_ps(a0[t], w0, xb);
      a1[t] = _mm512_dpbf16_ps(a1[t], w1, xb);
    }
  }
  for (int t = 0; t < MT; ++t) {
    _mm512_storeu_ps(y + t * 32, a0[t]);
    _mm512_storeu_ps(y + t * 32 + 16, a1[t]);
  }
}

const KernelSet kBf16{Isa::avx512_bf16, "avx512_bf16", DType::bf16, DType::bf16, avx512bf16_panel_dot,
                      avx512bf16_silu_mul};

}  // namespace

void avx512bf16_panel_dot(const void* xv, size_t ldx, int n, const void* pv, int K, float* y) {
  const uint16_t* x = static_cast<const uint16_t*>(xv);
  const uint16_t* p = static_cast<const uint16_t*>(pv);
  int t = 0;
  for (; t + 8 <= n; t += 8) dot<8>(x + t * ldx, ldx, p, K, y + t * 32);
  if (t + 4 <= n) { dot<4>(x + t * ldx, ldx, p, K, y + t * 32); t += 4; }
  if (t + 2 <= n) { dot<2>(x + t * ldx, ldx, p, K, y + t * 32); t += 2; }
  if (t < n) dot<1>(x + t * ldx, ldx, p, K, y + t * 32);
}

void avx512bf16_silu_mul(const float* y, int n, void* hv, size_t ldh) {
  uint16_t* h = static_cast<uint16_t*>(hv);
  for (int t = 0; t < n; ++t) {
    __m512 g = _mm512_loadu_ps(y + t * 32), u = _mm512_loadu_ps(y + t * 32 + 16);
    __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(silu512(g), u));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + t * ldh), (__m256i)r);
  }
}

const KernelSet* const kAvx512Bf16Sets[2] = {&kBf16, nullptr};

}  // namespace lk
