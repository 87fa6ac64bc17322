#include "kernels.h"

namespace lk {

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
