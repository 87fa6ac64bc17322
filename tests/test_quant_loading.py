"""Quantized checkpoints through the plugin's CPU side (quant_loading + CpuExperts), without vLLM:
checkpoint tensors written here from the published layouts (fp8, compressed-tensors, GPTQ, AWQ),
handed over one projection and one kind at a time in random order, sliced for two tensor-parallel
ranks; the two ranks' outputs must sum to the float64 reference on the dequantized weights.  Also:
which vLLM methods are taken or refused, and what an incomplete or unsupported checkpoint says.

The stand-ins for vLLM 0.26's methods carry the class name and the attributes quant_loading reads:
AutoGPTQMoEMethod / AutoAWQMoEMethod / MoeWNA16Method keep their config in `quant_config`
(AutoGPTQConfig: weight_bits, group_size, desc_act, is_sym, full_config; AutoAWQConfig: weight_bits,
group_size, zero_point, full_config; MoeWNA16Config: linear_quant_method, weight_bits, group_size,
has_zp, full_config)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lvllm_cli import _lk_moe as lk
from lvllm_cli.moe import plugin_core
from lvllm_cli.moe import quant_loading as ql
from lvllm_cli.moe.placement import Group
from lvllm_cli.moe.quant_formats import UnsupportedQuantization
from moe_reference import (e4m3_ref, pack_awq, pack_awq_zeros, pack_gptq, pack_gptq_zeros, pack_nibbles_ct,
                           layer_reference, reference_moe, rel_err)

LAYER = "model.layers.5.mlp.experts"


def vllm_method(name, **attrs):
    """An object that looks to quant_loading like vLLM's method `name` (type name + attributes)."""
    return type(name, (), attrs)()


FP8_BLOCK = vllm_method("Fp8MoEMethod", weight_block_size=[128, 128])
FP8_CHANNEL = vllm_method("CompressedTensorsW8A8Fp8MoEMethod", weight_block_size=None)
INT4_G32 = vllm_method("CompressedTensorsWNA16MarlinMoEMethod", num_bits=4, symmetric=True, actorder=None,
                       strategy="group", group_size=32)
INT4_CHANNEL = vllm_method("CompressedTensorsWNA16MoEMethod", num_bits=4, symmetric=True, actorder="static",
                           strategy="channel", group_size=None)


def gptq_method(bits=4, group=32, sym=True, desc_act=False, checkpoint_format="gptq", cls="AutoGPTQMoEMethod"):
    full = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": checkpoint_format}
    if cls == "MoeWNA16Method":
        cfg = SimpleNamespace(linear_quant_method="gptq", weight_bits=bits, group_size=group, has_zp=not sym,
                              full_config=full)
    else:
        cfg = SimpleNamespace(weight_bits=bits, group_size=group, desc_act=desc_act, is_sym=sym, full_config=full)
    return vllm_method(cls, quant_config=cfg)


