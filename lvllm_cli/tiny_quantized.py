"""Quantize the routed experts of a (tiny) safetensors checkpoint in place, the
way published quantized checkpoints store them, so stock vLLM and vLLM + lvllm
can be compared on the same quantized weights.

    quantize_experts(model_dir, "fp8")    e4m3 weights + 128x128 block scales
                                          (`weight_scale_inv`, quant_method "fp8",
                                          as Qwen3-Next-80B-A3B-Instruct-FP8)
    quantize_experts(model_dir, "int4")   compressed-tensors pack-quantized, 4-bit
                                          symmetric, group 32 (`weight_packed`,
                                          `weight_scale`, `weight_shape`), as the
                                          AWQ-calibrated Qwen3-Coder-30B-A3B repacks
    quantize_experts(model_dir, "gptq")   AutoGPTQ v1, 4-bit, sym, group 32,
                                          desc_act false (`qweight` [in/8, out],
                                          `qzeros` holding zero - 1 = 7, fp16
                                          `scales` [in/G, out], `g_idx` = k // G)
    quantize_experts(model_dir, "awq")    AutoAWQ GEMM, 4-bit, group 32, zero
                                          points all 8 (`qweight` [in, out/8] and
                                          `qzeros` in AWQ's nibble order, fp16
                                          `scales` [in/G, out])

Only the routed experts are quantized (attention, router and lm_head stay
bf16 and are listed as not quantized in the config: `ignore` for
compressed-tensors, `modules_to_not_convert` for fp8 and AWQ, and for GPTQ a
`modules_in_block_to_quantize` that names the expert projections only), which
keeps everything on the GPU side on vLLM's ordinary kernels.  Experts are read
per expert (`experts.{e}.{gate,up,down}_proj.weight`) or fused
(`experts.gate_up_proj` [E, 2I, H] + `experts.down_proj` [E, H, I]) and always
written per expert.  The rounding is plain round-to-nearest (no calibration):
the point is the layout, which is the one each tool publishes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FP8_BLOCK = 128
INT4_GROUP = 32
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<part>gate_up_proj|down_proj)$")


FORMATS = ("fp8", "int4", "gptq", "awq")
_NOT_QUANTIZED = ["lm_head", "self_attn", "mlp.gate", "shared_expert"]  # substrings, as AWQ matches them


def quantization_config(fmt: str, num_layers: int, num_experts: int = 0) -> dict:
    """The config's quantization_config as each tool writes it (num_experts: GPTQ lists the projections)."""
    if fmt == "fp8":
        ignored = [f"model.layers.{i}.self_attn.{p}" for i in range(num_layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "modules_to_not_convert": ignored}
    if fmt == "int4":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": INT4_GROUP,
                   "dynamic": False, "actorder": None, "observer": "minmax"}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$", "re:.*shared_expert.*"],
                "kv_cache_scheme": None}
    if fmt == "gptq":
        # vLLM quantizes a GPTQ linear layer only when its name contains an entry of
        # modules_in_block_to_quantize (one list per sequential step, as GPTQModel writes it), and
        # every MoE layer unless `dynamic` excludes it: naming only the experts keeps the rest bf16.
        steps = [[f"mlp.experts.{e}.{p}_proj" for e in range(num_experts) for p in ("gate", "up")],
                 [f"mlp.experts.{e}.down_proj" for e in range(num_experts)]]
        return {"quant_method": "gptq", "bits": 4, "group_size": INT4_GROUP, "desc_act": False, "sym": True,
                "lm_head": False, "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
                "checkpoint_format": "gptq", "modules_in_block_to_quantize": steps}
    if fmt == "awq":
        # vLLM skips layers whose name contains an entry of modules_to_not_convert (substring match).
        return {"quant_method": "awq", "bits": 4, "group_size": INT4_GROUP, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": list(_NOT_QUANTIZED)}
    raise ValueError(f"unknown quantization {fmt!r}; known: {', '.join(FORMATS)}")


def _fp8_block(w):
    """float [out, in] -> (e4m3 [out, in], float32 scale_inv [ceil(out/B), ceil(in/B)]), w ~ q * scale."""
    import torch

    out, n_in = w.shape
    bo, bi = -(-out // FP8_BLOCK), -(-n_in // FP8_BLOCK)
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK, dtype=torch.float32)
    padded[:out, :n_in] = w.float()
    blocks = padded.view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out, :n_in].to(torch.float8_e4m3fn)
    return q, scale


