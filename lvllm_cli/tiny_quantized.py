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

Only the routed experts are quantized (attention, router and lm_head stay
bf16 and are listed as ignored), which keeps everything on the GPU side on
vLLM's ordinary kernels.  Experts are read per expert
(`experts.{e}.{gate,up,down}_proj.weight`) or fused (`experts.gate_up_proj`
[E, 2I, H] + `experts.down_proj` [E, H, I]) and always written per expert.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FP8_BLOCK = 128
INT4_GROUP = 32
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<part>gate_up_proj|down_proj)$")


def quantization_config(fmt: str, num_layers: int) -> dict:
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
    raise ValueError(f"unknown quantization {fmt!r}; known: fp8, int4")


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


def _int4_ct(w):
    """float [out, in] -> (int32 weight_packed [out, ceil(in/8)], bf16 weight_scale [out, in/G], weight_shape)."""
    import torch

    out, n_in = w.shape
    if n_in % INT4_GROUP:
        raise ValueError(f"input size {n_in} is not a multiple of the int4 group {INT4_GROUP}")
    g = w.float().view(out, n_in // INT4_GROUP, INT4_GROUP)
    scale = (g.abs().amax(dim=2) / 7.0).clamp(min=1e-12).to(torch.bfloat16)
    codes = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int64).view(out, n_in)
    nib = torch.zeros(out, -(-n_in // 8) * 8, dtype=torch.int64)
    nib[:, :n_in] = codes + 8
    words = (nib.view(out, -1, 8) << (4 * torch.arange(8))).sum(dim=2)  # nibble k%8 of word k//8
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return packed, scale, torch.tensor([out, n_in], dtype=torch.int64)


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


def quantize_experts(model_dir: Path, fmt: str) -> int:
    """Rewrite every *.safetensors in model_dir with quantized experts and add the
    config's quantization_config; returns the number of expert projections quantized."""
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    quantization_config(fmt, 1)  # refuse an unknown format before touching anything
    count = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(path)
        found, used = _experts(tensors)
        out = {k: v for k, v in tensors.items() if k not in used}
        for prefix, e, part, w in found:
            base = f"{prefix}.{e}.{part}_proj"
            if fmt == "fp8":
                q, s = _fp8_block(w)
                out[f"{base}.weight"], out[f"{base}.weight_scale_inv"] = q.contiguous(), s.contiguous()
            else:
                p, s, shape = _int4_ct(w)
                out[f"{base}.weight_packed"], out[f"{base}.weight_scale"] = p.contiguous(), s.contiguous()
                out[f"{base}.weight_shape"] = shape
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
    cfg["quantization_config"] = quantization_config(fmt, int(cfg.get("num_hidden_layers", 0)))
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return count
