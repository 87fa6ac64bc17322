"""Kernel-variant choice from flags, version ranges."""

import itertools

import pytest

from lvllm_cli import compat
from lvllm_cli.isa import KERNEL_VARIANTS, kernel_variant_for_flags

FLAGS = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"]


def _reference(flags: set) -> str:
    # Written from the engine's rules (native/cpu_features.cpp isa_supported), case by case.
    avx512 = {"avx512f", "avx512bw", "avx512vl", "f16c"} <= flags
    bf16 = avx512 and "avx512_bf16" in flags
    amx = bf16 and {"amx_tile", "amx_bf16"} <= flags
    if amx:
        return "amx"
    if bf16:
        return "avx512_bf16"
    if avx512:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "scalar"


def test_variant_for_every_flag_combination():
    for bits in itertools.product([0, 1], repeat=len(FLAGS)):
        flags = {f for f, b in zip(FLAGS, bits) if b}
        assert kernel_variant_for_flags(flags) == _reference(flags), flags


def test_variant_agrees_with_the_engine_on_this_cpu():
    from lvllm_cli import _lk_moe
    from lvllm_cli.probe import probe

    engine = _lk_moe.best_isa()
    assert engine in KERNEL_VARIANTS
    from_flags = kernel_variant_for_flags(probe().cpu.flags)
    # The engine may be lower (AMX not granted, LK_ISA) but never higher than the flags allow.
    assert KERNEL_VARIANTS.index(engine) <= KERNEL_VARIANTS.index(from_flags)
    if "amx" not in (engine, from_flags):
        assert engine == from_flags


@pytest.mark.parametrize("version,ok", [
    ("0.26.0", True), ("0.26", True), ("0.33.9", True), ("0.33.1.dev12+g0abc", True), ("0.25.9", False),
    ("0.34.0", False), ("0.34.0rc1", False), ("1.0.0", False), ("0.26.0rc1", True),
])
def test_supported_vllm(version, ok):
    assert compat.satisfies(version) is ok


def test_bad_torch():
    assert compat.bad_torch_reason("2.9.0+cu128") == compat.BAD_TORCH["2.9.0"]
    assert compat.bad_torch_reason("2.9") == compat.BAD_TORCH["2.9.0"]
    assert compat.bad_torch_reason("2.9.1") is None
    assert compat.bad_torch_reason("2.13.0+cpu") is None
    assert compat.bad_torch_reason("nonsense") is None
