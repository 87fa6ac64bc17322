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

// --- quantized panels (quant.h), fp32 activations: 8 rows per register ------

// Code k (0..7) of 8 rows' 32-bit lanes (quant.h: byte k % 4, nibble k / 4)
// as fp32: shift the nibble to the top, arithmetic shift back down.
template <int KK>
static inline __m256 q4_code8(__m256i v) {
  constexpr int top = 28 - (8 * (KK % 4) + 4 * (KK / 4));
  const __m256i up = top ? _mm256_slli_epi32(v, top) : v;
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(up, 28));
}

// 8 e4m3 bytes -> fp32: rebias normals, subnormals as m * 2^-9.
static inline __m256 e4m3_8(const uint8_t* p8) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p8)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 tiny = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.0f / 512.0f));
  const __m256 is_tiny = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em));
  return _mm256_or_ps(_mm256_blendv_ps(normal, tiny, is_tiny), _mm256_castsi256_ps(sign));
}

// One token: the panel's 32 rows as four groups of 8, scales applied per group.
template <bool FP8>
void qdot1(const float* x, const uint8_t* p, int K, int G, float* y) {
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(p + qpanel_data_bytes(FP8 ? WKind::fp8 : WKind::int4, K));
  __m256 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
  for (int g = 0; g < K / G; ++g) {
    __m256 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm256_setzero_ps();
    if constexpr (FP8) {
      for (int j = g * G / 2; j < (g + 1) * G / 2; ++j) {
        const __m256 xe = _mm256_broadcast_ss(x + 2 * j), xo = _mm256_broadcast_ss(x + 2 * j + 1);
        for (int r = 0; r < 4; ++r) {  // rows 8r..8r+7 (halves: r < 2 is half 0)
          // e4m3 bytes of 4 rows x 2 k per 8 bytes: widen, then split even / odd k.
          const uint8_t* pr = p + size_t(j) * 64 + size_t(r) * 16;
          const __m256 w0 = e4m3_8(pr), w1 = e4m3_8(pr + 8);  // rows 8r..8r+3 and 8r+4..8r+7, (k, k+1) interleaved
          __m256 we = _mm256_shuffle_ps(w0, w1, 0x88);       // even lanes: k even ...
          __m256 wo = _mm256_shuffle_ps(w0, w1, 0xdd);       // odd lanes: k odd ...
          // shuffle_ps works within 128-bit halves: fix the row order to 0..7
          we = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(we), 0xd8));
          wo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(wo), 0xd8));
          a[r] = _mm256_fmadd_ps(we, xe, a[r]);
          a[r] = _mm256_fmadd_ps(wo, xo, a[r]);
        }
      }
    } else {
      for (int j8 = g * G / 8; j8 < (g + 1) * G / 8; ++j8) {
        const float* xk = x + 8 * j8;
        for (int r = 0; r < 4; ++r) {  // rows 8r..8r+7: half r / 2, second 32 bytes of it for odd r
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + size_t(j8) * 128 + size_t(r) * 32));
          a[r] = _mm256_fmadd_ps(q4_code8<0>(v), _mm256_broadcast_ss(xk + 0), a[r]);
          a[r] = _mm256_fmadd_ps(q4_code8<1>(v), _mm256_broadcast_ss(xk + 1), a[r]);
          a[r] = _mm256_fmadd_ps(q4_code8<2>(v), _mm256_broadcast_ss(xk + 2), a[r]);
          a[r] = _mm256_fmadd_ps(q4_code8<3>(v), _mm256_broadcast_ss(xk + 3), a[r]);
          a[r] = _mm256_fmadd_ps(q4_code8<4>(v), _mm256_broadcast_ss(xk + 4), a[r]);
          a[r] = _mm256_fmadd_ps(q4_code8<5>(v), _mm256_broadcast_ss(xk + 5), a[r]);
          a[r] = _mm256_fmadd_ps(q4_code8<6>(v), _mm256_broadcast_ss(xk + 6), a[r]);
          a[r] = _mm256_fmadd_ps(q4_code8<7>(v), _mm256_broadcast_ss(xk + 7), a[r]);
        }
      }
    }
    for (int r = 0; r < 4; ++r) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + size_t(g) * 32 + 8 * r)));
      acc[r] = _mm256_fmadd_ps(a[r], s, acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) _mm256_storeu_ps(y + 8 * r, acc[r]);
}

template <bool FP8>
void qdot_n(const void* xv, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  const float* x = static_cast<const float*>(xv);
  for (int t = 0; t < n; ++t) qdot1<FP8>(x + t * ldx, p, K, G, y + t * 32);
}

const KernelSet kBf16{Isa::avx2, "avx2", DType::bf16, DType::f32, panel_dot_bf16, silu_mul, avx2_q4_dot, avx2_f8_dot};
const KernelSet kF16{Isa::avx2, "avx2", DType::f16, DType::f32, panel_dot_f16, silu_mul};

}  // namespace

const KernelSet* const kAvx2Sets[2] = {&kBf16, &kF16};

void avx2_q4_dot(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  qdot_n<false>(x, ldx, n, p, K, G, y);
}

void avx2_f8_dot(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  qdot_n<true>(x, ldx, n, p, K, G, y);
}

}  // namespace lk
