// AVX512F (+BW/VL): activations in fp32, weights widened in registers.
// Serves bf16 weights on AVX512 CPUs without BF16 dot products, and all fp16
// weights.
#include <immintrin.h>

#include "kernels.h"
#include "vec_math.h"

namespace lk {
namespace {

static inline __m512 bf_lo(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline __m512 bf_hi(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))); }

template <int MT>
void dot_bf16(const float* x, size_t ldx, const uint16_t* p, int K, float* y) {
  __m512 a0[MT], a1[MT];
  for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int j = 0; j < K / 2; ++j) {
    const uint16_t* pj = p + size_t(j) * 64;
    __m512i w0 = _mm512_loadu_si512(pj), w1 = _mm512_loadu_si512(pj + 32);
    __m512 l0 = bf_lo(w0), h0 = bf_hi(w0), l1 = bf_lo(w1), h1 = bf_hi(w1);
    for (int t = 0; t < MT; ++t) {
      __m512 xe = _mm512_set1_ps(x[t * ldx + 2 * j]), xo = _mm512_set1_ps(x[t * ldx + 2 * j + 1]);
      a0[t] = _mm512_fmadd_ps(l0, xe, a0[t]);
      a0[t] = _mm512_fmadd_ps(h0, xo, a0[t]);
      a1[t] = _mm512_fmadd_ps(l1, xe, a1[t]);
      a1[t] = _mm512_fmadd_ps(h1, xo, a1[t]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    _mm512_storeu_ps(y + t * 32, a0[t]);
    _mm512_storeu_ps(y + t * 32 + 16, a1[t]);
  }
}

// fp16: 16 halves widen to 8 rows x (k, k+1); the k pairs are summed at the end.
static inline __m512 pair_sum(__m512 a, __m512 b) {  // a: rows 0-7, b: rows 8-15, interleaved k
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, ev, b), _mm512_permutex2var_ps(a, od, b));
}

template <int MT>
void dot_f16(const float* x, size_t ldx, const uint16_t* p, int K, float* y) {
  __m512 acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int j = 0; j < K / 2; ++j) {
    const uint16_t* pj = p + size_t(j) * 64;
    __m512 w[4];
    for (int r = 0; r < 4; ++r) w[r] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pj + 16 * r)));
    for (int t = 0; t < MT; ++t) {
      __m512 xp = _mm512_castpd_ps(_mm512_set1_pd(*reinterpret_cast<const double*>(x + t * ldx + 2 * j)));
      for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_fmadd_ps(w[r], xp, acc[t][r]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    _mm512_storeu_ps(y + t * 32, pair_sum(acc[t][0], acc[t][1]));
    _mm512_storeu_ps(y + t * 32 + 16, pair_sum(acc[t][2], acc[t][3]));
  }
}

template <void (*D1)(const float*, size_t, const uint16_t*, int, float*),
          void (*D2)(const float*, size_t, const uint16_t*, int, float*),
          void (*D4)(const float*, size_t, const uint16_t*, int, float*)>
void panel_dot(const void* xv, size_t ldx, int n, const void* pv, int K, float* y) {
  const float* x = static_cast<const float*>(xv);
  const uint16_t* p = static_cast<const uint16_t*>(pv);
  int t = 0;
  for (; t + 4 <= n; t += 4) D4(x + t * ldx, ldx, p, K, y + t * 32);
  if (t + 2 <= n) { D2(x + t * ldx, ldx, p, K, y + t * 32); t += 2; }
  if (t < n) D1(x + t * ldx, ldx, p, K, y + t * 32);
}

void silu_mul(const float* y, int n, void* hv, size_t ldh) {
  float* h = static_cast<float*>(hv);
  for (int t = 0; t < n; ++t) {
    __m512 g = _mm512_loadu_ps(y + t * 32), u = _mm512_loadu_ps(y + t * 32 + 16);
    _mm512_storeu_ps(h + t * ldh, _mm512_mul_ps(silu512(g), u));
  }
}

const KernelSet kBf16{Isa::avx512, "avx512", DType::bf16, DType::f32,
                      panel_dot<dot_bf16<1>, dot_bf16<2>, dot_bf16<4>>, silu_mul, avx2_q4_dot, avx2_f8_dot};
const KernelSet kF16{Isa::avx512, "avx512", DType::f16, DType::f32,
                     panel_dot<dot_f16<1>, dot_f16<2>, dot_f16<4>>, silu_mul};

}  // namespace

const KernelSet* const kAvx512Sets[2] = {&kBf16, &kF16};

}  // namespace lk
