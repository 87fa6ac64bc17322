// Run-time CPU feature detection: what the CPU has *and* the OS has enabled.
#pragma once
#include <string>

namespace lk {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false;
  bool avx512_bf16 = false, avx512_fp16 = false, avx512_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  // AMX needs the kernel to grant the tile state to this process (Linux >= 5.16).
  bool amx_permitted = false;
};

const CpuFeatures& cpu_features();

// Kernel families, best last.  A variant is usable when the CPU supports it
// and it is not above the LK_ISA cap.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* out);
bool isa_supported(Isa isa);  // by this CPU/OS and compiled into this module
Isa best_isa();               // highest supported, capped by env LK_ISA
Isa isa_cap();                // LK_ISA or amx when unset

}  // namespace lk
