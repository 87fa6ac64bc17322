"""How many bytes of a Hugging Face MoE checkpoint the CPU must hold (its routed experts).

From config.json when it names the MoE shape; else the sum of the
*.safetensors files (an upper bound: it counts the GPU-resident weights too).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1, "fp8": 1}


@dataclass
class ModelFootprint:
    path: str
    expert_bytes: int  # what must sit in RAM
    checkpoint_bytes: int  # sum of *.safetensors (0 when none)
    source: str  # how expert_bytes was obtained, for the evidence line


def footprint(model_dir: str) -> ModelFootprint:
    """Raises ValueError with a user-facing reason when the directory is not a usable checkpoint."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir}: not a directory")
    checkpoint = sum(
        os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir) if n.endswith(".safetensors")
    )
    cfg_path = os.path.join(model_dir, "config.json")
    config = None
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{cfg_path}: not readable JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: not a JSON object")
    estimate = expert_bytes_from_config(config) if config else None
    if estimate is not None:
        return ModelFootprint(model_dir, estimate, checkpoint, "routed experts per config.json")
    if checkpoint:
        return ModelFootprint(model_dir, checkpoint, checkpoint, "*.safetensors total (upper bound)")
    raise ValueError(f"{model_dir}: no config.json with an MoE shape and no *.safetensors files")


def expert_bytes_from_config(config: dict) -> int | None:
    """Routed-expert bytes: MoE layers x experts x 3 (gate, up, down) x hidden x moe_intermediate x dtype."""
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    try:
        hidden = int(c["hidden_size"])
        inter = int(c["moe_intermediate_size"])
        experts = int(c.get("num_experts") or c.get("n_routed_experts") or c.get("num_local_experts"))
        layers = int(c["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    moe_layers = len(_moe_layer_ids(c, layers))
    dtype = str(c.get("torch_dtype") or c.get("dtype") or config.get("torch_dtype") or "bfloat16")
    nbytes = _DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "fp8":
        nbytes = 1
    return moe_layers * experts * 3 * hidden * inter * nbytes


def _moe_layer_ids(c: dict, layers: int) -> list[int]:
    dense = set(c.get("mlp_only_layers") or [])
    if "first_k_dense_replace" in c or "moe_layer_freq" in c:
        # DeepSeek / GLM convention.
        first = int(c.get("first_k_dense_replace") or 0)
        freq = int(c.get("moe_layer_freq") or 1)
        return [i for i in range(layers) if i >= first and i % freq == 0 and i not in dense]
    # Qwen convention.
    step = int(c.get("decoder_sparse_step") or 1)
    return [i for i in range(layers) if (i + 1) % step == 0 and i not in dense]
