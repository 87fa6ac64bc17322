#include "kernels.h"

namespace lk {

namespace {

struct E4m3Table {
  float v[256];
  E4m3Table() {
    for (int i = 0; i < 256; ++i) v[i] = e4m3_to_f32(uint8_t(i));
  }
};
const E4m3Table& e4m3_table() {
  static const E4m3Table t;
  return t;
}

template <class A>
inline float xval(const A* x, size_t i) {
  if constexpr (sizeof(A) == 4)
    return x[i];
  else
    return bf16_to_f32(x[i]);
}

// w[c, k] = q[c, k] * scale[k / G][c]; the group sum is scaled once.
template <class A, bool FP8>
void qdot(const void* xv, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) {
  const A* x = static_cast<const A*>(xv);
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(p + qpanel_data_bytes(FP8 ? WKind::fp8 : WKind::int4, K));
  const float* lut = e4m3_table().v;
  for (int t = 0; t < n; ++t) {
    const A* xr = x + size_t(t) * ldx;
    float acc[32] = {0};
    for (int g = 0; g < K / G; ++g) {
      float a[32] = {0};
      for (int j = g * G / 2; j < (g + 1) * G / 2; ++j) {
        const float x0 = xval(xr, 2 * size_t(j)), x1 = xval(xr, 2 * size_t(j) + 1);
        for (int c = 0; c < 32; ++c) {
          if constexpr (FP8) {
            const uint8_t* e = p + panel_offset(c, 2 * size_t(j));
            a[c] += lut[e[0]] * x0 + lut[e[1]] * x1;
          } else {
            a[c] += float(q4_code(p, c, 2 * size_t(j))) * x0 + float(q4_code(p, c, 2 * size_t(j) + 1)) * x1;
          }
        }
      }
      for (int c = 0; c < 32; ++c) acc[c] += a[c] * f16_to_f32(sc[size_t(g) * 32 + c]);
    }
    for (int c = 0; c < 32; ++c) y[t * 32 + c] = acc[c];
  }
}

}  // namespace

void q4_dot_f32(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) { qdot<float, false>(x, ldx, n, p, K, G, y); }
void q4_dot_bf16(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) { qdot<uint16_t, false>(x, ldx, n, p, K, G, y); }
void f8_dot_f32(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) { qdot<float, true>(x, ldx, n, p, K, G, y); }
void f8_dot_bf16(const void* x, size_t ldx, int n, const uint8_t* p, int K, int G, float* y) { qdot<uint16_t, true>(x, ldx, n, p, K, G, y); }

void dequant_panel_bf16(WKind kind, const uint8_t* p, int K, int G, uint16_t* out) {
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(p + qpanel_data_bytes(kind, K));
  const float* lut = e4m3_table().v;
  for (int k = 0; k < K; ++k) {
    const uint16_t* s = sc + size_t(k / G) * 32;
    for (int c = 0; c < 32; ++c) {
      float q;
      if (kind == WKind::fp8) {
        q = lut[p[panel_offset(c, k)]];
      } else {
        q = float(q4_code(p, c, size_t(k)));
      }
      out[panel_offset(c, k)] = f32_to_bf16(q * f16_to_f32(s[c]));
    }
  }
}

#if !defined(LK_X86)
const KernelSet* const kAvx2Sets[2] = {nullptr, nullptr};
const KernelSet* const kAvx512Sets[2] = {nullptr, nullptr};
const KernelSet* const kAvx512Bf16Sets[2] = {nullptr, nullptr};
const KernelSet* const kAmxSets[2] = {nullptr, nullptr};
#endif

const KernelSet* kernel_set(Isa isa, DType weights) {
  if (weights != DType::bf16 && weights != DType::f16) return nullptr;
  int w = weights == DType::bf16 ? 0 : 1;
  switch (isa) {
    case Isa::scalar: return kScalarSets[w];
    case Isa::avx2: return kAvx2Sets[w];
    case Isa::avx512: return kAvx512Sets[w];
    case Isa::avx512_bf16: return kAvx512Bf16Sets[w];
    case Isa::amx: return kAmxSets[w];
  }
  return nullptr;
}

const KernelSet* choose_kernels(DType weights, Isa cap) {
  for (int i = static_cast<int>(cap); i >= 0; --i) {
    Isa isa = static_cast<Isa>(i);
    const KernelSet* ks = kernel_set(isa, weights);
    if (ks && isa_supported(isa)) return ks;
  }
  return nullptr;
}

}  // namespace lk
