// AVX2 + FMA + F16C: activations in fp32, weights widened in registers.
#include <immintrin.h>

#include "kernels.h"
#include "vec_math.h"

namespace lk {
namespace {

// bf16 pairs in 32-bit lanes -> (even k, odd k) as fp32.
static inline __m256 bf_lo(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 bf_hi(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u)))); }

// 16 rows of one half, 8 per register; MT tokens.
template <int MT>
void dot_bf16(const float* x, size_t ldx, const uint16_t* p, int K, float* y) {
  __m256 acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int j = 0; j < K / 2; ++j) {
    const uint16_t* pj = p + size_t(j) * 64;
    __m256i w[4];
    for (int r = 0; r < 4; ++r) w[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pj + 16 * r));
    for (int t = 0; t < MT; ++t) {
      __m256 x0 = _mm256_broadcast_ss(x + t * ldx + 2 * j), x1 = _mm256_broadcast_ss(x + t * ldx + 2 * j + 1);
      for (int r = 0; r < 4; ++r) {
        acc[t][r] = _mm256_fmadd_ps(bf_lo(w[r]), x0, acc[t][r]);
        acc[t][r] = _mm256_fmadd_ps(bf_hi(w[r]), x1, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < 4; ++r) _mm256_storeu_ps(y + t * 32 + 8 * r, acc[t][r]);
}

// fp16: a 16-byte load is 4 rows x 2 k, widened to [r0k0 r0k1 r1k0 ...];
// pairs are summed once at the end.
static inline __m256 pair_sum(__m256 a, __m256 b) {  // a: rows 0-3, b: rows 4-7 (interleaved k)
  __m256 h = _mm256_hadd_ps(a, b);                   // r0 r1 r4 r5 | r2 r3 r6 r7
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(h), 0xD8));
}

void dot_f16_1(const float* x, const uint16_t* p, int K, float* y) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (int j = 0; j < K / 2; ++j) {
    const uint16_t* pj = p + size_t(j) * 64;
    __m256 xp = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x + 2 * j)));
    for (int r = 0; r < 8; ++r) {
      __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pj + 8 * r)));
      acc[r] = _mm256_fmadd_ps(w, xp, acc[r]);
    }
  }
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(y + 8 * q, pair_sum(acc[2 * q], acc[2 * q + 1]));
}

void panel_dot_bf16(const void* xv, size_t ldx, int n, const void* pv, int K, float* y) {
  const float* x = static_cast<const float*>(xv);
  const uint16_t* p = static_cast<const uint16_t*>(pv);
  int t = 0;
  for (; t + 2 <= n; t += 2) dot_bf16<2>(x + t * ldx, ldx, p, K, y + t * 32);
  if (t < n) dot_bf16<1>(x + t * ldx, ldx, p, K, y + t * 32);
}

void panel_dot_f16(const void* xv, size_t ldx, int n, const void* pv, int K, float* y) {
  const float* x = static_cast<const float*>(xv);
  const uint16_t* p = static_cast<const uint16_t*>(pv);
  for (int t = 0; t < n; ++t) dot_f16_1(x + t * ldx, p, K, y + t * 32);
}

void silu_mul(const float* y, int n, void* hv, size_t ldh) {
  float* h = static_cast<float*>(hv);
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < 16; c += 8) {
      __m256 g = _mm256_loadu_ps(y + t * 32 + c), u = _mm256_loadu_ps(y + t * 32 + 16 + c);
      _mm256_storeu_ps(h + t * ldh + c, _mm256_mul_ps(silu256(g), u));
    }
}

const KernelSet kBf16{Isa::avx2, "avx2", DType::bf16, DType::f32, panel_dot_bf16, silu_mul, q4_dot_f32, f8_dot_f32};
const KernelSet kF16{Isa::avx2, "avx2", DType::f16, DType::f32, panel_dot_f16, silu_mul};

}  // namespace

const KernelSet* const kAvx2Sets[2] = {&kBf16, &kF16};

}  // namespace lk
