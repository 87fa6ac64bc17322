"""Quantized experts: the engine against the dequantized float64 reference, and the checkpoint
converters bit-exact against packings written here independently from the published layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvllm_cli import _lk_moe as lk
from lvllm_cli.moe import MoELayer, get_engine
from lvllm_cli.moe import quant_formats as qf
from lvllm_cli.moe.placement import Group
from moe_reference import DEQUANT_ROWS, e4m3_ref, pack_words, reference_moe, rel_err

ISAS = [isa for isa in ("scalar", "avx2", "avx512", "avx512_bf16", "amx") if lk.isa_supported(isa)]


def engine(isa, groups=1):
    return get_engine(groups=[Group(-1, (-1,))] * groups, isa=isa)


def random_quant(kind, rows, cols, group, rng):
    ng = -(-cols // group) if group else 1
    if kind == "int4":
        codes = rng.integers(-8, 8, size=(rows, cols), dtype=np.int8)
        vals = codes.astype(np.float64)
    else:
        codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaN
        vals = e4m3_ref(codes)
    scales = (rng.random((rows, ng)) * 0.03 + 0.002).astype(np.float32)
    dense = vals * np.repeat(scales.astype(np.float64), group or cols, axis=1)[:, :cols]
    return codes, scales, dense


def build(kind, group, E, H, I, isa, groups, seed, int8_activations=True):
    rng = np.random.default_rng(seed)
    layer = MoELayer.empty(E, H, I, kind, group_size=group, engine=engine(isa, groups),
                           int8_activations=int8_activations)
    w13 = np.zeros((E, 2 * I, H))
    w2 = np.zeros((E, H, I))
    for e in range(E):
        for part, (rows, cols) in (("gate_up", (2 * I, H)), ("down", (H, I))):
            codes, scales, dense = random_quant(kind, rows, cols, group, rng)
            layer.load_expert_quantized(e, part, codes, scales)
            (w13 if part == "gate_up" else w2)[e] = dense
    return layer, w13, w2


# (kind, group): int4 with AWQ/GPTQ group sizes and per channel; fp8 with 128x128-style blocks and per channel.
FORMATS = [("int4", 32), ("int4", 128), ("int4", 0), ("fp8", 128), ("fp8", 0)]


# Where int4 decode runs on int8 activations (VNNI).  The engine must not quietly fall back there.
INT8_ISAS = {"avx512_bf16", "amx"}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("M,k,groups", [(1, 4, 1), (5, 2, 2), (64, 4, 2)])  # 64x4 over 8 experts: dequantized-panel path
@pytest.mark.parametrize("int8", [False, True])
def test_quantized_layer_matches_dequantized_reference(isa, kind, group, M, k, groups, int8):
    E, H, I = 8, 200, 96  # H and I not multiples of 128: ragged last groups
    layer, w13, w2 = build(kind, group, E, H, I, isa, groups, seed=M * 7 + groups, int8_activations=int8)
    assert layer.weight_format == ("int4" if kind == "int4" else "fp8_e4m3")
    on_int8 = int8 and kind == "int4" and isa in INT8_ISAS
    assert layer.int8_activations == on_int8
    g = torch.Generator().manual_seed(M + 100 * int8)
    x = torch.randn(M, H, generator=g).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(M, E, generator=g), dim=1)[:, :k].to(torch.int32).contiguous()
    tw = torch.rand(M, k, generator=g)
    out = layer.forward(x, ids, tw).double().numpy()
    exact = reference_moe(x.double().numpy(), w13, w2, ids.numpy(), tw.numpy())
    if not on_int8:
        assert rel_err(out, exact) <= 1e-2
        return
    # The engine rounds exactly as the emulation does (up to fp32 sums and the bf16 output) ...
    emulated = reference_moe(x.double().numpy(), w13, w2, ids.numpy(), tw.numpy(), int8_below=DEQUANT_ROWS)
    assert rel_err(out, emulated) <= 5e-3
    # ... and int8 blocks of 16 cost about 1 % against the exact product (the int4 weights'
    # own rounding, against their source, is of order 10 %).
    assert rel_err(out, exact) <= 2.5e-2
    assert rel_err(emulated, exact) > 1e-3  # the emulation does round


def test_quantized_bytes_are_smaller():
    dense = MoELayer.empty(4, 256, 128, "bfloat16", engine=engine("scalar"))
    q4 = MoELayer.empty(4, 256, 128, "int4", group_size=128, engine=engine("scalar"))
    f8 = MoELayer.empty(4, 256, 128, "fp8", group_size=128, engine=engine("scalar"))
    # int4: 0.5 B/weight + fp16 scale per 128; fp8: 1 B/weight + the same scales.
    weights = 4 * 3 * 256 * 128
    assert dense.native.expert_bytes == weights * 2 // 4
    assert q4.native.expert_bytes == (weights // 2 + weights // 128 * 2) // 4
    assert f8.native.expert_bytes == (weights + weights // 128 * 2) // 4


def test_fill_random_quantized():
    for kind in ("int4", "fp8"):
        layer = MoELayer.empty(4, 64, 64, kind, group_size=32, engine=engine("scalar"))
        layer.fill_random(seed=2, scale=0.05)
        assert layer.complete
        x = torch.randn(3, 64).to(torch.bfloat16)
        out = layer.forward(x, torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32), torch.rand(3, 2))
        assert torch.isfinite(out.float()).all() and out.abs().max() > 0


def test_bad_quantized_input_is_named():
    layer = MoELayer.empty(2, 64, 32, "int4", group_size=32, engine=engine("scalar"))
    codes = np.zeros((32, 64), dtype=np.int8)
    codes[3, 5] = 9
    with pytest.raises(ValueError, match=r"int4 code 9 at \(3, 5\) is outside \[-8, 7\]"):
        layer.load_expert_quantized(0, "gate", codes, np.ones((32, 2), np.float32))
    with pytest.raises(ValueError, match=r"scales.*shape \(32, 3\), expected \(32, 2\)"):
        layer.load_expert_quantized(0, "gate", np.zeros((32, 64), np.int8), np.ones((32, 3), np.float32))
    with pytest.raises(TypeError, match="int4 codes must be int8"):
        layer.load_expert_quantized(0, "gate", np.zeros((32, 64), np.uint8), np.ones((32, 2), np.float32))
    with pytest.raises(ValueError, match="use load_expert"):
        MoELayer.empty(2, 64, 32, engine=engine("scalar")).load_expert_quantized(0, "gate", codes, np.ones((32, 2)))
    with pytest.raises(ValueError, match="use load_quantized"):
        layer.load_expert(0, "gate", torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiple of 32"):
        MoELayer.empty(2, 64, 32, "int4", group_size=48, engine=engine("scalar"))
    with pytest.raises(ValueError, match="take no group size"):
        MoELayer.empty(2, 64, 32, "bfloat16", group_size=32, engine=engine("scalar"))


# --- converters: packings written here from the published layouts ---------------------------------

@pytest.fixture()
def int4_weight():
    rng = np.random.default_rng(3)
    n_out, n_in, group = 48, 256, 128
    codes = rng.integers(-8, 8, size=(n_out, n_in), dtype=np.int8)
    scales = rng.random((n_out, n_in // group)).astype(np.float32) + 0.01
    return codes, scales, group


def test_compressed_tensors_round_trip(int4_weight):
    codes, scales, group = int4_weight
    n_out, n_in = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n_out, n_in // 8, 8)  # code + 8, 8 per word along in
    packed = pack_words(u)
    q = qf.from_compressed_tensors_int4(torch.from_numpy(packed), torch.from_numpy(scales).to(torch.bfloat16).float(),
                                        torch.tensor([n_out, n_in]), group=group)
    assert np.array_equal(q.codes, codes) and q.group == group
    assert np.allclose(q.scales, scales, rtol=1e-2)


def test_compressed_tensors_pads_odd_input(int4_weight):
    codes, scales, group = int4_weight
    codes = codes[:, :250]
    u = np.zeros((codes.shape[0], 256), np.uint8)
    u[:, :250] = codes + 8
    q = qf.from_compressed_tensors_int4(pack_words(u.reshape(codes.shape[0], 32, 8)), scales[:, :2],
                                        (codes.shape[0], 250), group=group)
    assert np.array_equal(q.codes, codes)


def test_gptq_round_trip(int4_weight):
    codes, scales, group = int4_weight
    n_out, n_in = codes.shape
    qu = (codes.T.astype(np.int16) + 8).astype(np.uint8)  # [in, out]
    qweight = pack_words(qu.reshape(n_in // 8, 8, n_out).transpose(0, 2, 1))  # nibble i of row r = in 8r+i
    zeros = np.full((n_in // group, n_out), 8 - 1, np.uint8)  # GPTQ v1 stores zero - 1
    qzeros = pack_words(zeros.reshape(n_in // group, n_out // 8, 8))
    g_idx = np.arange(n_in) // group
    q = qf.from_gptq_int4(qweight, qzeros, scales.T.copy(), g_idx, group=group)
    assert np.array_equal(q.codes, codes) and np.array_equal(q.scales, scales)
    q2 = qf.from_gptq_int4(qweight, pack_words(np.full((n_in // group, n_out // 8, 8), 8, np.uint8)), scales.T.copy(),
                           group=group, v2=True)
    assert np.array_equal(q2.codes, codes)


def test_gptq_refuses_act_order_and_asymmetric(int4_weight):
    codes, scales, group = int4_weight
    n_out, n_in = codes.shape
    qweight = np.zeros((n_in // 8, n_out), np.int32)
    sym = pack_words(np.full((n_in // group, n_out // 8, 8), 7, np.uint8))
    with pytest.raises(qf.UnsupportedQuantization, match="activation reordering"):
        qf.from_gptq_int4(qweight, sym, scales.T.copy(), np.random.default_rng(0).permutation(n_in) // group, group=group,
                          name="experts.3.up_proj")
    asym = pack_words(np.full((n_in // group, n_out // 8, 8), 3, np.uint8))
    with pytest.raises(qf.UnsupportedQuantization, match=r"experts\.3\.up_proj\.qzeros: GPTQ \(stored as zero - 1\) zero point 4 at group 0, column 0 .*asymmetric.*LVLLM_GPU_LAYERS"):
        qf.from_gptq_int4(qweight, asym, scales.T.copy(), group=group, name="experts.3.up_proj")


def test_awq_round_trip_and_asymmetric_refused(int4_weight):
    codes, scales, group = int4_weight
    n_out, n_in = codes.shape
    qu = (codes.T.astype(np.int16) + 8).astype(np.uint8)  # [in, out]
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: nibble i <- column 8j + order[i]
    qweight = pack_words(qu.reshape(n_in, n_out // 8, 8)[..., order])
    qzeros = pack_words(np.full((n_in // group, n_out // 8, 8), 8, np.uint8))
    q = qf.from_awq_int4(qweight, qzeros, scales.T.copy(), group=group)
    assert np.array_equal(q.codes, codes) and np.array_equal(q.scales, scales)
    with pytest.raises(qf.UnsupportedQuantization, match="asymmetric"):
        qf.from_awq_int4(qweight, pack_words(np.full((n_in // group, n_out // 8, 8), 5, np.uint8)), scales.T.copy(),
                         group=group)


def test_fp8_block_and_channel_scales():
    rng = np.random.default_rng(4)
    n_out, n_in = 200, 320  # ragged 128-blocks in both directions
    w = torch.from_numpy(rng.integers(0, 256, size=(n_out, n_in), dtype=np.uint8)).view(torch.float8_e4m3fn)
    blocks = rng.random((2, 3)).astype(np.float32)
    q = qf.from_fp8(w, blocks, block=(128, 128))
    assert q.group == 128 and q.codes.dtype == np.uint8
    assert np.array_equal(q.scales[:128], np.repeat(blocks[:1], 128, axis=0)) and np.array_equal(q.scales[128:, 1], np.full(72, blocks[1, 1]))
    dense = qf.dequantize(q)
    ref = e4m3_ref(w.view(torch.uint8).numpy()) * np.repeat(np.repeat(blocks, 128, axis=0), 128, axis=1)[:n_out, :n_in]
    finite = np.isfinite(ref)
    assert np.allclose(dense[finite], ref[finite], rtol=1e-6)
    per_channel = qf.from_fp8(w, rng.random((n_out, 1)).astype(np.float32), block=None)
    assert per_channel.group == 0 and per_channel.scales.shape == (n_out, 1)
    with pytest.raises(qf.UnsupportedQuantization, match="expected float8_e4m3fn"):
        qf.from_fp8(np.zeros((4, 4), np.float16), np.ones(1), block=None)
    with pytest.raises(qf.UnsupportedQuantization, match="block scales have shape"):
        qf.from_fp8(w, blocks[:1], block=(128, 128))


def test_e4m3_decoding_matches_torch():
    """The engine path and the reference decode every e4m3 byte as torch does."""
    b = np.arange(256, dtype=np.uint8)
    ours = e4m3_ref(b)
    theirs = torch.from_numpy(b).view(torch.float8_e4m3fn).float().numpy()
    ok = ~np.isnan(theirs)
    assert np.array_equal(ours[ok], theirs[ok])
    q = qf.Quantized(b.reshape(1, 256), np.ones((1, 1), np.float32), 0, "fp8")
    assert np.array_equal(qf.dequantize(q)[0][ok], theirs[ok])
