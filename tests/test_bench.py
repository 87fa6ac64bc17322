"""`lvllm bench moe` plumbing: its PyTorch reference is right, its sizing rule holds, a tiny run fills every field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvllm_cli.moe import bench
from moe_reference import as_f64, random_problem, reference_moe, rel_err


def test_torch_reference_is_the_fused_experts_function():
    x, w13, w2, ids, tw = random_problem(33, 4, 16, 64, 48, seed=6)
    out = bench.torch_moe(x, w13, w2, ids, tw)
    assert rel_err(as_f64(out), reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())) <= 1e-2


def test_layers_for_covers_8x_l3_and_4gib_within_free_ram():
    gib = 1 << 30
    assert bench.layers_for(gib, 300 << 20, 100 * gib) == 4  # 4 GiB minimum dominates 8 x 300 MiB
    assert bench.layers_for(gib // 4, 1 * gib, 100 * gib) == 32  # 8 x L3 dominates
    assert bench.layers_for(gib, 300 << 20, 3 * gib) == 1  # only what 60 % of free RAM holds
    with pytest.raises(MemoryError, match="one layer needs"):
        bench.layers_for(4 * gib, 300 << 20, 2 * gib)


def test_routing_is_distinct_and_normalised():
    ids, w = bench.routing(5, 32, 4, seed=1, steps=3)
    assert ids.shape == (3, 5, 4) and w.shape == (3, 5, 4)
    assert all(len(set(r.tolist())) == 4 for r in ids.reshape(-1, 4))
    assert np.allclose(w.sum(-1).numpy(), 1.0)


def test_tiny_run_fills_every_row(monkeypatch):
    monkeypatch.setitem(bench.MODEL_SHAPES, "tiny", (64, 64, 16, 4))
    monkeypatch.setattr(bench, "MIN_WORKING_SET", 1 << 20)
    bw, rows = bench.bench_moe(["tiny"], {"decode": [1], "prefill": [8]}, threads=1, passes=1,
                               l3_bytes=1 << 16, free_bytes=1 << 30, dtypes=("bfloat16", "int4"))
    assert bw > 0 and len(rows) == 4
    for r in rows:
        assert r.us_per_layer > 0 and r.gbps >= 0 and r.bandwidth_gbps == round(bw, 1)
        assert set(r.phases_us) >= {"gate_up", "down"}
        assert (r.torch_ratio is not None) == (r.dtype == "bfloat16")
    with pytest.raises(ValueError, match="unknown expert dtype"):
        bench.bench_moe(["tiny"], dtypes=("int3",), threads=1)
    with pytest.raises(ValueError, match="group 48: a quantization group is a positive multiple of 32"):
        bench.bench_moe(["tiny"], dtypes=("int4",), group=48, threads=1)


def test_group_option_names_the_rows(monkeypatch):
    monkeypatch.setitem(bench.MODEL_SHAPES, "tiny", (64, 64, 16, 4))
    monkeypatch.setattr(bench, "MIN_WORKING_SET", 1 << 20)
    _, rows = bench.bench_moe(["tiny"], {"decode": [1]}, threads=1, passes=1, with_torch=False, l3_bytes=1 << 16,
                              free_bytes=1 << 30, dtypes=("bfloat16", "int4", "int4-bf16act"), group=32)
    assert [r.dtype for r in rows] == ["bfloat16", "int4-g32", "int4-bf16act-g32"]
    assert rows[1].kernel.endswith("+int8") == lk_has_vnni() and not rows[2].kernel.endswith("+int8")


def lk_has_vnni():
    from lvllm_cli import _lk_moe as lk

    return lk.isa_supported("avx512_bf16")


def test_kernel_microbench_entry_points_time_and_refuse_bad_shapes():
    from lvllm_cli import _lk_moe as lk

    assert lk.kernel_ns("scalar", "bfloat16", 1, 64, 2) > 0
    for kind in ("int4", "fp8"):
        assert lk.qkernel_ns("scalar", kind, 2, 128, 64, 2) > 0
    # int4 on int8 activations exists only where the family has an int8 dot product (VNNI).
    assert lk.qkernel_ns("scalar", "int4_int8", 1, 128, 32, 2) == -1
    if lk.isa_supported("avx512_bf16"):
        assert lk.qkernel_ns("avx512_bf16", "int4_int8", 3, 128, 32, 2) > 0
    with pytest.raises(ValueError, match="kind must be int4, int4_int8 or fp8"):
        lk.qkernel_ns("scalar", "int8", 1, 128, 32)
    with pytest.raises(ValueError, match="G dividing K"):
        lk.qkernel_ns("scalar", "int4", 1, 128, 96)
    with pytest.raises(ValueError, match="unknown ISA"):
        lk.qkernel_ns("sse9", "int4", 1, 128, 32)


def test_layers_over_cache_is_4x_l3_and_2_layers_within_free_ram():
    mib = 1 << 20
    assert bench.layers_over_cache(100 * mib, 105 * mib, 100 << 30) == 5  # ceil(4 x 105 / 100)
    assert bench.layers_over_cache(1 << 30, 32 * mib, 100 << 30) == 2  # never fewer than 2 layers
    assert bench.layers_over_cache(100 * mib, 105 * mib, 1 << 30) == 3  # 30 % of 1 GiB holds 3
    with pytest.raises(MemoryError, match="one layer needs"):
        bench.layers_over_cache(1 << 30, 32 * mib, 2 << 30)


@pytest.mark.parametrize("dtype, group", [("bfloat16", 0), ("int4", 64), ("fp8", 0)])
def test_format_bench_at_tiny_shapes(dtype, group):
    r = bench.bench_moe_format(256, 128, 8, 2, dtype, group, 1, None, 0.05, 16, l3_bytes=1 << 20, free_bytes=1 << 30)
    per_weight = {"bfloat16": 2, "int4": 0.5, "fp8": 1}[dtype]
    scales = 0 if dtype == "bfloat16" else 2 * (2 * 128 * (256 // group if group else 1) + 256 * (128 // group if group else 1))
    assert r["layer_bytes"] == 8 * (3 * 256 * 128 * per_weight) + 8 * scales
    assert r["layers"] == max(2, -(-4 * (1 << 20) // r["layer_bytes"]))
    assert (r["dtype"], r["group"], r["threads"], r["prefill_tokens"]) == (dtype, group, 1, 16)
    assert r["decode_us"] > 0 and r["prefill_us"] > 0