def _int4_groups(w, scale, scale_dtype):
    """float [out, in] -> (int64 codes [out, in] in [-8, 7], scales [out, in/G] of scale_dtype), w ~ codes * scale.
    scale: 'max/7' (compressed-tensors, AWQ here) or '2max/15' (GPTQ's symmetric rule, 7.5 steps each side)."""
    import torch

    out, n_in = w.shape
    if n_in % INT4_GROUP:
        raise ValueError(f"input size {n_in} is not a multiple of the int4 group {INT4_GROUP}")
    g = w.float().view(out, n_in // INT4_GROUP, INT4_GROUP)
    amax = g.abs().amax(dim=2)
    s = ((amax / 7.0) if scale == "max/7" else (amax * 2.0 / 15.0)).clamp(min=1e-12).to(scale_dtype)
    codes = torch.round(g / s.float()[..., None]).clamp(-8, 7).to(torch.int64).view(out, n_in)
    return codes, s


def _words(nibbles):
    """int64 [..., 8] values 0..15 -> int32 words, nibble i at bits 4i (two's complement wrap)."""
    import torch

    words = (nibbles << (4 * torch.arange(8))).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _int4_ct(w):
    """float [out, in] -> (int32 weight_packed [out, ceil(in/8)], bf16 weight_scale [out, in/G], weight_shape)."""
    import torch

    codes, scale = _int4_groups(w, "max/7", torch.bfloat16)
    out, n_in = codes.shape
    nib = torch.zeros(out, -(-n_in // 8) * 8, dtype=torch.int64)
    nib[:, :n_in] = codes + 8
    return _words(nib.view(out, -1, 8)), scale, torch.tensor([out, n_in], dtype=torch.int64)  # nibble k%8 of word k//8


def _int4_gptq(w):
    """float [out, in] -> AutoGPTQ v1 tensors {qweight, qzeros, scales, g_idx} (sym: code + 8 stored, zero 8 stored as 7)."""
    import torch

    codes, scale = _int4_groups(w, "2max/15", torch.float16)
    out, n_in = codes.shape
    q = (codes + 8).T.contiguous()  # [in, out]
    qweight = _words(q.view(n_in // 8, 8, out).transpose(1, 2))  # nibble i of row r: input 8r + i
    qzeros = _words(torch.full((n_in // INT4_GROUP, out // 8, 8), 8 - 1, dtype=torch.int64))
    g_idx = (torch.arange(n_in) // INT4_GROUP).to(torch.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.T.contiguous(), "g_idx": g_idx}


def _int4_awq(w):
    """float [out, in] -> AutoAWQ GEMM tensors {qweight, qzeros, scales}: code + 8 with every zero point 8."""
    import torch

    from lvllm_cli.moe.quant_formats import AWQ_ORDER

    codes, scale = _int4_groups(w, "max/7", torch.float16)
    out, n_in = codes.shape
    q = (codes + 8).T.contiguous().view(n_in, out // 8, 8)  # [in, out/8, column within the word]
    qweight = _words(q[..., list(AWQ_ORDER)])  # nibble i holds column 8j + AWQ_ORDER[i]
    qzeros = _words(torch.full((n_in // INT4_GROUP, out // 8, 8), 8, dtype=torch.int64))
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.T.contiguous()}


def _experts(tensors: dict):
    """(prefix, expert, part, [out, in] tensor) for every routed-expert weight, and the keys they came from."""
    found, used = [], set()
    for key, t in tensors.items():
        m = _PER_EXPERT.match(key)
        if m:
            found.append((m["prefix"], int(m["e"]), m["part"], t))
            used.add(key)
            continue
        m = _FUSED.match(key)
        if m and t.dim() == 3:
            used.add(key)
            if m["part"] == "down_proj":
                found += [(m["prefix"], e, "down", t[e]) for e in range(t.shape[0])]
            else:
                half = t.shape[1] // 2
                for e in range(t.shape[0]):
                    found += [(m["prefix"], e, "gate", t[e, :half]), (m["prefix"], e, "up", t[e, half:])]
    return found, used


def _quantize(w, fmt: str) -> dict:
    """One expert projection [out, in] -> {tensor suffix: tensor} in the checkpoint format `fmt`."""
    if fmt == "fp8":
        q, s = _fp8_block(w)
        return {"weight": q, "weight_scale_inv": s}
    if fmt == "int4":
        p, s, shape = _int4_ct(w)
        return {"weight_packed": p, "weight_scale": s, "weight_shape": shape}
    return _int4_gptq(w) if fmt == "gptq" else _int4_awq(w)


def quantize_experts(model_dir: Path, fmt: str) -> int:
    """Rewrite every *.safetensors in model_dir with quantized experts and add the
    config's quantization_config; returns the number of expert projections quantized."""
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    quantization_config(fmt, 1)  # refuse an unknown format before touching anything
    count, experts = 0, 0
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(path)
        found, used = _experts(tensors)
        out = {k: v for k, v in tensors.items() if k not in used}
        for prefix, e, part, w in found:
            base = f"{prefix}.{e}.{part}_proj"
            out.update({f"{base}.{suffix}": t.contiguous() for suffix, t in _quantize(w, fmt).items()})
            experts = max(experts, e + 1)
        count += len(found)
        tmp = path.with_name(path.name + ".tmp")
        save_file(out, tmp, metadata={"format": "pt"})
        tmp.replace(path)
    if count == 0:
        raise ValueError(f"no routed-expert weights found in {model_dir}")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():  # the index maps tensor names to files: rebuild it for the new names
        from safetensors import safe_open

        weight_map = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                weight_map.update({k: path.name for k in f.keys()})
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2))
    cfg["quantization_config"] = quantization_config(fmt, int(cfg.get("num_hidden_layers", 0)), experts)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return count