def awq_method(bits=4, group=32, zero_point=True, version="gemm", cls="AutoAWQMoEMethod"):
    full = {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": zero_point, "version": version}
    if cls == "MoeWNA16Method":
        cfg = SimpleNamespace(linear_quant_method="awq", weight_bits=bits, group_size=group, has_zp=zero_point,
                              full_config=full)
    else:
        cfg = SimpleNamespace(weight_bits=bits, group_size=group, zero_point=zero_point, full_config=full)
    return vllm_method(cls, quant_config=cfg)


GPTQ_G32 = gptq_method()
GPTQ_V2_CHANNEL = gptq_method(group=-1, checkpoint_format="gptq_v2")
GPTQ_WNA16_G64 = gptq_method(group=64, cls="MoeWNA16Method")
AWQ_G32 = awq_method()
AWQ_WNA16_G64 = awq_method(group=64, cls="MoeWNA16Method")


@pytest.fixture()
def experts(monkeypatch, tmp_path):
    monkeypatch.setattr("lvllm_cli.moe.layer.default_groups", lambda: [Group(-1, (-1,)), Group(-1, (-1,))])
    return plugin_core.CpuExperts({"LVLLM_METRICS_DIR": str(tmp_path)}, rank=0, world=1, max_tokens=16)


def checkpoint_projection(method, out, n_in, rng):
    """(checkpoint tensors {suffix: tensor}, dense float64 weights) of one expert projection."""
    name = type(method).__name__
    if name == "Fp8MoEMethod":
        codes = rng.integers(0, 256, size=(out, n_in), dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x40  # no NaN
        scale = (rng.random((-(-out // 128), -(-n_in // 128))) * 0.02 + 0.001).astype(np.float32)
        rows = np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)[:out, :n_in]
        w = torch.from_numpy(codes).view(torch.float8_e4m3fn)
        return {"weight": w, "weight_scale_inv": torch.from_numpy(scale)}, e4m3_ref(codes) * rows
    if name == "CompressedTensorsW8A8Fp8MoEMethod":
        codes = rng.integers(0, 256, size=(out, n_in), dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x40
        scale = (rng.random((out, 1)) * 0.02 + 0.001).astype(np.float32)
        w = torch.from_numpy(codes).view(torch.float8_e4m3fn)
        return {"weight": w, "weight_scale": torch.from_numpy(scale), "input_scale": torch.ones(1)}, e4m3_ref(codes) * scale
    if name in ("CompressedTensorsWNA16MarlinMoEMethod", "CompressedTensorsWNA16MoEMethod"):
        group = method.group_size or n_in
        codes, scale, dense = int4_projection(out, n_in, group, torch.bfloat16, rng)
        tensors = {"weight_packed": torch.from_numpy(pack_nibbles_ct(codes)), "weight_scale": scale,
                   "weight_shape": torch.tensor([out, n_in])}
        return tensors, dense
    return gptq_awq_projection(method, out, n_in, rng)


def int4_projection(out, n_in, group, scale_dtype, rng):
    """Random codes [out, in] in [-8, 7], scales [out, in/group] and the dense weights they stand for."""
    codes = rng.integers(-8, 8, size=(out, n_in), dtype=np.int8)
    scale = torch.from_numpy((rng.random((out, n_in // group)) * 0.03 + 0.002).astype(np.float32)).to(scale_dtype)
    return codes, scale, codes * np.repeat(scale.float().numpy().astype(np.float64), group, axis=1)


def packing_of(method):
    name = type(method).__name__
    if name == "MoeWNA16Method":
        return method.quant_config.linear_quant_method
    return {"AutoGPTQMoEMethod": "gptq", "AutoAWQMoEMethod": "awq"}[name]


def gptq_awq_projection(method, out, n_in, rng):
    """One projection as AutoGPTQ (v1 or v2) or AutoAWQ GEMM store it: fp16 scales [in/G, out], zero points 8."""
    cfg = method.quant_config
    group = n_in if cfg.group_size == -1 else cfg.group_size
    codes, scale, dense = int4_projection(out, n_in, group, torch.float16, rng)
    groups = n_in // group
    if packing_of(method) == "gptq":
        stored = 8 if cfg.full_config.get("checkpoint_format") == "gptq_v2" else 7
        tensors = {"qweight": pack_gptq(codes), "qzeros": pack_gptq_zeros(np.full((groups, out), stored)),
                   "scales": scale.T.contiguous(), "g_idx": (np.arange(n_in) // group).astype(np.int32)}
    else:
        tensors = {"qweight": pack_awq(codes), "qzeros": pack_awq_zeros(np.full((groups, out), 8)),
                   "scales": scale.T.contiguous()}
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}, dense


def checkpoint_layer(method, E, H, I, seed):
    """Every tensor vLLM's loader would hand over: (weight_name, shard_id, expert, tensor), and w13/w2 dense."""
    rng = np.random.default_rng(seed)
    w13, w2, items = np.zeros((E, 2 * I, H)), np.zeros((E, H, I)), []
    for e in range(E):
        for shard, (out, n_in) in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            tensors, dense = checkpoint_projection(method, out, n_in, rng)
            if shard == "w2":
                w2[e] = dense
            else:
                w13[e, (0 if shard == "w1" else I):][:I] = dense
            fused = "w2" if shard == "w2" else "w13"
            items += [(f"{LAYER}.{fused}_{suffix}", shard, e, t) for suffix, t in tensors.items()]
    rng.shuffle(items)  # shards in any order, codes and scales apart
    return items, w13, w2


def load_rank(experts, method, items, E, H, I, tp_rank, tp_size):
    """What the plugin's weight loader does for one rank."""
    scheme = ql.scheme_for(method, LAYER)
    layer = experts.new_layer(LAYER, E, H, I // tp_size, "", scheme=scheme)
    for weight_name, shard, e, t in items:
        what = ql.role(weight_name, scheme)
        if what is not None:
            part = ql.SHARD_PARTS[shard]
            experts.add_quantized(LAYER, e, part, what, ql.rank_slice(t, part, tp_rank, tp_size,
                                                                      transposed=scheme.transposed))
    experts.finish_layer(LAYER, dummy=False, seed=0)
    return layer


def method_id(m):
    cfg = getattr(m, "quant_config", None)
    if cfg is None:
        return type(m).__name__
    return "-".join([type(m).__name__, *([cfg.linear_quant_method] if hasattr(cfg, "linear_quant_method") else []),
                     f"g{cfg.group_size}"])


@pytest.mark.parametrize("method", [FP8_BLOCK, FP8_CHANNEL, INT4_G32, INT4_CHANNEL, GPTQ_G32, GPTQ_V2_CHANNEL,
                                    GPTQ_WNA16_G64, AWQ_G32, AWQ_WNA16_G64], ids=method_id)
@pytest.mark.parametrize("tp_size", [1, 2])
def test_ranks_sum_to_the_dequantized_reference(experts, method, tp_size):
    E, H, I, M, k = 6, 256, 256, 9, 2
    items, w13, w2 = checkpoint_layer(method, E, H, I, seed=int(np.random.default_rng().integers(1 << 30)))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, H, generator=g)
    ids = torch.argsort(torch.rand(M, E, generator=g), dim=1)[:, :k].to(torch.int32).contiguous()
    tw = torch.rand(M, k, generator=g)
    total = np.zeros((M, H))
    for rank in range(tp_size):
        layer = load_rank(experts, method, items, E, H, I, rank, tp_size)
        assert layer.complete and layer.weight_format in ("int4", "fp8_e4m3")
        total += layer.forward(x, ids, tw).double().numpy()
    ref, tol = layer_reference(layer, x.double().numpy(), w13, w2, ids.numpy(), tw.numpy())
    assert rel_err(total, ref) <= tol


def test_dummy_quantized_layer_is_filled(experts):
    layer = experts.new_layer(LAYER, 4, 128, 64, "", scheme=ql.scheme_for(INT4_G32, LAYER))
    experts.finish_layer(LAYER, dummy=True, seed=plugin_core.dummy_seed(LAYER))
    out = layer.forward(torch.randn(3, 128), torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32), torch.rand(3, 2))
    assert layer.complete and 0 < out.abs().max().item() < 1e-3


def _load_without_up_piece(experts, method, suffix, E, H, I, seed):
    """Load a whole layer except expert 1's up-projection tensor `suffix` (e.g. w13_qzeros)."""
    items, _, _ = checkpoint_layer(method, E, H, I, seed=seed)
    kept = [it for it in items if not (it[0].endswith(suffix) and it[1] == "w3" and it[2] == 1)]
    load_rank(experts, method, kept, E, H, I, 0, 1)


def test_codes_without_scales_are_named(experts):
    with pytest.raises(RuntimeError, match=r"codes without scales.*expert 1 up has codes only"):
        _load_without_up_piece(experts, FP8_BLOCK, "w13_weight_scale_inv", 3, 128, 128, seed=1)


def test_wrong_shapes_name_the_projection(experts):
    scheme = ql.scheme_for(FP8_BLOCK, LAYER)
    experts.new_layer(LAYER, 2, 128, 128, "", scheme=scheme)
    experts.add_quantized(LAYER, 0, "gate", "scales", torch.ones(1, 1))
    with pytest.raises(UnsupportedQuantization, match=r"experts\.0\.gate_proj: fp8 weight of shape \(128, 64\)"):
        experts.add_quantized(LAYER, 0, "gate", "codes", torch.zeros(128, 64, dtype=torch.uint8).view(torch.float8_e4m3fn))
    scheme = ql.scheme_for(INT4_G32, LAYER)
    experts.new_layer(LAYER, 2, 128, 128, "", scheme=scheme)
    experts.add_quantized(LAYER, 1, "down", "codes", torch.zeros(128, 16, dtype=torch.int32))
    with pytest.raises(UnsupportedQuantization, match=r"experts\.1\.down_proj: scales have shape \(128, 2\)"):
        experts.add_quantized(LAYER, 1, "down", "scales", torch.ones(128, 2))


def test_schemes_taken():
    s = ql.scheme_for(FP8_BLOCK, LAYER)
    assert (s.kind, s.group, s.block_rows, s.codes) == ("fp8", 128, 128, "weight")
    s = ql.scheme_for(FP8_CHANNEL, LAYER)
    assert (s.kind, s.group, s.block_rows) == ("fp8", 0, 0)
    s = ql.scheme_for(INT4_G32, LAYER)
    assert (s.kind, s.group, s.codes) == ("int4", 32, "weight_packed")
    assert ql.scheme_for(INT4_CHANNEL, LAYER).group == 0


@pytest.mark.parametrize("method, message", [
    (vllm_method("CompressedTensorsWNA16MarlinMoEMethod", num_bits=8, symmetric=True, actorder=None,
                 strategy="group", group_size=128), r"8-bit integer experts"),
    (vllm_method("CompressedTensorsWNA16MarlinMoEMethod", num_bits=4, symmetric=False, actorder=None,
                 strategy="group", group_size=128), r"asymmetric int4 experts .*LVLLM_GPU_LAYERS"),
    (vllm_method("CompressedTensorsWNA16MarlinMoEMethod", num_bits=4, symmetric=True, actorder="group",
                 strategy="group", group_size=128), r"activation reordering \(actorder=group"),
    (vllm_method("CompressedTensorsWNA16MoEMethod", num_bits=4, symmetric=True, actorder=None,
                 strategy="group", group_size=48), r"group size 48"),
    (vllm_method("Fp8MoEMethod", weight_block_size=[128, 48]), r"128x48"),
    (vllm_method("AWQMarlinMoEMethod"), r"AWQMarlinMoEMethod experts cannot run on the CPU.*LVLLM_GPU_LAYERS"),
])
def test_schemes_refused_with_the_layer_and_format(method, message):
    with pytest.raises(UnsupportedQuantization, match=message) as info:
        ql.scheme_for(method, LAYER)
    assert LAYER in str(info.value)


def test_roles():
    fp8, int4 = ql.scheme_for(FP8_BLOCK, LAYER), ql.scheme_for(INT4_G32, LAYER)
    assert ql.role(f"{LAYER}.w13_weight", fp8) == "codes"
    assert ql.role(f"{LAYER}.w2_weight_scale_inv", fp8) == "scales"
    assert ql.role(f"{LAYER}.w13_input_scale", fp8) is None
    assert ql.role(f"{LAYER}.w2_weight_packed", int4) == "codes"
    assert ql.role(f"{LAYER}.w13_weight_shape", int4) is None
    with pytest.raises(UnsupportedQuantization, match=r"w13_weight_zero_point.*'weight_zero_point'"):
        ql.role(f"{LAYER}.w13_weight_zero_point", int4)
    with pytest.raises(UnsupportedQuantization, match="not a w13_/w2_ expert parameter"):
        ql.role(f"{LAYER}.e_score_correction_bias", int4)


def test_rank_slice_follows_vllm_sharding():
    t = torch.arange(8 * 6).view(8, 6)
    assert torch.equal(torch.cat([ql.rank_slice(t, "gate", r, 2) for r in range(2)], dim=0), t)
    assert torch.equal(torch.cat([ql.rank_slice(t, "down", r, 3) for r in range(3)], dim=1), t)
    assert ql.rank_slice(t, "up", 1, 2).shape == (4, 6)
    per_channel_down = torch.ones(8, 1)
    assert ql.rank_slice(per_channel_down, "down", 1, 2) is per_channel_down
    scalar = torch.tensor(0.5)
    assert ql.rank_slice(scalar, "gate", 1, 2) is scalar
    with pytest.raises(UnsupportedQuantization, match="does not split evenly over 4"):
        ql.rank_slice(t, "down", 0, 4)


@pytest.mark.parametrize("method", [FP8_BLOCK, INT4_G32, AWQ_G32], ids=method_id)
def test_widened_to_bf16_at_load_when_asked(monkeypatch, tmp_path, method):
    monkeypatch.setattr("lvllm_cli.moe.layer.default_groups", lambda: [Group(-1, (-1,))])
    E, H, I, M, k = 4, 256, 128, 7, 2
    items, w13, w2 = checkpoint_layer(method, E, H, I, seed=int(np.random.default_rng().integers(1 << 30)))
    outs = {}
    for flag in ("0", "1"):
        experts = plugin_core.CpuExperts({"LVLLM_METRICS_DIR": str(tmp_path), "LVLLM_EXPERTS_BF16": flag},
                                         rank=0, world=1, max_tokens=16)
        layer = load_rank(experts, method, items, E, H, I, 0, 1)
        assert layer.weight_format == ("bfloat16" if flag == "1" else ql.scheme_for(method, LAYER).kind.replace("fp8", "fp8_e4m3"))
        outs[flag] = layer
    assert outs["1"].packed_bytes > 1.8 * outs["0"].packed_bytes  # 2 bytes per weight instead of 0.5-1
    g = torch.Generator().manual_seed(9)
    x = torch.randn(M, H, generator=g)
    ids = torch.argsort(torch.rand(M, E, generator=g), dim=1)[:, :k].to(torch.int32).contiguous()
    tw = torch.rand(M, k, generator=g)
    ref = reference_moe(x.double().numpy(), w13, w2, ids.numpy(), tw.numpy())
    assert rel_err(outs["1"].forward(x, ids, tw).double().numpy(), ref) <= 1e-2


def test_bad_widen_setting_is_named(tmp_path):
    experts = plugin_core.CpuExperts({"LVLLM_METRICS_DIR": str(tmp_path), "LVLLM_EXPERTS_BF16": "yes"},
                                     rank=0, world=1, max_tokens=4)
    with pytest.raises(ValueError, match=r"LVLLM_EXPERTS_BF16='yes': use 1"):
        experts.new_layer(LAYER, 2, 128, 64, "", scheme=ql.scheme_for(INT4_G32, LAYER))


def test_int4_activations_setting(monkeypatch, tmp_path):
    monkeypatch.setattr("lvllm_cli.moe.layer.default_groups", lambda: [Group(-1, (-1,))])
    vnni = lk.isa_supported("avx512_bf16")
    for value, int8 in (("", vnni), ("int8", vnni), ("bf16", False)):
        experts = plugin_core.CpuExperts({"LVLLM_METRICS_DIR": str(tmp_path), "LVLLM_INT4_ACTIVATIONS": value},
                                         rank=0, world=1, max_tokens=4)
        assert experts.new_layer(LAYER, 2, 128, 64, "", scheme=ql.scheme_for(INT4_G32, LAYER)).int8_activations == int8
    experts = plugin_core.CpuExperts({"LVLLM_METRICS_DIR": str(tmp_path), "LVLLM_INT4_ACTIVATIONS": "int4"},
                                     rank=0, world=1, max_tokens=4)
    with pytest.raises(ValueError, match=r"LVLLM_INT4_ACTIVATIONS='int4': use int8 \(the default\) or bf16"):
        experts.new_layer(LAYER, 2, 128, 64, "", scheme=ql.scheme_for(INT4_G32, LAYER))


# --- GPTQ / AWQ ----------------------------------------------------------------------------------

def test_gptq_awq_schemes_taken():
    s = ql.scheme_for(GPTQ_G32, LAYER)
    assert (s.kind, s.group, s.packing, s.codes, s.zeros, s.g_idx, s.gptq_v2) == \
        ("int4", 32, "gptq", "qweight", "qzeros", "g_idx", False)
    assert s.transposed and s.pieces == ("codes", "scales", "zeros")
    s = ql.scheme_for(GPTQ_V2_CHANNEL, LAYER)
    assert (s.group, s.gptq_v2) == (0, True)
    s = ql.scheme_for(GPTQ_WNA16_G64, LAYER)
    assert (s.packing, s.group) == ("gptq", 64)
    s = ql.scheme_for(AWQ_G32, LAYER)
    assert (s.kind, s.group, s.packing, s.zeros, s.g_idx) == ("int4", 32, "awq", "qzeros", "")
    s = ql.scheme_for(AWQ_WNA16_G64, LAYER)
    assert (s.packing, s.group) == ("awq", 64)
    for fp8_or_ct in (FP8_BLOCK, INT4_G32):
        s = ql.scheme_for(fp8_or_ct, LAYER)
        assert not s.transposed and s.pieces == ("codes", "scales")


@pytest.mark.parametrize("method, message", [
    (gptq_method(bits=8), r"8-bit integer experts \(GPTQ, AutoGPTQMoEMethod\).*LVLLM_GPU_LAYERS"),
    (awq_method(bits=8, cls="MoeWNA16Method"), r"8-bit integer experts \(AWQ, MoeWNA16Method\)"),
    (gptq_method(sym=False, cls="MoeWNA16Method"), r"asymmetric GPTQ experts \(sym=false.*LVLLM_GPU_LAYERS"),
    (gptq_method(desc_act=True), r"activation reordering \(desc_act=true, AutoGPTQMoEMethod\).*desc_act=false"),
    (gptq_method(desc_act=True, cls="MoeWNA16Method"), r"activation reordering \(desc_act=true, MoeWNA16Method\)"),
    (gptq_method(group=48), r"int4 group size 48 \(GPTQ, AutoGPTQMoEMethod\).*multiple of 32"),
    (awq_method(group=16), r"int4 group size 16 \(AWQ, AutoAWQMoEMethod\)"),
    (awq_method(zero_point=False), r"AWQ without zero points \(zero_point=false"),
    (awq_method(version="gemv"), r"AWQ version 'gemv' \(AutoAWQMoEMethod\).*GEMM"),
    (vllm_method("MoeWNA16Method", quant_config=SimpleNamespace(linear_quant_method="bnb", weight_bits=4,
                                                                group_size=64, has_zp=False, full_config={})),
     r"MoeWNA16Method over 'bnb' checkpoints"),
])
def test_gptq_awq_schemes_refused_with_the_layer_and_format(method, message):
    with pytest.raises(UnsupportedQuantization, match=message) as info:
        ql.scheme_for(method, LAYER)
    assert LAYER in str(info.value)


def test_gptq_per_channel_act_order_is_no_reordering():
    """desc_act with one scale per row reorders nothing (vLLM clears it too): taken."""
    assert ql.scheme_for(gptq_method(group=-1, desc_act=True, cls="MoeWNA16Method"), LAYER).group == 0


def test_gptq_awq_roles():
    gptq, awq = ql.scheme_for(GPTQ_G32, LAYER), ql.scheme_for(AWQ_G32, LAYER)
    assert [ql.role(f"{LAYER}.{n}", gptq) for n in ("w13_qweight", "w2_scales", "w13_qzeros", "w2_g_idx")] == \
        ["codes", "scales", "zeros", "g_idx"]
    assert [ql.role(f"{LAYER}.{n}", awq) for n in ("w2_qweight", "w13_scales", "w2_qzeros")] == ["codes", "scales", "zeros"]
    with pytest.raises(UnsupportedQuantization, match=r"w13_g_idx: the CPU experts \(int4, zero points 8.*AWQ GEMM"):
        ql.role(f"{LAYER}.w13_g_idx", awq)


def test_rank_slice_of_transposed_layouts_follows_vllm():
    """is_transposed flips vLLM's shard dim: gate/up [in, out] tensors are cut along dim 1, down [in, out]
    along dim 0; gate/up g_idx [H] is copied whole (_load_g_idx), down's g_idx [I] is cut."""
    H, I = 64, 32
    gate_qweight = torch.arange(H // 8 * I).view(H // 8, I)  # GPTQ [in/8, out]
    down_qweight = torch.arange(I // 8 * H).view(I // 8, H)
    assert torch.equal(torch.cat([ql.rank_slice(gate_qweight, "gate", r, 2, transposed=True) for r in range(2)], 1),
                       gate_qweight)
    assert ql.rank_slice(gate_qweight, "up", 1, 2, transposed=True).shape == (H // 8, I // 2)
    assert torch.equal(ql.rank_slice(down_qweight, "down", 1, 2, transposed=True), down_qweight[I // 16:])
    awq_gate = torch.arange(H * I // 8).view(H, I // 8)  # AWQ [in, out/8]: whole words of 8 outputs per rank
    assert torch.equal(ql.rank_slice(awq_gate, "gate", 1, 2, transposed=True), awq_gate[:, I // 16:])
    gate_g_idx, down_g_idx = torch.arange(H) // 32, torch.arange(I) // 8
    assert ql.rank_slice(gate_g_idx, "gate", 1, 2, transposed=True) is gate_g_idx
    assert torch.equal(ql.rank_slice(down_g_idx, "down", 1, 2, transposed=True), down_g_idx[I // 2:])
    per_channel_down = torch.ones(1, H)  # scales [1, out] of a group -1 checkpoint
    assert ql.rank_slice(per_channel_down, "down", 1, 2, transposed=True) is per_channel_down
    with pytest.raises(UnsupportedQuantization, match="does not split evenly over 3"):
        ql.rank_slice(gate_qweight, "gate", 0, 3, transposed=True)


def one_projection(method, part, H, I, seed=0):
    """The checkpoint tensors of one projection of `method` and its (out, in)."""
    out, n_in = (H, I) if part == "down" else (I, H)
    tensors, _ = checkpoint_projection(method, out, n_in, np.random.default_rng(seed))
    return tensors, out, n_in


def new_quant_layer(experts, method, E=3, H=128, I=64):
    experts.new_layer(LAYER, E, H, I, "", scheme=ql.scheme_for(method, LAYER))
    return E, H, I


@pytest.mark.parametrize("method, stored, message", [
    (AWQ_G32, 5, r"experts\.2\.down_proj\.qzeros: AWQ zero point 5 at group 1, column 13 \(1 of 256 are not 8"),
    (GPTQ_G32, 3, r"experts\.2\.down_proj\.qzeros: GPTQ \(stored as zero - 1\) zero point 4 at group 1, column 13"),
])
def test_asymmetric_zero_points_are_refused_with_the_tensor(experts, method, stored, message):
    E, H, I = new_quant_layer(experts, method)
    tensors, out, n_in = one_projection(method, "down", H, I)
    zeros = np.full((n_in // 32, out), 8 if method is AWQ_G32 else 7)
    zeros[1, 13] = stored
    tensors["qzeros"] = torch.from_numpy((pack_awq_zeros if method is AWQ_G32 else pack_gptq_zeros)(zeros))
    experts.add_quantized(LAYER, 2, "down", "codes", tensors["qweight"])
    experts.add_quantized(LAYER, 2, "down", "scales", tensors["scales"])
    with pytest.raises(UnsupportedQuantization, match=message + r".*symmetric.*LVLLM_GPU_LAYERS"):
        experts.add_quantized(LAYER, 2, "down", "zeros", tensors["qzeros"])


@pytest.mark.parametrize("part", ["gate", "down"])
def test_act_order_g_idx_is_refused(experts, part):
    E, H, I = new_quant_layer(experts, GPTQ_G32)
    n_in = I if part == "down" else H
    trivial = torch.from_numpy((np.arange(n_in) // 32).astype(np.int32))
    experts.add_quantized(LAYER, 0, part, "g_idx", trivial)
    experts.add_quantized(LAYER, 0, part, "g_idx", trivial + 2)  # a later TP rank's cut keeps global numbers
    act_order = torch.from_numpy((np.random.default_rng(1).permutation(n_in) // 32).astype(np.int32))
    with pytest.raises(UnsupportedQuantization, match=rf"experts\.1\.{part}_proj\.g_idx: GPTQ with activation "
                                                      r"reordering \(desc_act.*desc_act=false.*LVLLM_GPU_LAYERS"):
        experts.add_quantized(LAYER, 1, part, "g_idx", act_order)
    with pytest.raises(UnsupportedQuantization, match=r"g_idx of shape \(8,\), expected"):
        experts.add_quantized(LAYER, 1, part, "g_idx", trivial[:8])


@pytest.mark.parametrize("method", [GPTQ_G32, AWQ_G32], ids=method_id)
def test_missing_zero_points_are_reported(experts, method):
    with pytest.raises(RuntimeError, match=r"no zero points.*expert 1 up has codes/scales only, lacks zeros"):
        _load_without_up_piece(experts, method, "w13_qzeros", 3, 128, 64, seed=2)


def test_wrong_gptq_awq_shapes_name_the_tensor(experts):
    E, H, I = new_quant_layer(experts, GPTQ_G32)
    tensors, _, _ = one_projection(GPTQ_G32, "gate", H, I)
    experts.add_quantized(LAYER, 0, "gate", "scales", tensors["scales"])
    experts.add_quantized(LAYER, 0, "gate", "zeros", tensors["qzeros"])
    with pytest.raises(UnsupportedQuantization, match=r"experts\.0\.gate_proj\.qweight: GPTQ tensor of shape "
                                                      r"\(16, 32\), expected \(16, 64\)"):
        experts.add_quantized(LAYER, 0, "gate", "codes", tensors["qweight"][:, :32])
    E, H, I = new_quant_layer(experts, AWQ_G32)
    tensors, _, _ = one_projection(AWQ_G32, "down", H, I)
    experts.add_quantized(LAYER, 1, "down", "codes", tensors["qweight"])
    experts.add_quantized(LAYER, 1, "down", "scales", tensors["scales"])
    with pytest.raises(UnsupportedQuantization, match=r"experts\.1\.down_proj\.qzeros: AWQ tensor of shape "
                                                      r"\(1, 16\), expected \(2, 16\)"):
        experts.add_quantized(LAYER, 1, "down", "zeros", tensors["qzeros"][:1])
