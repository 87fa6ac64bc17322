"""lk_moe engine against the float64 reference, on every kernel family this CPU runs."""

from __future__ import annotations

import gc
import os

import numpy as np
import psutil
import pytest
import torch

from lvllm_cli import _lk_moe as lk
from lvllm_cli.moe import MoELayer, get_engine
from lvllm_cli.moe.placement import Group
from moe_reference import as_f64, random_problem, reference_moe, rel_err

ISAS = [isa for isa in ("scalar", "avx2", "avx512", "avx512_bf16", "amx") if lk.isa_supported(isa)]
BF16_TOL = 1e-2


def engine(isa, groups=1, threads=2):
    """Unpinned workers split into `groups` virtual nodes (the node split is testable on one node)."""
    per = [threads * g // groups for g in range(groups + 1)]
    spec = [Group(-1, (-1,) * (per[g + 1] - per[g])) for g in range(groups)]
    return get_engine(groups=spec, isa=isa)


def build(x_w13, w2, eng):
    return MoELayer(x_w13, w2, engine=eng)


# (M, k, E, H, I): decode, odd sizes (H, I not multiples of any tile), many experts, prefill sizes.
CASES = [
    (1, 1, 8, 64, 32),
    (3, 2, 8, 100, 70),
    (1, 8, 128, 256, 96),
    (64, 8, 128, 96, 80),
    (512, 10, 512, 64, 48),
    (1024, 8, 128, 64, 40),
    (1024, 2, 8, 160, 64),  # hundreds of tokens per expert: AMX tiles where available
    (70, 4, 8, 64, 96),  # ~35 tokens per expert: full and padded AMX tiles
    (40, 4, 8, 48, 64),  # ~20 per expert: one padded 32-row tile
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}k{}E{}H{}I{}".format(*c))
def test_matches_reference(isa, case):
    M, k, E, H, I = case
    seed = hash((isa, case)) % 2**31
    x, w13, w2, ids, tw = random_problem(M, k, E, H, I, seed=seed)
    groups = (1, 2, 4)[CASES.index(case) % 3]  # 1, 2 and 4 virtual nodes
    layer = MoELayer(w13, w2, engine=engine(isa, groups=groups, threads=max(groups, 2)))
    if isa == "amx":
        assert layer.kernel == "amx"
    out = layer.forward(x, ids, tw)
    assert out.dtype == x.dtype and out.shape == x.shape
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(as_f64(out), ref) <= BF16_TOL


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("groups,threads", [(1, 1), (1, 3), (2, 2), (2, 3), (4, 4), (4, 5)])
def test_threads_and_virtual_nodes(isa, groups, threads):
    x, w13, w2, ids, tw = random_problem(37, 4, 16, 96, 112, seed=threads * 10 + groups)
    layer = MoELayer(w13, w2, engine=engine(isa, groups, threads))
    # The split along I is visible and covers every row exactly once.
    spans = layer.slices
    assert len(spans) == groups
    assert sum(n for _, n in spans) == 112
    out = layer.forward(x, ids, tw)
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(as_f64(out), ref) <= BF16_TOL


@pytest.mark.parametrize("isa", ISAS)
def test_fp16_weights_and_fp32_activations(isa):
    x, w13, w2, ids, tw = random_problem(9, 3, 8, 80, 48, seed=7, wdtype=torch.float16, xdtype=torch.float32)
    layer = MoELayer(w13, w2, engine=engine(isa, 2, 2))
    assert layer.kernel != "avx512_bf16"  # no bf16 dot products on fp16 weights
    out = layer.forward(x, ids, tw)
    assert out.dtype == torch.float32
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(out.numpy(), ref) <= 1e-4  # fp16 weights, fp32 activations and output


@pytest.mark.parametrize("isa", ISAS)
def test_int64_ids_numpy_in_numpy_out(isa):
    x, w13, w2, ids, tw = random_problem(5, 2, 8, 64, 64, seed=3, xdtype=torch.float32)
    layer = MoELayer(w13, w2, engine=engine(isa))
    out = layer.forward(x.numpy(), ids.to(torch.int64).numpy(), tw.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(out, ref) <= BF16_TOL


def test_same_expert_twice_and_zero_weights():
    """Duplicate ids in a row add up; a zero routing weight contributes nothing."""
    x, w13, w2, _, _ = random_problem(4, 3, 8, 64, 32, seed=11)
    ids = torch.tensor([[1, 1, 2], [0, 0, 0], [7, 3, 7], [5, 6, 4]], dtype=torch.int32)
    tw = torch.tensor([[0.5, 0.25, 0.0], [1, 1, 1], [0.1, 0.2, 0.3], [0, 0, 0]], dtype=torch.float32)
    layer = MoELayer(w13, w2, engine=engine("scalar"))
    out = layer.forward(x, ids, tw)
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(as_f64(out), ref) <= BF16_TOL
    assert torch.count_nonzero(out[3]) == 0


def test_zero_tokens():
    _, w13, w2, _, _ = random_problem(1, 1, 8, 64, 32, seed=2)
    layer = MoELayer(w13, w2, engine=engine("scalar"))
    out = layer.forward(torch.zeros(0, 64, dtype=torch.bfloat16), torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2))
    assert out.shape == (0, 64)


@pytest.mark.parametrize("isa", ISAS)
def test_incremental_load_any_order(isa):
    """Parts arrive one by one, experts and parts shuffled (checkpoint shards), as gate/up/down or fused."""
    E, H, I = 12, 72, 40
    x, w13, w2, ids, tw = random_problem(20, 3, E, H, I, seed=5)
    layer = MoELayer.empty(E, H, I, "bfloat16", engine=engine(isa, 2, 2))
    rng = np.random.default_rng(0)
    jobs = [(e, p) for e in range(E) for p in ("gate", "up", "down")]
    jobs[:3] = [(0, "gate_up"), (0, "down"), (1, "gate_up")]
    for j in rng.permutation(len(jobs)):
        e, part = jobs[j]
        assert not layer.complete
        src = {"gate": w13[e, :I], "up": w13[e, I:], "gate_up": w13[e], "down": w2[e]}[part]
        layer.load_expert(e, part, src)
    for e in range(E):  # experts 0/1 got their fused part; every other part is in too
        layer.load_expert(e, "gate", w13[e, :I])
    assert layer.complete
    out = layer.forward(x, ids, tw)
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(as_f64(out), ref) <= BF16_TOL


def test_load_converts_float32_and_strided_rows():
    E, H, I = 4, 64, 32
    x, w13, w2, ids, tw = random_problem(6, 2, E, H, I, seed=9)
    layer = MoELayer.empty(E, H, I, "bfloat16", engine=engine("scalar"))
    for e in range(E):
        wide = torch.zeros(2 * I, H + 13, dtype=torch.float32)
        wide[:, :H] = w13[e].float()
        layer.load_expert(e, "gate_up", wide[:, :H])  # rows with a stride: allowed
        layer.load_expert(e, "down", w2[e].float().numpy())
    out = layer.forward(x, ids, tw)
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(as_f64(out), ref) <= BF16_TOL


def test_fill_random_only_fills_missing_and_is_deterministic():
    E, H, I = 6, 64, 32
    x, w13, w2, ids, tw = random_problem(8, 2, E, H, I, seed=4)
    full = MoELayer(w13, w2, engine=engine("scalar"))
    before = full.forward(x, ids, tw)
    full.fill_random(seed=1, scale=0.5)  # nothing missing: no change
    assert torch.equal(before, full.forward(x, ids, tw))

    a = MoELayer.empty(E, H, I, engine=engine("scalar"))
    b = MoELayer.empty(E, H, I, engine=engine("avx2" if "avx2" in ISAS else "scalar"))
    for layer in (a, b):
        layer.load_expert(0, "gate_up", w13[0])
        layer.fill_random(seed=3, scale=0.05)
        assert layer.complete
    oa, ob = a.forward(x, ids, tw), b.forward(x, ids, tw)
    assert torch.count_nonzero(oa) > 0
    assert rel_err(as_f64(oa), as_f64(ob)) <= BF16_TOL  # same seed, same weights, any kernel


# --- bad input: a Python exception naming the problem, never a crash ---------------------------

@pytest.fixture(scope="module")
def small():
    x, w13, w2, ids, tw = random_problem(4, 2, 8, 64, 32, seed=1)
    return MoELayer(w13, w2, engine=engine("scalar")), x, ids, tw


@pytest.mark.parametrize("bad", [-1, 8, 1 << 40])
def test_expert_id_out_of_range(small, bad):
    layer, x, ids, tw = small
    ids = ids.to(torch.int64).clone()
    ids[2, 1] = bad
    with pytest.raises(ValueError, match=r"topk_ids\[2, 1\].*not an expert id in \[0, 8\)"):
        layer.forward(x, ids, tw)


def test_wrong_dtypes(small):
    layer, x, ids, tw = small
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        layer.forward(x, ids.float(), tw)
    with pytest.raises(TypeError, match="hidden states must be bfloat16, float16 or float32"):
        layer.forward(x.to(torch.float64), ids, tw)
    with pytest.raises(TypeError, match="topk_weights must be float32"):
        layer.forward(x, ids, tw.to(torch.float64))
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        MoELayer(torch.zeros(2, 8, 4), torch.zeros(2, 4, 4), engine=engine("scalar"))


def test_wrong_shapes(small):
    layer, x, ids, tw = small
    with pytest.raises(ValueError, match=r"x must be \[tokens, 64\]"):
        layer.forward(x[:, :63], ids, tw)
    with pytest.raises(ValueError, match="one row per token"):
        layer.forward(x, ids[:3], tw[:3])
    with pytest.raises(ValueError, match="topk_weights"):
        layer.forward(x, ids, tw[:, :1].contiguous())
    with pytest.raises(ValueError, match=r"shape \(31, 64\), expected \(32, 64\)"):
        layer.load_expert(0, "gate", torch.zeros(31, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expert 8 out of range"):
        layer.load_expert(8, "down", torch.zeros(64, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="part must be one of"):
        layer.load_expert(0, "gate_proj", torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="w2 has shape"):
        MoELayer(torch.zeros(2, 8, 4, dtype=torch.bfloat16), torch.zeros(2, 4, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="experts must be positive"):
        MoELayer.empty(0, 64, 32)


def test_non_contiguous_and_foreign_devices(small):
    layer, x, ids, tw = small
    with pytest.raises(ValueError, match="contiguous rows"):
        layer.forward(x.t().contiguous().t(), ids, tw)
    with pytest.raises(ValueError, match="contiguous"):
        layer.forward(x, ids.t().contiguous().t(), tw)
    with pytest.raises(ValueError, match="on meta"):
        layer.forward(x.to("meta"), ids, tw)


def test_async_submit_wait_on_raw_pointers(small):
    layer, x, ids, tw = small
    out = torch.empty_like(x)
    layer.submit(x.data_ptr(), "bfloat16", ids.data_ptr(), False, tw.data_ptr(), 4, 2, out.data_ptr(), "bfloat16")
    layer.wait()
    assert torch.equal(out, layer.forward(x, ids, tw))


def test_async_path_skips_and_counts_bad_ids(small):
    layer, x, ids, tw = small
    bad = ids.clone()
    bad[0, 0] = 99
    out = torch.empty_like(x)
    before = layer.engine.stats()["invalid_ids"]
    layer.submit(x.data_ptr(), "bfloat16", bad.data_ptr(), False, tw.data_ptr(), 4, 2, out.data_ptr(), "bfloat16")
    layer.wait()
    assert layer.engine.stats()["invalid_ids"] == before + 1
    skipped = tw.clone()
    skipped[0, 0] = 0
    assert rel_err(as_f64(out), as_f64(layer.forward(x, ids, skipped))) < 1e-6


def test_soak_no_memory_growth():
    """Many calls of varying size: after warm-up the process does not grow."""
    x, w13, w2, ids, tw = random_problem(256, 8, 32, 128, 96, seed=12)
    layer = MoELayer(w13, w2, engine=engine(ISAS[-1], 2, 2))
    out = torch.empty_like(x)
    rng = np.random.default_rng(1)
    for _ in range(50):
        layer.forward(x, ids, tw, out=out)
    gc.collect()
    rss0 = psutil.Process(os.getpid()).memory_info().rss
    for _ in range(1500):
        m = int(rng.integers(1, 257))
        layer.forward(x[:m], ids[:m], tw[:m], out=out[:m])
    gc.collect()
    grown = psutil.Process(os.getpid()).memory_info().rss - rss0
    assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 1500 calls"
