// Python bindings of the lk_moe engine (nanobind; no torch headers).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "cpu_features.h"

namespace nb = nanobind;

#ifndef LK_BUILD_FLAGS
#define LK_BUILD_FLAGS "portable"
#endif

NB_MODULE(_lk_moe, m) {
  m.doc() = "lk_moe: NUMA-aware CPU engine for routed MoE experts";

  m.def("cpu_features", []() {
    const lk::CpuFeatures& f = lk::cpu_features();
    nb::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
    d["avx512_bf16"] = f.avx512_bf16; d["avx512_fp16"] = f.avx512_fp16;
    d["amx_tile"] = f.amx_tile; d["amx_bf16"] = f.amx_bf16; d["amx_int8"] = f.amx_int8;
    d["amx_permitted"] = f.amx_permitted;
    return d;
  }, "CPU features as seen by the engine (CPU support and OS enablement).");

  m.def("isa_supported", [](const std::string& name) {
    lk::Isa isa;
    if (!lk::isa_from_name(name, &isa)) throw nb::value_error(("unknown ISA variant: " + name).c_str());
    return lk::isa_supported(isa);
  });
  m.def("best_isa", []() { return std::string(lk::isa_name(lk::best_isa())); },
        "The best kernel family this CPU can run, capped by LK_ISA.");
  m.def("build_flavour", []() { return std::string(LK_BUILD_FLAGS); });
}
