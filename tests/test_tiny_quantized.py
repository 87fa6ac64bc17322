"""The quantized tiny checkpoints the GPU end-to-end check serves: tensors written as the published
formats lay them out (decoded here independently), close to the bf16 weights they replace, the rest
of the checkpoint untouched, and readable by the plugin's loading path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lvllm_cli.moe import plugin_core
from lvllm_cli.moe import quant_loading as ql
from lvllm_cli.moe.placement import Group
from lvllm_cli.tiny_quantized import quantize_experts
from moe_reference import e4m3_ref, reference_moe, rel_err

E, H, I = 4, 256, 128


def write_checkpoint(d, seed):
    """Layer 0 per expert (one file), layer 1 fused (another file), attention weights, an index."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(2, E, 2 * I, H, generator=g) / 16).to(torch.bfloat16)
    w2 = (torch.randn(2, E, H, I, generator=g) / 11).to(torch.bfloat16)
    first = {"model.layers.0.self_attn.q_proj.weight": torch.randn(H, H, generator=g).to(torch.bfloat16)}
    for e in range(E):
        first[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = w13[0, e, :I].clone()
        first[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = w13[0, e, I:].clone()
        first[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = w2[0, e].clone()
    second = {"model.layers.1.mlp.experts.gate_up_proj": w13[1].clone(), "model.layers.1.mlp.experts.down_proj": w2[1].clone(),
              "lm_head.weight": torch.randn(64, H, generator=g).to(torch.bfloat16)}
    save_file(first, d / "model-00001-of-00002.safetensors")
    save_file(second, d / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                                            **{k: "model-00002-of-00002.safetensors" for k in second}}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 2}))
    return w13.double().numpy(), w2.double().numpy(), {**first, **second}


def read_all(d):
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def dequantize(t, fmt, base):
    """float64 [out, in] from the checkpoint tensors of one projection, decoded from the formats' definitions."""
    if fmt == "fp8":
        codes = t[f"{base}.weight"].view(torch.uint8).numpy()
        s = t[f"{base}.weight_scale_inv"].numpy().astype(np.float64)
        out, n_in = codes.shape
        return e4m3_ref(codes) * np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:out, :n_in]
    words = t[f"{base}.weight_packed"].numpy().view(np.uint32).astype(np.uint64)
    out, n_in = (int(v) for v in t[f"{base}.weight_shape"])
    codes = np.stack([(words >> np.uint64(4 * i)) & np.uint64(15) for i in range(8)], axis=-1).reshape(out, -1)[:, :n_in]
    s = t[f"{base}.weight_scale"].float().numpy().astype(np.float64)
    return (codes.astype(np.int64) - 8) * np.repeat(s, n_in // s.shape[1], axis=1)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_checkpoint(tmp_path, fmt):
    w13, w2, original = write_checkpoint(tmp_path, seed=int(np.random.default_rng().integers(1 << 30)))
    assert quantize_experts(tmp_path, fmt) == 2 * E * 3
    t = read_all(tmp_path)
    for key in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert torch.equal(t[key], original[key])
    assert "model.layers.1.mlp.experts.gate_up_proj" not in t and "model.layers.1.mlp.experts.down_proj" not in t
    if fmt == "int4":
        assert not [k for k in t if ".experts." in k and k.endswith(".weight")]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    for name, fname in index["weight_map"].items():
        with safe_open(tmp_path / fname, "pt") as f:
            assert name in f.keys()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == {"fp8": "fp8", "int4": "compressed-tensors"}[fmt]
    if fmt == "fp8":
        assert t["model.layers.1.mlp.experts.2.up_proj.weight"].dtype == torch.float8_e4m3fn
        bound = 2.0**-4  # e4m3: 3 mantissa bits, relative to the block maximum at worst
    else:
        assert t["model.layers.1.mlp.experts.2.up_proj.weight_packed"].dtype == torch.int32
        bound = 0.5 / 7 + 2**-8  # half a step of max/7, plus the bf16 scale's rounding
    for layer in range(2):
        for e in range(E):
            for part, ref in (("gate", w13[layer, e, :I]), ("up", w13[layer, e, I:]), ("down", w2[layer, e])):
                deq = dequantize(t, fmt, f"model.layers.{layer}.mlp.experts.{e}.{part}_proj")
                assert np.abs(deq - ref).max() <= bound * np.abs(ref).max() * 1.01
                assert np.abs(deq - ref).mean() < 0.3 * bound * np.abs(ref).max()


@pytest.mark.parametrize("fmt, method", [
    ("fp8", type("Fp8MoEMethod", (), {"weight_block_size": [128, 128]})()),
    ("int4", type("CompressedTensorsWNA16MarlinMoEMethod", (), {"num_bits": 4, "symmetric": True, "actorder": None,
                                                                "strategy": "group", "group_size": 32})()),
])
def test_the_plugin_reads_what_the_writer_wrote(tmp_path, monkeypatch, fmt, method):
    monkeypatch.setattr("lvllm_cli.moe.layer.default_groups", lambda: [Group(-1, (-1,))])
    write_checkpoint(tmp_path, seed=7)
    quantize_experts(tmp_path, fmt)
    t = read_all(tmp_path)
    experts = plugin_core.CpuExperts({"LVLLM_METRICS_DIR": str(tmp_path)}, rank=0, world=1, max_tokens=8)
    name = "model.layers.1.mlp.experts"
    scheme = ql.scheme_for(method, name)
    layer = experts.new_layer(name, E, H, I, "", scheme=scheme)
    for key, tensor in t.items():  # the mapping vLLM's qwen3_moe load_weights applies
        if not key.startswith(name + "."):
            continue
        e, proj, suffix = key[len(name) + 1:].split(".")
        shard = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
        what = ql.role(f"{name}.{'w2' if shard == 'w2' else 'w13'}_{suffix}", scheme)
        if what:
            experts.add_quantized(name, int(e), ql.SHARD_PARTS[shard], what, tensor)
    experts.finish_layer(name, dummy=False, seed=0)
    w13 = np.stack([np.concatenate([dequantize(t, fmt, f"{name}.{e}.gate_proj"), dequantize(t, fmt, f"{name}.{e}.up_proj")])
                    for e in range(E)])
    w2 = np.stack([dequantize(t, fmt, f"{name}.{e}.down_proj") for e in range(E)])
    x = torch.randn(5, H)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [1, 3]], dtype=torch.int32)
    tw = torch.rand(5, 2)
    out = layer.forward(x, ids, tw).double().numpy()
    assert rel_err(out, reference_moe(x.double().numpy(), w13, w2, ids.numpy(), tw.numpy())) <= 1e-2


def test_unknown_format_and_empty_checkpoint_are_refused(tmp_path):
    write_checkpoint(tmp_path, seed=1)
    before = read_all(tmp_path)
    with pytest.raises(ValueError, match="unknown quantization 'nf4'"):
        quantize_experts(tmp_path, "nf4")
    after = read_all(tmp_path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({"lm_head.weight": torch.zeros(4, 4)}, empty / "model.safetensors")
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no routed-expert weights"):
        quantize_experts(empty, "int4")
