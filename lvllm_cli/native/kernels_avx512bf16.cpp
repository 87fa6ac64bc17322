// AVX512-BF16: bf16 activations x bf16 weights with vdpbf16ps, fp32
// accumulation.  The decode kernel: one 64-byte load and one dot product per
// 16 rows x 2 k, so a core streams weights at memory speed.  int4 decode
// runs on AVX512-VNNI (int8 activations), which every such CPU also has.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

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

// int4 for the bf16 dot product, without a table: each nibble, made offset
// binary (code + 8), goes into the mantissa of bf16 128.0, giving 136 + code;
// the kernel subtracts 136 * sum(x) per group.  From a 64-byte block (16 rows
// x 8 k, quant.h) pair P holds k = 2P in the low and 2P+1 in the high word
// of each row's lane: two shifts bring the nibbles to bits 0..3 and 16..19,
// a word blend joins them, one ternary op masks and sets the exponent.
template <int P>
static inline __m512i q4_pair(__m512i d) {
  constexpr int lo_right = P == 0 ? 0 : P == 1 ? 16 : P == 2 ? 4 : 20;   // bit of k = 2P in d
  constexpr int hi_right = P == 0 ? -8 : P == 1 ? 8 : P == 2 ? -4 : 12;  // bit of k = 2P+1, less 16
  const __m512i a = lo_right ? _mm512_srli_epi32(d, lo_right) : d;
  const __m512i b = hi_right < 0 ? _mm512_slli_epi32(d, -hi_right) : _mm512_srli_epi32(d, hi_right);
  const __m512i m = _mm512_mask_blend_epi16(__mmask32(0xAAAAAAAAu), a, b);
  return _mm512_ternarylogic_epi32(m, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43084308), 0x6A);  // (m & F) ^ 4308
}
static inline void q4_pairs(const uint8_t* p64, __m512i w[4]) {
  const __m512i d = _mm512_loadu_si512(p64);
  w[0] = q4_pair<0>(d);
  w[1] = q4_pair<1>(d);
  w[2] = q4_pair<2>(d);
  w[3] = q4_pair<3>(d);
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

// Software prefetch distance of the quantized decode kernels, bytes ahead of
// the codes being read.  The hardware prefetchers alone left int4 decode
// streaming ~20 % and fp8 ~30 % below bf16's rate on the GPU host's Xeon; 2 KB
// ahead closed it (the sweep in PERFORMANCE, session 6).  LK_Q4_PREFETCH
// overrides it (rounded down to 128 bytes; 0: none), read once.
static int q4_prefetch_bytes() {
  static const int v = [] {
    const char* e = std::getenv("LK_Q4_PREFETCH");
    return e ? std::max(0, std::atoi(e)) & ~127 : 2048;
  }();
  return v;
}

// The prefetch distance as a compile-time switch: call(PF, pf) with PF a
// std::bool_constant, so the loop without prefetch stays as it was.
template <class Call>
inline void with_prefetch(Call call) {
  const int pf = q4_prefetch_bytes();
  if (pf)
    call(std::true_type{}, pf);
  else
    call(std::false_type{}, 0);
}

// n tokens in the decode kernels' register tiles: 4 at a time, then 2, then
// 1; call(MT, t) with MT a std::integral_constant.
template <class Call>
inline void token_tiles(int n, Call call) {
  int t = 0;
  for (; t + 4 <= n; t += 4) call(std::integral_constant<int, 4>{}, t);
  if (t + 2 <= n) {
    call(std::integral_constant<int, 2>{}, t);
    t += 2;
  }
  if (t < n) call(std::integral_constant<int, 1>{}, t);
}

template <int MT, bool FP8, bool PF>
void qdot(const uint16_t* x, size_t ldx, const uint8_t* p, int K, int G, float* y, int pf) {
  static const F8Lut f8;
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(p + qpanel_data_bytes(FP8 ? WKind::fp8 : WKind::int4, K));
  __m512 acc0[MT], acc1[MT];
  for (int t = 0; t < MT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int g = 0; g < K / G; ++g) {
    __m512 a0[MT], a1[MT];
    for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
    auto pair = [&](int j, __m512bh w0, __m512bh w1) {
      for (int t = 0; t < MT; ++t) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int*>(x + t * ldx + 2 * j));
        a0[t] = _mm512_dpbf16_ps(a0[t], w0, xb);
        a1[t] = _mm512_dpbf16_ps(a1[t], w1, xb);
      }
    };
    if constexpr (FP8) {
      for (int j = g * G / 2; j < (g + 1) * G / 2; ++j) {
        const uint8_t* pj = p + size_t(j) * 64;
        if constexpr (PF) _mm_prefetch(reinterpret_cast<const char*>(pj + pf), _MM_HINT_T0);
        pair(j, (__m512bh)f8_to_bf16(pj, f8.sub), (__m512bh)f8_to_bf16(pj + 32, f8.sub));
      }
    } else {
      for (int j8 = g * G / 8; j8 < (g + 1) * G / 8; ++j8) {
        if constexpr (PF) {
          _mm_prefetch(reinterpret_cast<const char*>(p + size_t(j8) * 128 + pf), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p + size_t(j8) * 128 + pf + 64), _MM_HINT_T0);
        }
        __m512i w0[4], w1[4];
        q4_pairs(p + size_t(j8) * 128, w0);
        q4_pairs(p + size_t(j8) * 128 + 64, w1);
        for (int q = 0; q < 4; ++q) pair(4 * j8 + q, (__m512bh)w0[q], (__m512bh)w1[q]);
      }
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

// --- int4 x int8 activations (VNNI, the decode path) -----------------------
//
// One 64-byte block (16 rows x 8 k) is two vpdpbusd operands after one ternary
// op each: low nibbles are k 0..3 of every row's lane, high nibbles k 4..7,
// made offset binary (q + 8, unsigned) against signed int8 activations; the
// q8 row's bias (8 * sum of codes) takes the offset back out per 16-k block.
static inline void q4_planes(const uint8_t* p64, __m512i& lo, __m512i& hi) {
  const __m512i v = _mm512_loadu_si512(p64);
  const __m512i flip = _mm512_set1_epi8(char(0x88)), nib = _mm512_set1_epi8(0x0F);
  lo = _mm512_ternarylogic_epi32(v, flip, nib, 0x28);  // (v ^ 0x88) & 0x0F
  hi = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4), flip, nib, 0x28);
}

