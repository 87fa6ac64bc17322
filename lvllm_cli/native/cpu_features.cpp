#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

#if defined(LK_X86)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lk {

#if defined(LK_X86)
static unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((unsigned long long)edx << 32) | eax;
}

static bool request_amx_permission() {
  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); harmless if already granted.
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return f;
  bool osxsave = c & (1u << 27);
  bool fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  bool os_ymm = (xcr0 & 0x6) == 0x6;
  bool os_zmm = (xcr0 & 0xe6) == 0xe6;
  bool os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = avx && os_ymm && (b & (1u << 5));
  f.fma = fma && os_ymm;
  f.f16c = f16c && os_ymm;
  f.avx512f = os_zmm && (b & (1u << 16));
  f.avx512bw = os_zmm && (b & (1u << 30));
  f.avx512vl = os_zmm && (b & (1u << 31));
  f.avx512_fp16 = os_zmm && (d & (1u << 23));
  f.avx512_vnni = os_zmm && (c & (1u << 11));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  f.amx_int8 = os_amx && (d & (1u << 25));
  unsigned a1, b1, c1, d1;
  if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) f.avx512_bf16 = os_zmm && (a1 & (1u << 5));
  if (f.amx_tile && f.amx_bf16) f.amx_permitted = request_amx_permission();
  return f;
}
#else
static CpuFeatures detect() { return CpuFeatures{}; }
#endif

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

static const char* const kNames[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx"};

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

bool isa_from_name(const std::string& name, Isa* out) {
  for (int i = 0; i <= static_cast<int>(Isa::amx); ++i) {
    if (name == kNames[i]) {
      *out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::scalar: return true;
#if defined(LK_X86)
    case Isa::avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::avx512: return f.avx512f && f.avx512bw && f.avx512vl && f.f16c;
    // Every CPU with AVX512-BF16 has AVX512-VNNI too; the family's int4 decode uses both.
    case Isa::avx512_bf16: return isa_supported(Isa::avx512) && f.avx512_bf16 && f.avx512_vnni;
    case Isa::amx: return isa_supported(Isa::avx512_bf16) && f.amx_tile && f.amx_bf16 && f.amx_permitted;
#endif
    default: return false;
  }
}

Isa isa_cap() {
  const char* env = std::getenv("LK_ISA");
  Isa cap = Isa::amx;
  if (env && *env) isa_from_name(env, &cap);
  return cap;
}

Isa best_isa() {
  Isa cap = isa_cap();
  for (int i = static_cast<int>(cap); i > 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::scalar;
}

}  // namespace lk
