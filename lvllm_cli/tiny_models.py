"""Small random MoE checkpoints and full-size config-only model directories, made locally.

    write_tiny_model("qwen3_moe", dir)        config.json + tokenizer + random safetensors
    write_tiny_model("qwen3_moe_int4", dir)   the same with quantized experts (see QUANTIZED)
    write_model_shape("qwen3-30b-a3b", dir)   config.json + tokenizer only (serve with --load-format dummy)

The tiny checkpoints feed the demo profile and the plugin's end-to-end checks
(stock vLLM vs vLLM + lvllm on the same weights).  Weights come from the
Hugging Face model class of each architecture (transformers, which vLLM
requires anyway), so their names and layout are exactly what real
checkpoints use.  The tokenizer is a byte-level BPE without merges, written
as tokenizer.json directly: any text encodes, and every id up to the model's
vocabulary decodes (ids past the 259 byte/special tokens are placeholders).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

_COMMON = {
    "dtype": "bfloat16",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # Larger than the usual 0.02 so activations and logits are of order one:
    # a model whose logits are all ~0 makes greedy comparisons meaningless.
    "initializer_range": 0.08,
}

TINY = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "num_experts": 16, "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "rope_theta": 1000000.0,
    },
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "rope_theta": 10000000.0,
    },
    "glm4_moe": {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "partial_rotary_factor": 0.5, "attention_bias": True, "use_qk_norm": False,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rope_theta": 1000000.0,
        "num_nextn_predict_layers": 0,
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 8, "num_key_value_heads": 8,
        "q_lora_rank": 128, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "rope_theta": 10000.0, "rope_scaling": None, "num_nextn_predict_layers": 0,
    },
    "deepseek_v2": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 8, "num_key_value_heads": 8,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 16, "n_shared_experts": 2, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1,
        "scoring_func": "softmax", "topk_method": "greedy", "routed_scaling_factor": 1.0, "norm_topk_prob": False,
        "rope_theta": 10000.0, "rope_scaling": None,
    },
}

# Tiny checkpoints with quantized routed experts (lvllm_cli/tiny_quantized.py): name -> (base, format).
QUANTIZED = {"qwen3_moe_fp8": ("qwen3_moe", "fp8"), "qwen3_moe_int4": ("qwen3_moe", "int4"),
             "qwen3_moe_gptq": ("qwen3_moe", "gptq"), "qwen3_moe_awq": ("qwen3_moe", "awq")}

# Full-size shapes for --load-format dummy benchmarks (no weights written).
SHAPES = {
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    },
}


def _quantized_shape(base: str, fmt: str) -> dict:
    from lvllm_cli.tiny_quantized import quantization_config

    return {**SHAPES[base], "quantization_config": quantization_config(fmt, SHAPES[base]["num_hidden_layers"])}


# The same shapes with quantized experts (attention stays bf16), for the CPU engine's int4/fp8 decode.
SHAPES["qwen3-30b-a3b-int4"] = _quantized_shape("qwen3-30b-a3b", "int4")
SHAPES["qwen3-30b-a3b-fp8"] = _quantized_shape("qwen3-30b-a3b", "fp8")

# Qwen3-Next-80B-A3B-Instruct's config (every 4th layer full attention, the rest gated delta-net).
SHAPES["qwen3-next-80b-a3b"] = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "full_attention_interval": 4,
    "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)],
    "num_experts": 512, "num_experts_per_tok": 10, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "norm_topk_prob": True, "rope_theta": 10000000.0, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
}


def _fp8_routed_experts_only(base: str) -> dict:
    """Block-fp8 routed experts (as Qwen3-Next-80B-A3B-Instruct-FP8 stores them); every GPU-side linear layer
    stays bf16 (named in modules_to_not_convert, vLLM matches full names), so only the CPU sees fp8."""
    shape = SHAPES[base]
    names = []
    for i, kind in enumerate(shape["layer_types"]):
        pre = f"model.layers.{i}"
        mixer = (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] if kind == "full_attention"
                 else ["linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba", "linear_attn.out_proj", "linear_attn.conv1d"])
        names += [f"{pre}.{m}" for m in mixer]
        names += [f"{pre}.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    from lvllm_cli.tiny_quantized import quantization_config

    return {**shape, "quantization_config": {**quantization_config("fp8", 0), "modules_to_not_convert": names}}


SHAPES["qwen3-next-80b-a3b-fp8"] = _fp8_routed_experts_only("qwen3-next-80b-a3b")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json(vocab_size: int) -> dict:
    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size {vocab_size} is below the {base} byte and special tokens")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(SPECIAL_TOKENS) + b
    for i in range(base, vocab_size):
        vocab[f"<extra_{i}>"] = i
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [],
        },
    }


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab_size)))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 1 << 20,
        # Plain concatenation, so /v1/chat/completions works too.
        "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    }, indent=2))


def _config(spec: dict) -> dict:
    return {**_COMMON, **spec}


def _atomic_dir(out_dir: Path):
    """Write into a temporary sibling and rename: an interrupted run leaves nothing half-written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _finish(tmp: Path, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir


def write_model_shape(name: str, out_dir: Path) -> Path:
    """config.json + tokenizer of a full-size model, for `--load-format dummy` (no weights)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    tmp = _atomic_dir(out_dir)
    try:
        cfg = _config(SHAPES[name])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_tokenizer(tmp, cfg["vocab_size"])
        return _finish(tmp, out_dir)
    except BaseException:
        _rmtree(tmp)
        raise


def write_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """A small random checkpoint of `arch` (see TINY) through its Hugging Face model class."""
    base, quantization = QUANTIZED.get(arch, (arch, None))
    if base not in TINY:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join([*TINY, *QUANTIZED])}")
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise RuntimeError(
            f"making a tiny {arch} checkpoint needs torch and transformers (installed with vLLM): {exc}"
        ) from None
    tmp = _atomic_dir(out_dir)
    try:
        spec = _config(TINY[base])
        kwargs = {k: v for k, v in spec.items() if k not in ("architectures", "model_type", "dtype")}
        config = AutoConfig.for_model(spec["model_type"], **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        # Keep our own keys (e.g. num_experts next to transformers' renamed num_local_experts).
        saved = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**saved, **spec}, indent=2))
        write_tokenizer(tmp, spec["vocab_size"])
        if quantization:
            from lvllm_cli.tiny_quantized import quantize_experts

            quantize_experts(tmp, quantization)
        return _finish(tmp, out_dir)
    except BaseException:
        _rmtree(tmp)
        raise


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