template <int MT, bool PF>
void q8dot(const uint8_t* xq, size_t ldq, const uint8_t* p, int K, int G, float* y, int pf) {
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(p + qpanel_data_bytes(WKind::int4, K));
  const float* xs[MT];
  const int32_t* xb[MT];
  for (int t = 0; t < MT; ++t) {
    xs[t] = q8_scales(xq + t * ldq, K);
    xb[t] = q8_bias(xq + t * ldq, K);
  }
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int g = 0; g < K / G; ++g) {
    __m512 fa[MT][2];
    for (int t = 0; t < MT; ++t) fa[t][0] = fa[t][1] = _mm512_setzero_ps();
    for (int k0 = g * G; k0 < (g + 1) * G; k0 += Q8_BLOCK) {
      __m512i ia[MT][2];
      for (int t = 0; t < MT; ++t) ia[t][0] = ia[t][1] = _mm512_setzero_si512();
      for (int k = k0; k < k0 + Q8_BLOCK; k += 8) {
        if constexpr (PF) {
          _mm_prefetch(reinterpret_cast<const char*>(p + size_t(k / 8) * 128 + pf), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p + size_t(k / 8) * 128 + pf + 64), _MM_HINT_T0);
        }
        for (int h = 0; h < 2; ++h) {
          __m512i lo, hi;
          q4_planes(p + size_t(k / 8) * 128 + h * 64, lo, hi);
          for (int t = 0; t < MT; ++t) {
            const uint8_t* xr = xq + t * ldq + k;
            ia[t][h] = _mm512_dpbusd_epi32(ia[t][h], lo, _mm512_set1_epi32(*reinterpret_cast<const int*>(xr)));
            ia[t][h] = _mm512_dpbusd_epi32(ia[t][h], hi, _mm512_set1_epi32(*reinterpret_cast<const int*>(xr + 4)));
          }
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m512i bias = _mm512_set1_epi32(xb[t][k0 / Q8_BLOCK]);
        const __m512 s = _mm512_set1_ps(xs[t][k0 / Q8_BLOCK]);
        for (int h = 0; h < 2; ++h)
          fa[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ia[t][h], bias)), s, fa[t][h]);
      }
    }
    const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + size_t(g) * 32)));
    const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + size_t(g) * 32 + 16)));
    for (int t = 0; t < MT; ++t) {
      acc[t][0] = _mm512_fmadd_ps(fa[t][0], s0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(fa[t][1], s1, acc[t][1]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    _mm512_storeu_ps(y + t * 32, acc[t][0]);
    _mm512_storeu_ps(y + t * 32 + 16, acc[t][1]);
  }
}

// 16 fp32 values -> one q8 block: scale = max|v| / 127, codes rounded to nearest even.
static inline void q8_block(__m512 v, uint8_t* codes, float* scale, int32_t* bias) {
  const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtsepi32_epi8(q));
  *scale = amax / 127.0f;
  *bias = 8 * _mm512_reduce_add_epi32(q);
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
    if constexpr (FP8) {
      for (int j = g * G / 2; j < (g + 1) * G / 2; ++j) {
        _mm512_storeu_si512(out + size_t(j) * 64, scale_pairs(f8_to_bf16(p + size_t(j) * 64, f8.sub), s0, o0));
        _mm512_storeu_si512(out + size_t(j) * 64 + 32, scale_pairs(f8_to_bf16(p + size_t(j) * 64 + 32, f8.sub), s1, o1));
      }
    } else {
      for (int j8 = g * G / 8; j8 < (g + 1) * G / 8; ++j8) {
        __m512i w0[4], w1[4];
        q4_pairs(p + size_t(j8) * 128, w0);
        q4_pairs(p + size_t(j8) * 128 + 64, w1);
        for (int q = 0; q < 4; ++q) {
          _mm512_storeu_si512(out + size_t(4 * j8 + q) * 64, scale_pairs(w0[q], s0, o0));
          _mm512_storeu_si512(out + size_t(4 * j8 + q) * 64 + 32, scale_pairs(w1[q], s1, o1));
        }
      }
    }
  }
}

