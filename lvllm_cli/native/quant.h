// Quantized expert weights: int4 (symmetric, group scales) and fp8 e4m3
// (group / block / per-channel scales), kept in the panel layout of
// kernels.h so the same work split and routing apply.
//
// A quantized panel (32 output rows x K, K a multiple of the group) is
//   data:   int4: [K/8][2 halves][16 rows][4 bytes]: byte b of a row holds
//                 k = 8j+b in its low nibble and k = 8j+4+b in its high one,
//                 q in [-8, 7] as a two's complement nibble (so zero-filled
//                 memory, the padding, is weight 0).  One 64-byte load thus
//                 gives 16 rows x 4 consecutive k per nibble plane: the
//                 operand of vpdpbusd after one mask (int8 activations).
//           fp8:  [K/2][2 halves][16 rows][2 k] e4m3 bytes (panel_offset order)
//   scales: [K/G][32 rows] fp16, right after the data
// so w[row, k] = q[row, k] * scale[k / G][row].  G = K means one scale per
// row (per-channel).  Block scales (e.g. fp8 128x128) are expanded to rows.
//
// int8 activations ("q8 rows", int4 decode with VNNI): a row over K holds
//   codes int8[K] | scale float[K/16] | bias int32[K/16]
// with x[k] ~= code[k] * scale[k / 16] (symmetric, round to nearest) and
// bias = 8 * sum of the block's codes (the kernels read weights as q + 8).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace lk {

enum class WKind : int { bf16 = 0, f16 = 1, int4 = 2, fp8 = 3 };

inline bool is_quantized(WKind k) { return k == WKind::int4 || k == WKind::fp8; }
inline const char* wkind_name(WKind k) {
  return k == WKind::bf16 ? "bfloat16" : k == WKind::f16 ? "float16" : k == WKind::int4 ? "int4" : "fp8_e4m3";
}

inline size_t qpanel_data_bytes(WKind k, size_t K) { return k == WKind::int4 ? K * 16 : K * 32; }
inline size_t qpanel_bytes(WKind k, size_t K, size_t G) { return qpanel_data_bytes(k, K) + (K / G) * 32 * 2; }

// Byte offset of (row c, k) in an int4 panel, and which nibble holds k.
inline int q4_value(uint8_t nibble) { return int(nibble & 15) - ((nibble & 8) << 1); }
inline size_t q4_offset(int c, size_t k) { return ((k / 8) * 2 + size_t(c / 16)) * 64 + size_t(c % 16) * 4 + k % 4; }
inline int q4_shift(size_t k) { return int(k & 4); }
inline int q4_code(const uint8_t* data, int c, size_t k) { return q4_value(uint8_t(data[q4_offset(c, k)] >> q4_shift(k))); }

constexpr int Q8_BLOCK = 16;
inline size_t q8_row_bytes(size_t K) { return K + (K / Q8_BLOCK) * 8; }
inline float* q8_scales(uint8_t* row, size_t K) { return reinterpret_cast<float*>(row + K); }
inline int32_t* q8_bias(uint8_t* row, size_t K) { return reinterpret_cast<int32_t*>(row + K + (K / Q8_BLOCK) * 4); }
inline const float* q8_scales(const uint8_t* row, size_t K) { return q8_scales(const_cast<uint8_t*>(row), K); }
inline const int32_t* q8_bias(const uint8_t* row, size_t K) { return q8_bias(const_cast<uint8_t*>(row), K); }

// e4m3 ("fn": no infinities, 0x7f/0xff NaN) to float.
inline float e4m3_to_f32(uint8_t v) {
  const int sign = v >> 7, exp = (v >> 3) & 0xf, mant = v & 7;
  float mag;
  if (exp == 0) {
    mag = float(mant) * (1.0f / 512.0f);  // subnormal: mant / 8 * 2^-6
  } else if (exp == 15 && mant == 7) {
    mag = __builtin_nanf("");
  } else {
    uint32_t bits = uint32_t(exp + 120) << 23 | uint32_t(mant) << 20;
    std::memcpy(&mag, &bits, 4);
  }
  return sign ? -mag : mag;
}

// The bf16 bit pattern of an e4m3 value (exact: bf16 has more exponent and mantissa bits).
inline uint16_t e4m3_to_bf16(uint8_t v) { return f32_to_bf16(e4m3_to_f32(v)); }

}  // namespace lk
