"""The quantized tiny checkpoints the GPU end-to-end check serves: tensors written as the published
formats lay them out (decoded here independently), close to the bf16 weights they replace, the rest
of the checkpoint untouched, and readable by the plugin's loading path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lvllm_cli.moe import plugin_core
from lvllm_cli.moe import quant_loading as ql
from lvllm_cli.moe.placement import Group
from lvllm_cli.tiny_quantized import quantization_config, quantize_experts
from moe_reference import e4m3_ref, layer_reference, rel_err

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


def nibbles(words):
    """int32 words [...] -> uint64 [..., 8], nibble i = bits 4i..4i+3."""
    w = words.view(np.uint32).astype(np.uint64)
    return np.stack([(w >> np.uint64(4 * i)) & np.uint64(15) for i in range(8)], axis=-1)


def dequantize(t, fmt, base):
    """float64 [out, in] from the checkpoint tensors of one projection, decoded from the formats' definitions."""
    if fmt == "fp8":
        codes = t[f"{base}.weight"].view(torch.uint8).numpy()
        s = t[f"{base}.weight_scale_inv"].numpy().astype(np.float64)
        out, n_in = codes.shape
        return e4m3_ref(codes) * np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:out, :n_in]
    if fmt in ("gptq", "awq"):
        return dequantize_gptq_awq(t, fmt, base)
    words = t[f"{base}.weight_packed"].numpy().view(np.uint32).astype(np.uint64)
    out, n_in = (int(v) for v in t[f"{base}.weight_shape"])
    codes = np.stack([(words >> np.uint64(4 * i)) & np.uint64(15) for i in range(8)], axis=-1).reshape(out, -1)[:, :n_in]
    s = t[f"{base}.weight_scale"].float().numpy().astype(np.float64)
    return (codes.astype(np.int64) - 8) * np.repeat(s, n_in // s.shape[1], axis=1)


def dequantize_gptq_awq(t, fmt, base):
    """AutoGPTQ: qweight [in/8, out], input 8r + i in nibble i of row r; qzeros [in/G, out/8] store zero - 1,
    column 8j + i in nibble i.  AutoAWQ GEMM: qweight [in, out/8] and qzeros [in/G, out/8], column
    8j + order[i] in nibble i, order = 0 2 4 6 1 3 5 7.  Both: w = (q - zero) * scale, scales [in/G, out]."""
    q, z = nibbles(t[f"{base}.qweight"].numpy()), nibbles(t[f"{base}.qzeros"].numpy())
    s = t[f"{base}.scales"].numpy().astype(np.float64)  # [in/G, out]
    if fmt == "gptq":
        q = q.transpose(0, 2, 1).reshape(-1, q.shape[1])  # [in, out]
        zero = z.reshape(z.shape[0], -1) + 1
    else:
        order = [0, 2, 4, 6, 1, 3, 5, 7]
        unorder = lambda a: a[..., np.argsort(order)].reshape(a.shape[0], -1)  # noqa: E731  column 8j + k
        q, zero = unorder(q), unorder(z)
    group = q.shape[0] // s.shape[0]
    w = (q.astype(np.int64) - np.repeat(zero.astype(np.int64), group, axis=0)) * np.repeat(s, group, axis=0)
    return w.T  # [out, in]


@pytest.mark.parametrize("fmt", ["fp8", "int4", "gptq", "awq"])
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
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == {"fp8": "fp8", "int4": "compressed-tensors", "gptq": "gptq", "awq": "awq"}[fmt]
    if fmt == "fp8":
        assert t["model.layers.1.mlp.experts.2.up_proj.weight"].dtype == torch.float8_e4m3fn
        bound = 2.0**-4  # e4m3: 3 mantissa bits, relative to the block maximum at worst
    elif fmt == "int4":
        assert t["model.layers.1.mlp.experts.2.up_proj.weight_packed"].dtype == torch.int32
        bound = 0.5 / 7 + 2**-8  # half a step of max/7, plus the bf16 scale's rounding
    else:
        up = "model.layers.1.mlp.experts.2.up_proj"
        assert {k.rsplit(".", 1)[1] for k in t if k.startswith(up + ".")} == \
            ({"qweight", "qzeros", "scales", "g_idx"} if fmt == "gptq" else {"qweight", "qzeros", "scales"})
        assert t[f"{up}.qweight"].dtype == t[f"{up}.qzeros"].dtype == torch.int32
        assert t[f"{up}.scales"].dtype == torch.float16 and t[f"{up}.scales"].shape == (H // 32, I)
        if fmt == "gptq":
            assert t[f"{up}.qweight"].shape == (H // 8, I) and t[f"{up}.qzeros"].shape == (H // 32, I // 8)
            assert np.array_equal(t[f"{up}.g_idx"].numpy(), np.arange(H) // 32)
            assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, True, False)
            bound = 1 / 15 + 2**-8  # half a step of 2 max / 15 (GPTQ's symmetric scale), plus fp16 rounding
        else:
            assert t[f"{up}.qweight"].shape == (H, I // 8) and t[f"{up}.qzeros"].shape == (H // 32, I // 8)
            assert (qc["bits"], qc["group_size"], qc["zero_point"], qc["version"]) == (4, 32, True, "gemm")
            bound = 0.5 / 7 + 2**-8
        assert_only_experts_quantized(qc, fmt)
    for layer in range(2):
        for e in range(E):
            for part, ref in (("gate", w13[layer, e, :I]), ("up", w13[layer, e, I:]), ("down", w2[layer, e])):
                deq = dequantize(t, fmt, f"model.layers.{layer}.mlp.experts.{e}.{part}_proj")
                assert np.abs(deq - ref).max() <= bound * np.abs(ref).max() * 1.01
                # Round-to-nearest errors average a quarter step (measured: 0.22-0.31 of `bound` for the int4
                # formats over many seeds); a wrong layout errs by the size of the weights themselves.
                assert np.abs(deq - ref).mean() < 0.4 * bound * np.abs(ref).max()


# Linear layers of a Qwen3-MoE decoder layer as vLLM names them (qkv_proj is checked through its shards).
NOT_EXPERTS = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
               "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate"]


def assert_only_experts_quantized(qc, fmt):
    """vLLM 0.26's rules: GPTQ quantizes a linear layer only if its name contains an entry of
    modules_in_block_to_quantize (a list per step, flattened), and every MoE layer; AWQ skips any layer
    whose name contains an entry of modules_to_not_convert, MoE layers included."""
    if fmt == "gptq":
        listed = [m for step in qc["modules_in_block_to_quantize"] for m in step]
        assert sorted(listed) == sorted(f"mlp.experts.{e}.{p}_proj" for e in range(E) for p in ("gate", "up", "down"))
        assert not [n for n in NOT_EXPERTS if any(m in n for m in listed)]
        assert "dynamic" not in qc  # a negative `dynamic` match would keep the experts unquantized
    else:
        skip = qc["modules_to_not_convert"]
        assert all(any(m in n for m in skip) for n in NOT_EXPERTS)
        assert not any(m in "model.layers.1.mlp.experts" for m in skip)


def vllm_like(name, **attrs):
    return type(name, (), attrs)()


@pytest.mark.parametrize("fmt, method", [
    ("fp8", vllm_like("Fp8MoEMethod", weight_block_size=[128, 128])),
    ("int4", vllm_like("CompressedTensorsWNA16MarlinMoEMethod", num_bits=4, symmetric=True, actorder=None,
                       strategy="group", group_size=32)),
    ("gptq", vllm_like("AutoGPTQMoEMethod", quant_config=SimpleNamespace(
        weight_bits=4, group_size=32, desc_act=False, is_sym=True, full_config={"checkpoint_format": "gptq"}))),
    ("awq", vllm_like("AutoAWQMoEMethod", quant_config=SimpleNamespace(
        weight_bits=4, group_size=32, zero_point=True, full_config={"version": "gemm"}))),
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
    ref, tol = layer_reference(layer, x.double().numpy(), w13, w2, ids.numpy(), tw.numpy())
    assert rel_err(out, ref) <= tol


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


@pytest.mark.parametrize("arch", ["qwen3_moe_gptq", "qwen3_moe_awq"])
def test_tiny_models_write_gptq_and_awq(tmp_path, arch):
    """What scripts/gpu_plugin_e2e.py serves: the Hugging Face checkpoint with its experts repacked and the
    config vLLM reads; attention, router, norms and embeddings untouched."""
    from lvllm_cli.tiny_models import QUANTIZED, TINY, write_tiny_model

    base, fmt = QUANTIZED[arch]
    d = write_tiny_model(arch, tmp_path / arch, seed=3)
    spec = TINY[base]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"] == quantization_config(fmt, spec["num_hidden_layers"], spec["num_experts"])
    t = read_all(d)
    suffixes = {"qweight", "qzeros", "scales", "g_idx"} if fmt == "gptq" else {"qweight", "qzeros", "scales"}
    for layer in range(spec["num_hidden_layers"]):
        for e in range(spec["num_experts"]):
            for part in ("gate", "up", "down"):
                base_name = f"model.layers.{layer}.mlp.experts.{e}.{part}_proj"
                assert {k.rsplit(".", 1)[1] for k in t if k.startswith(base_name + ".")} == suffixes
    rest = [k for k in t if ".experts." not in k]
    assert rest and all(t[k].dtype == torch.bfloat16 for k in rest)
    assert "model.layers.0.mlp.gate.weight" in rest and "model.layers.1.self_attn.q_proj.weight" in rest
