"""Quantized checkpoints through the plugin's CPU side (quant_loading + CpuExperts), without vLLM:
checkpoint tensors written here from the published layouts, handed over one projection and one kind
at a time in random order, sliced for two tensor-parallel ranks; the two ranks' outputs must sum to
the float64 reference on the dequantized weights.  Also: which vLLM methods are taken or refused,
and what an incomplete checkpoint says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvllm_cli.moe import plugin_core
from lvllm_cli.moe import quant_loading as ql
from lvllm_cli.moe.placement import Group
from lvllm_cli.moe.quant_formats import UnsupportedQuantization
from moe_reference import e4m3_ref, pack_nibbles_ct, reference_moe, rel_err

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
    group = method.group_size or n_in
    codes = rng.integers(-8, 8, size=(out, n_in), dtype=np.int8)
    scale = torch.from_numpy((rng.random((out, n_in // group)) * 0.03 + 0.002).astype(np.float32)).to(torch.bfloat16)
    dense = codes * np.repeat(scale.float().numpy().astype(np.float64), group, axis=1)
    tensors = {"weight_packed": torch.from_numpy(pack_nibbles_ct(codes)), "weight_scale": scale,
               "weight_shape": torch.tensor([out, n_in])}
    return tensors, dense


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
            experts.add_quantized(LAYER, e, part, what, ql.rank_slice(t, part, tp_rank, tp_size))
    experts.finish_layer(LAYER, dummy=False, seed=0)
    return layer


@pytest.mark.parametrize("method", [FP8_BLOCK, FP8_CHANNEL, INT4_G32, INT4_CHANNEL], ids=lambda m: type(m).__name__)
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
    ref = reference_moe(x.double().numpy(), w13, w2, ids.numpy(), tw.numpy())
    assert rel_err(total, ref) <= 1e-2  # activations run in bf16, as in test_quant.py


def test_dummy_quantized_layer_is_filled(experts):
    layer = experts.new_layer(LAYER, 4, 128, 64, "", scheme=ql.scheme_for(INT4_G32, LAYER))
    experts.finish_layer(LAYER, dummy=True, seed=plugin_core.dummy_seed(LAYER))
    out = layer.forward(torch.randn(3, 128), torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32), torch.rand(3, 2))
    assert layer.complete and 0 < out.abs().max().item() < 1e-3


def test_codes_without_scales_are_named(experts):
    E, H, I = 3, 128, 128
    items, _, _ = checkpoint_layer(FP8_BLOCK, E, H, I, seed=1)
    kept = [it for it in items if not (it[0].endswith("w13_weight_scale_inv") and it[1] == "w3" and it[2] == 1)]
    with pytest.raises(RuntimeError, match=r"codes without scales.*expert 1 up has codes only"):
        load_rank(experts, FP8_BLOCK, kept, E, H, I, 0, 1)


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


@pytest.mark.parametrize("method", [FP8_BLOCK, INT4_G32], ids=lambda m: type(m).__name__)
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
