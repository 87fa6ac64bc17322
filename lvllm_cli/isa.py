"""Which lk_moe kernel family a CPU can run, decided from its ISA flags.

Mirrors the engine's run-time dispatch (lvllm_cli/native/cpu_features.cpp,
`isa_supported`) so that a captured machine can be judged without running on
it.  On a live machine the engine's own answer (`_lk_moe.best_isa()`) wins:
it also knows whether the OS granted AMX tiles and whether LK_ISA caps it.
"""

from __future__ import annotations

from typing import Iterable

# Worst to best, the same names the engine reports.
KERNEL_VARIANTS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")

_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "f16c"},
    "avx512_bf16": {"avx512f", "avx512bw", "avx512vl", "f16c", "avx512_bf16"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "f16c", "avx512_bf16", "amx_tile", "amx_bf16"},
}


def kernel_variant_for_flags(flags: Iterable[str]) -> str:
    """The best variant whose required flags are all present; 'scalar' when even AVX2+FMA+F16C is missing."""
    have = set(flags)
    for variant in reversed(KERNEL_VARIANTS[1:]):
        if _NEEDS[variant] <= have:
            return variant
    return "scalar"


def missing_for(variant: str, flags: Iterable[str]) -> list[str]:
    """Flags this CPU lacks for `variant`, sorted (for evidence lines)."""
    return sorted(_NEEDS.get(variant, set()) - set(flags))
