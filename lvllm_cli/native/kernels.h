// Kernel families and the packed "panel" layout they stream.
//
// A panel holds 32 output rows (two halves of 16) over K inputs (K a
// multiple of 32), laid out [K/2][2 halves][16 rows][2 k].  One 64-byte load
// then feeds 16 rows with one k-pair: the operand of vdpbf16ps, and exactly
// an AMX B-tile row.  Both projections use it:
//   w13 panel r: half 0 = gate rows 16r..16r+15, half 1 = the same up rows;
//   w2  panel b: half 0 = hidden rows 32b..32b+15, half 1 = 32b+16..32b+31.
#pragma once
#include <cstddef>

#include "common.h"
#include "cpu_features.h"
#include "quant.h"

namespace lk {

constexpr int PANEL_ROWS = 32;
constexpr int K_ALIGN = 32;  // K is padded (with zero weights) to this

inline size_t panel_elems(size_t K) { return K * PANEL_ROWS; }

// Element offset of (output row c in 0..31, input k) inside a panel.
inline size_t panel_offset(int c, size_t k) {
  return ((k / 2) * 2 + size_t(c / 16)) * 32 + size_t(c % 16) * 2 + (k % 2);
}

struct KernelSet {
  Isa isa;
  const char* name;
  DType weights;  // bf16 or f16
  DType act;      // activation format the kernels read: bf16 or f32
  // y[t*32 + c] = sum_k x[t*ldx + k] * panel(c, k), t < n, c < 32; fp32 accumulation.
  // The AMX family fills whole 16/32-row tiles: x must have 31 readable rows
  // after row n-1, and y room for round_up(n, 32) rows (rows >= n are junk).
  void (*panel_dot)(const void* x, size_t ldx, int n, const void* panel, int K, float* y);
  // h[t*ldh + c] = silu(y[t*32 + c]) * y[t*32 + 16 + c], c < 16, stored in act format.
  void (*silu_mul)(const float* y, int n, void* h, size_t ldh);
  // The same product on quantized panels (quant.h), x in `act` format, group G
  // (K a multiple of G).  Decode path: weights are widened in registers.
  void (*q4_dot)(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y) = nullptr;
  void (*f8_dot)(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y) = nullptr;
  // Quantized panel -> bf16 panel with scales applied; null: dequant_panel_bf16.
  void (*dequant)(WKind kind, const uint8_t* panel, int K, int G, uint16_t* out) = nullptr;
  // int4 panels times int8 activations (q8 rows of K, quant.h; row stride
  // ldq bytes), y as q4_dot.  Null where the CPU has no int8 dot product.
  void (*q4_dot_q8)(const uint8_t* xq, size_t ldq, int n, const uint8_t* panel, int K, int G, float* y) = nullptr;
  // One activation row of K values (act format) -> q8 row.
  void (*quantize_q8)(const void* x, int K, uint8_t* row) = nullptr;
  // silu_mul into q8 rows (length Kh, stride ldh bytes): the 16 results of
  // row t become block `blk` of h + t * ldh.
  void (*silu_mul_q8)(const float* y, int n, uint8_t* h, size_t ldh, int Kh, int blk) = nullptr;
};

// Portable quantized kernels for either activation format (kernels.cpp).
void q4_dot_f32(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);
void q4_dot_bf16(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);
void f8_dot_f32(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);
void f8_dot_bf16(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);

// A quantized panel as a bf16 panel, scales applied (the many-token path:
// dequantize once, then run the bf16 kernels, AMX included).
void dequant_panel_bf16(WKind kind, const uint8_t* panel, int K, int G, uint16_t* out);

// The kernels for this ISA family and weight type, or nullptr when the pair
// does not exist (e.g. fp16 weights have no bf16-dot family).
const KernelSet* kernel_set(Isa isa, DType weights);

// Best available set for the weights, at or below `cap`.
const KernelSet* choose_kernels(DType weights, Isa cap);

// Per-ISA tables (defined in kernels_<isa>.cpp; null where not compiled).
extern const KernelSet* const kScalarSets[2];   // [bf16, f16]
extern const KernelSet* const kAvx2Sets[2];
extern const KernelSet* const kAvx512Sets[2];
extern const KernelSet* const kAvx512Bf16Sets[2];
extern const KernelSet* const kAmxSets[2];

// Used by the AMX family for the rows that do not fill a tile.
void avx512bf16_panel_dot(const void* x, size_t ldx, int n, const void* panel, int K, float* y);
void avx512bf16_silu_mul(const float* y, int n, void* h, size_t ldh);
void avx512bf16_q4_dot(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);
void avx512bf16_f8_dot(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);
void avx512bf16_dequant(WKind kind, const uint8_t* panel, int K, int G, uint16_t* out);
void avx512vnni_q4_dot_q8(const uint8_t* xq, size_t ldq, int n, const uint8_t* panel, int K, int G, float* y);
void avx512vnni_quantize_q8(const void* x, int K, uint8_t* row);
void avx512vnni_silu_mul_q8(const float* y, int n, uint8_t* h, size_t ldh, int Kh, int blk);
// fp32-activation quantized kernels (AVX2 + FMA + F16C), also used by the AVX512F family.
void avx2_q4_dot(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);
void avx2_f8_dot(const void* x, size_t ldx, int n, const uint8_t* panel, int K, int G, float* y);

}  // namespace lk