template <bool FP8>
void qdot_n(const void* xv, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  const uint16_t* x = static_cast<const uint16_t*>(xv);
  with_prefetch([&](auto prefetch, int pf) {
    token_tiles(n, [&](auto tile, int t) {
      qdot<decltype(tile)::value, FP8, decltype(prefetch)::value>(x + t * ldx, ldx, p, K, G, y + t * 32, pf);
    });
  });
}

const KernelSet kBf16{Isa::avx512_bf16,       "avx512_bf16",        DType::bf16,          DType::bf16,
                      avx512bf16_panel_dot,    avx512bf16_silu_mul,  avx512bf16_q4_dot,    avx512bf16_f8_dot,
                      avx512bf16_dequant,      avx512vnni_q4_dot_q8, avx512vnni_quantize_q8, avx512vnni_silu_mul_q8};

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

void avx512vnni_q4_dot_q8(const uint8_t* xq, size_t ldq, int n, const uint8_t* p, int K, int G, float* y) {
  with_prefetch([&](auto prefetch, int pf) {
    token_tiles(n, [&](auto tile, int t) {
      q8dot<decltype(tile)::value, decltype(prefetch)::value>(xq + t * ldq, ldq, p, K, G, y + t * 32, pf);
    });
  });
}

void avx512vnni_quantize_q8(const void* xv, int K, uint8_t* row) {
  const uint16_t* x = static_cast<const uint16_t*>(xv);
  for (int b = 0; b < K / Q8_BLOCK; ++b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * Q8_BLOCK));
    q8_block(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)), row + b * Q8_BLOCK,
             q8_scales(row, K) + b, q8_bias(row, K) + b);
  }
}

void avx512vnni_silu_mul_q8(const float* y, int n, uint8_t* h, size_t ldh, int Kh, int blk) {
  for (int t = 0; t < n; ++t) {
    uint8_t* row = h + t * ldh;
    const __m512 v = _mm512_mul_ps(silu512(_mm512_loadu_ps(y + t * 32)), _mm512_loadu_ps(y + t * 32 + 16));
    q8_block(v, row + blk * Q8_BLOCK, q8_scales(row, Kh) + blk, q8_bias(row, Kh) + blk);
  }
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
