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

// --- quantized panels, widened to bf16 in registers (decode path) ---------

// int4 for the decode dot product, without a table: each nibble, made offset
// binary (code + 8), goes into the mantissa of bf16 128.0, giving 136 + code
// in both halves of a 32-bit lane; the kernel subtracts 136 * sum(x) per group.
// Four ALU ops and one shuffle where a 16-entry table (two vpermd) needs three shuffles (the port
// the unpacking was bound on).
static inline __m512i q4_biased_pairs(const uint8_t* p16) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p16)));
  const __m512i t = _mm512_slli_epi32(v, 12);  // high nibble to bits 16..19
  const __m512i n = _mm512_ternarylogic_epi32(v, t, _mm512_set1_epi32(0x000F000F), 0xA8);  // (v | t) & mask
  return _mm512_xor_si512(n, _mm512_set1_epi32(0x43084308));  // two's complement -> +8, exponent of 128.0
}
constexpr float kQ4Bias = 136.0f;

// Sum of n bf16 values in fp32.
static inline float bf16_sum(const uint16_t* x, int n) {
  __m512 s = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 32) {
    const __mmask32 m = n - i >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - i)) - 1;
    const __m512i v = _mm512_maskz_loadu_epi16(m, x + i);
    s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))));
  }
  return _mm512_reduce_add_ps(s);
}

// fp8 e4m3 -> bf16, 32 values: rebias the exponent; subnormals from a table.
struct F8Lut {
  __m512i sub;  // bf16 bits of m / 512 for m = 0..7 (16-bit lanes; the rest unused)
  F8Lut() {
    alignas(64) uint16_t v[32] = {0};
    for (int m = 0; m < 8; ++m) v[m] = f32_to_bf16(float(m) / 512.0f);
    sub = _mm512_load_si512(v);
  }
};

static inline __m512i f8_to_bf16(const uint8_t* p32, __m512i sub) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p32)));
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8);
  const __m512i em = _mm512_and_si512(b, _mm512_set1_epi16(0x7f));
  const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(em, 4), _mm512_set1_epi16(120 << 7));
  const __mmask32 tiny = _mm512_cmplt_epu16_mask(em, _mm512_set1_epi16(8));
  const __m512i mag = _mm512_mask_blend_epi16(tiny, normal, _mm512_permutexvar_epi16(em, sub));
  return _mm512_or_si512(mag, sign);
}

template <int MT, bool FP8>
void qdot(const uint16_t* x, size_t ldx, const uint8_t* p, int K, int G, float* y) {
  static const F8Lut f8;
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(p + qpanel_data_bytes(FP8 ? WKind::fp8 : WKind::int4, K));
  __m512 acc0[MT], acc1[MT];
  for (int t = 0; t < MT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int g = 0; g < K / G; ++g) {
    __m512 a0[MT], a1[MT];
    for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
    for (int j = g * G / 2; j < (g + 1) * G / 2; ++j) {
      __m512bh w0, w1;
      if constexpr (FP8) {
        const uint8_t* pj = p + size_t(j) * 64;
        w0 = (__m512bh)f8_to_bf16(pj, f8.sub);
        w1 = (__m512bh)f8_to_bf16(pj + 32, f8.sub);
      } else {
        const uint8_t* pj = p + size_t(j) * 32;
        w0 = (__m512bh)q4_biased_pairs(pj);
        w1 = (__m512bh)q4_biased_pairs(pj + 16);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int*>(x + t * ldx + 2 * j));
        a0[t] = _mm512_dpbf16_ps(a0[t], w0, xb);
        a1[t] = _mm512_dpbf16_ps(a1[t], w1, xb);
      }
    }
    if constexpr (!FP8) {
      for (int t = 0; t < MT; ++t) {
        const __m512 bias = _mm512_set1_ps(kQ4Bias * bf16_sum(x + t * ldx + size_t(g) * G, G));
        a0[t] = _mm512_sub_ps(a0[t], bias);
        a1[t] = _mm512_sub_ps(a1[t], bias);
      }
    }
    const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + size_t(g) * 32)));
    const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + size_t(g) * 32 + 16)));
    for (int t = 0; t < MT; ++t) {
      acc0[t] = _mm512_fmadd_ps(a0[t], s0, acc0[t]);
      acc1[t] = _mm512_fmadd_ps(a1[t], s1, acc1[t]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    _mm512_storeu_ps(y + t * 32, acc0[t]);
    _mm512_storeu_ps(y + t * 32 + 16, acc1[t]);
  }
}

// bf16 weights (16 rows x 2 k per register, as 32 bf16) times 16 per-row
// scales, rounded back to bf16: the even and odd k of each row share a scale.
// With `offset` (the int4 bias times the scales): (w * s - offset).
static inline __m512i scale_pairs(__m512i w, __m512 s, __m512 offset) {
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_fmsub_ps(lo, s, offset)));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_fmsub_ps(hi, s, offset)));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

template <bool FP8>
void dequant(const uint8_t* p, int K, int G, uint16_t* out) {
  static const F8Lut f8;
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(p + qpanel_data_bytes(FP8 ? WKind::fp8 : WKind::int4, K));
  const __m512 bias = _mm512_set1_ps(FP8 ? 0.0f : kQ4Bias);
  for (int g = 0; g < K / G; ++g) {
    const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + size_t(g) * 32)));
    const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + size_t(g) * 32 + 16)));
    const __m512 o0 = _mm512_mul_ps(bias, s0), o1 = _mm512_mul_ps(bias, s1);
    for (int j = g * G / 2; j < (g + 1) * G / 2; ++j) {
      __m512i w0, w1;
      if constexpr (FP8) {
        w0 = f8_to_bf16(p + size_t(j) * 64, f8.sub);
        w1 = f8_to_bf16(p + size_t(j) * 64 + 32, f8.sub);
      } else {
        w0 = q4_biased_pairs(p + size_t(j) * 32);
        w1 = q4_biased_pairs(p + size_t(j) * 32 + 16);
      }
      _mm512_storeu_si512(out + size_t(j) * 64, scale_pairs(w0, s0, o0));
      _mm512_storeu_si512(out + size_t(j) * 64 + 32, scale_pairs(w1, s1, o1));
    }
  }
}

template <bool FP8>
void qdot_n(const void* xv, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  const uint16_t* x = static_cast<const uint16_t*>(xv);
  int t = 0;
  for (; t + 4 <= n; t += 4) qdot<4, FP8>(x + t * ldx, ldx, p, K, G, y + t * 32);
  if (t + 2 <= n) { qdot<2, FP8>(x + t * ldx, ldx, p, K, G, y + t * 32); t += 2; }
  if (t < n) qdot<1, FP8>(x + t * ldx, ldx, p, K, G, y + t * 32);
}

const KernelSet kBf16{Isa::avx512_bf16, "avx512_bf16", DType::bf16, DType::bf16, avx512bf16_panel_dot,
                      avx512bf16_silu_mul, avx512bf16_q4_dot, avx512bf16_f8_dot, avx512bf16_dequant};

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

void avx512bf16_q4_dot(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  qdot_n<false>(x, ldx, n, p, K, G, y);
}

void avx512bf16_f8_dot(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  qdot_n<true>(x, ldx, n, p, K, G, y);
}

void avx512bf16_dequant(WKind kind, const uint8_t* p, int K, int G, uint16_t* out) {
  if (kind == WKind::fp8)
    dequant<true>(p, K, G, out);
  else
    dequant<false>(p, K, G, out);
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
