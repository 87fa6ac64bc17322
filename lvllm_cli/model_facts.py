"""What a MoE checkpoint is, in the numbers the planner needs: read from config.json.

Supports the key names of qwen3_moe, qwen3_next, glm4_moe and deepseek_v2/v3
(and any config that uses one of those spellings).  Which layers are MoE layers
follows vLLM's own model code:

- qwen3_moe / qwen3_next: layer i is MoE unless i is in `mlp_only_layers` or
  (i + 1) % decoder_sparse_step != 0;
- glm4_moe: i >= first_k_dense_replace;
- deepseek_v2/v3: i >= first_k_dense_replace and i % moe_layer_freq == 0.

Byte counts are what the weights occupy in memory in the checkpoint's own
format (the CPU engine keeps fp8 / int4 experts packed, it does not widen them):

- bf16 / fp16 (and fp32, which vLLM serves as 16-bit): 2 bytes per weight;
- fp8 with block [bn, bk]: 1 byte per weight + one fp32 scale per bn x bk block;
- fp8 per channel: 1 byte + one fp32 scale per output row; per tensor: + 4 bytes;
- int4 (awq, gptq, compressed-tensors pack-quantized) with group g: 0.5 byte per
  weight + one 16-bit scale per group (+ a 4-bit zero point per group when the
  scheme is asymmetric, which AWQ and GPTQ always store).

Non-expert weights of int4 checkpoints are counted at 16 bits: most int4 MoE
checkpoints leave attention and shared experts unquantized, and counting high
only costs a GPU layer, where counting low costs an out-of-memory at start.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    # vLLM's dtype "auto" serves fp32 checkpoints in 16 bits.
    "float32": 2,
    "fp32": 2,
    "float": 2,
}


class ConfigError(ValueError):
    """config.json (or a profile's facts) cannot describe a MoE model we can plan for."""


@dataclass
class Quant:
    """How the expert weights are stored."""

    method: str = "none"  # none | fp8 | int4
    source: str = ""  # quant_method as written in the config (fp8, awq, gptq, compressed-tensors, ...)
    block: tuple[int, int] | None = None  # fp8 block [rows, cols]
    per_channel: bool = False  # fp8 scale per output row
    group_size: int = 0  # int4 group along the input dimension (0 = per output channel)
    zero_points: bool = False  # int4 scheme stores a zero point per group

    def matrix_bytes(self, rows: int, cols: int, dtype_bytes: int) -> int:
        """Bytes of one [rows, cols] weight matrix (rows = output features) plus its scales."""
        n = rows * cols
        if self.method == "none":
            return n * dtype_bytes
        if self.method == "fp8":
            if self.block:
                bn, bk = self.block
                return n + math.ceil(rows / bn) * math.ceil(cols / bk) * 4
            if self.per_channel:
                return n + rows * 4
            return n + 4
        if self.method == "int4":
            groups_per_row = math.ceil(cols / self.group_size) if self.group_size else 1
            groups = rows * groups_per_row
            zeros = math.ceil(groups / 2) if self.zero_points else 0
            return math.ceil(n / 2) + groups * 2 + zeros
        raise ValueError(f"unknown quant method {self.method!r}")

    @property
    def label(self) -> str:
        if self.method == "none":
            return "16-bit"
        if self.method == "fp8":
            if self.block:
                return f"fp8 block {self.block[0]}x{self.block[1]}"
            return "fp8 per-channel" if self.per_channel else "fp8 per-tensor"
        g = f"group {self.group_size}" if self.group_size else "per-channel"
        return f"int4 {g} ({self.source})"


@dataclass
class LinearAttention:
    """Gated DeltaNet layers of Qwen3-Next: a fixed-size state per sequence instead of a KV cache."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    def params(self, hidden: int) -> int:
        conv_dim = 2 * self.key_dim + self.value_dim
        return (
            hidden * (2 * self.key_dim + 2 * self.value_dim)  # in_proj_qkvz
            + hidden * 2 * self.num_value_heads  # in_proj_ba
            + conv_dim * self.conv_kernel  # conv1d
            + self.value_dim * hidden  # out_proj
        )

    def state_elems_per_seq(self, tp: int) -> int:
        """Elements of one layer's recurrent state for one sequence on one TP rank (as vLLM sizes it)."""
        conv_dim = 2 * self.key_dim + self.value_dim
        conv = (conv_dim // tp) * (self.conv_kernel - 1)
        ssm = (self.num_value_heads // tp) * self.value_head_dim * self.key_head_dim
        return conv + ssm


@dataclass
class Mla:
    """DeepSeek multi-head latent attention: the KV cache holds one compressed vector per token and layer."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None

    def params(self, hidden: int, heads: int) -> int:
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = hidden * self.q_lora_rank + self.q_lora_rank * heads * qk
        else:
            q = hidden * heads * qk
        kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = heads * self.v_head_dim * hidden
        return q + kv_a + kv_b + o


@dataclass
class ModelFacts:
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int
    experts_per_tok: int
    moe_intermediate_size: int
    moe_layers: list[int]
    shared_intermediate_size: int  # all shared experts of one layer together; 0 = none
    dense_intermediate_size: int  # MLP of the non-MoE layers
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    full_attention_layers: list[int]  # layers that keep a KV cache
    max_position_embeddings: int
    dtype: str
    quant: Quant = field(default_factory=Quant)
    linear_attention: LinearAttention | None = None
    mla: Mla | None = None
    attn_output_gate: bool = False  # Qwen3-Next: q_proj also yields a gate (2x outputs)
    source: str = ""  # where these facts came from (a config.json path or a profile)

    # ---- sizes -------------------------------------------------------------

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES.get(self.dtype, 2)

    def expert_bytes_per_layer(self, widened_to_bf16: bool = False) -> int:
        """Routed experts of one MoE layer: E x (gate [I,H] + up [I,H] + down [H,I]); widened_to_bf16:
        as the CPU holds them with LVLLM_EXPERTS_BF16=1 (2 bytes per weight, no scales)."""
        h, i = self.hidden_size, self.moe_intermediate_size
        q, d = (Quant(), 2) if widened_to_bf16 else (self.quant, self.dtype_bytes)
        return self.num_experts * (2 * q.matrix_bytes(i, h, d) + q.matrix_bytes(h, i, d))

    def total_expert_bytes(self) -> int:
        return self.expert_bytes_per_layer() * len(self.moe_layers)

    def _linear_bytes_per_weight(self) -> float:
        # fp8 checkpoints quantize every linear layer; int4 ones: see the module docstring.
        if self.quant.method == "fp8":
            return 1.0
        return float(self.dtype_bytes)

    def layer_non_expert_params(self, layer: int) -> tuple[int, int]:
        """(linear params, other params) of one decoder layer, routed experts excluded."""
        h = self.hidden_size
        if self.mla is not None:
            attn = self.mla.params(h, self.num_attention_heads)
        elif self.linear_attention is not None and layer not in self.full_attention_layers:
            attn = self.linear_attention.params(h)
        else:
            q_out = self.num_attention_heads * self.head_dim * (2 if self.attn_output_gate else 1)
            kv_out = 2 * self.num_kv_heads * self.head_dim
            attn = h * q_out + h * kv_out + self.num_attention_heads * self.head_dim * h
        other = 2 * h  # the two RMSNorms
        if layer in self.moe_layers:
            mlp = 3 * h * self.shared_intermediate_size
            other += h * self.num_experts  # router, kept in 16 bits by every checkpoint we know
            if self.shared_intermediate_size and self.model_type.startswith("qwen3"):
                other += h  # shared_expert_gate
        else:
            mlp = 3 * h * self.dense_intermediate_size
        return attn + mlp, other

    def layer_non_expert_bytes(self, layer: int) -> int:
        linear, other = self.layer_non_expert_params(layer)
        return int(linear * self._linear_bytes_per_weight()) + other * self.dtype_bytes

    def embed_bytes(self) -> int:
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    def lm_head_bytes(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size * self.dtype_bytes

    def non_expert_bytes(self) -> int:
        return (
            sum(self.layer_non_expert_bytes(i) for i in range(self.num_layers))
            + self.embed_bytes()
            + self.lm_head_bytes()
            + self.hidden_size * self.dtype_bytes  # final norm
        )

    def kv_bytes_per_token_layer(self, tp: int, kv_dtype_bytes: int | None = None) -> int:
        """KV-cache bytes one token needs in one full-attention layer on one TP rank."""
        b = kv_dtype_bytes or self.dtype_bytes
        if self.mla is not None:  # the latent vector is replicated on every rank
            return (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * b
        heads = max(1, self.num_kv_heads // tp)  # vLLM replicates KV heads when tp > kv heads
        return 2 * heads * self.head_dim * b

    def state_bytes_per_seq_layer(self, layer: int, tp: int) -> int:
        """Fixed-size recurrent state one sequence needs in one linear-attention layer on one TP rank."""
        if self.linear_attention is None or layer in self.full_attention_layers:
            return 0
        return self.linear_attention.state_elems_per_seq(tp) * self.dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)


# ---- reading config.json ---------------------------------------------------


def _get(cfg: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def _int(cfg: dict, key: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _need(cfg: dict, *names: str, minimum: int = 1) -> int:
    v = _get(cfg, *names)
    if v is None:
        raise ConfigError(f"missing {' / '.join(names)}")
    return _int(cfg, names[0], v, minimum=minimum)


def _quant_from_config(qc: Any) -> Quant:
    if qc is None:
        return Quant()
    if not isinstance(qc, dict):
        raise ConfigError(f"quantization_config: expected a mapping, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
        block = qc.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise ConfigError(f"quantization_config.weight_block_size: expected [rows, cols], got {block!r}")
            return Quant("fp8", method, block=(block[0], block[1]))
        return Quant("fp8", method, per_channel=method != "fp8")
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits != 4:
            raise ConfigError(f"quantization_config: {method} with {bits} bits is not supported (only 4-bit)")
        g = qc.get("group_size", qc.get("q_group_size", 128))
        g = 0 if g in (-1, None) else g
        # Both formats store packed 4-bit zero points (qzeros) even for symmetric schemes.
        return Quant("int4", method, group_size=_int(qc, "quantization_config.group_size", g), zero_points=True)
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise ConfigError("quantization_config.config_groups: missing (compressed-tensors needs one group)")
        first = next(iter(groups.values()))
        w = (first or {}).get("weights") or {}
        bits, typ = w.get("num_bits"), str(w.get("type", "int"))
        strategy = str(w.get("strategy", "tensor"))
        if bits == 8 and typ == "float":
            if strategy == "block":
                block = w.get("block_structure") or [128, 128]
                return Quant("fp8", method, block=(int(block[0]), int(block[1])))
            return Quant("fp8", method, per_channel=strategy == "channel")
        if bits == 4 and typ == "int":
            g = w.get("group_size") if strategy == "group" else 0
            return Quant(
                "int4",
                method,
                group_size=_int(qc, "config_groups.weights.group_size", g or 0),
                zero_points=not w.get("symmetric", True),
            )
        raise ConfigError(f"quantization_config: compressed-tensors {bits}-bit {typ} weights are not supported")
    raise ConfigError(
        f"quantization_config.quant_method {method!r} is not supported "
        "(supported: fp8, awq, gptq, compressed-tensors fp8/int4)"
    )


def _moe_layers(cfg: dict, model_type: str, num_layers: int, num_experts: int) -> list[int]:
    if model_type.startswith("glm4_moe"):
        k = _int(cfg, "first_k_dense_replace", _get(cfg, "first_k_dense_replace", default=0))
        return [i for i in range(num_layers) if i >= k]
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        k = _int(cfg, "first_k_dense_replace", _get(cfg, "first_k_dense_replace", default=0))
        freq = _int(cfg, "moe_layer_freq", _get(cfg, "moe_layer_freq", default=1), minimum=1)
        return [i for i in range(num_layers) if i >= k and i % freq == 0]
    step = _int(cfg, "decoder_sparse_step", _get(cfg, "decoder_sparse_step", default=1), minimum=1)
    dense = _get(cfg, "mlp_only_layers", default=[])
    if not isinstance(dense, list) or not all(isinstance(x, int) for x in dense):
        raise ConfigError(f"mlp_only_layers: expected a list of layer indices, got {dense!r}")
    return [i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0]


def _full_attention_layers(cfg: dict, num_layers: int, hybrid: bool) -> list[int]:
    if not hybrid:
        return list(range(num_layers))
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise ConfigError(f"layer_types: expected a list of {num_layers} entries")
        return [i for i, t in enumerate(types) if t == "full_attention"]
    interval = _int(cfg, "full_attention_interval", _get(cfg, "full_attention_interval", default=4), minimum=1)
    return [i for i in range(num_layers) if (i + 1) % interval == 0]


def facts_from_config(cfg: dict, source: str = "") -> ModelFacts:
    """Model facts from a parsed config.json. Raises ConfigError naming the missing or bad key."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must hold a JSON object")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM config nested
        outer = cfg
        cfg = {**cfg["text_config"]}
        cfg.setdefault("quantization_config", outer.get("quantization_config"))
    model_type = str(cfg.get("model_type", "")).lower()
    num_experts = _get(cfg, "num_experts", "n_routed_experts", "num_local_experts")
    if not num_experts:
        raise ConfigError(
            "no MoE fields (num_experts / n_routed_experts): this is not a Mixture-of-Experts model. "
            "lvllm serves MoE models only; serve dense models with plain `vllm serve`"
        )
    num_experts = _int(cfg, "num_experts", num_experts, minimum=1)
    num_layers = _need(cfg, "num_hidden_layers")
    hidden = _need(cfg, "hidden_size")
    topk = _need(cfg, "num_experts_per_tok", "moe_topk")
    if topk > num_experts:
        raise ConfigError(f"num_experts_per_tok ({topk}) is larger than the number of experts ({num_experts})")
    moe_inter = _need(cfg, "moe_intermediate_size", "intermediate_size")
    heads = _need(cfg, "num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads", _get(cfg, "num_key_value_heads", default=heads), minimum=1)
    head_dim = _get(cfg, "head_dim")
    head_dim = hidden // heads if head_dim is None else _int(cfg, "head_dim", head_dim, minimum=1)

    shared = _get(cfg, "shared_expert_intermediate_size")
    if shared is None:
        n_shared = _int(cfg, "n_shared_experts", _get(cfg, "n_shared_experts", default=0))
        shared = n_shared * moe_inter
    shared = _int(cfg, "shared_expert_intermediate_size", shared)

    moe_layers = _moe_layers(cfg, model_type, num_layers, num_experts)
    if not moe_layers:
        raise ConfigError("the MoE fields select no MoE layer (check decoder_sparse_step / first_k_dense_replace)")
    hybrid = model_type == "qwen3_next" or "linear_num_value_heads" in cfg
    linear = None
    if hybrid:
        linear = LinearAttention(
            num_key_heads=_need(cfg, "linear_num_key_heads"),
            num_value_heads=_need(cfg, "linear_num_value_heads"),
            key_head_dim=_need(cfg, "linear_key_head_dim"),
            value_head_dim=_need(cfg, "linear_value_head_dim"),
            conv_kernel=_need(cfg, "linear_conv_kernel_dim"),
        )
    mla = None
    if _get(cfg, "kv_lora_rank"):
        mla = Mla(
            kv_lora_rank=_need(cfg, "kv_lora_rank"),
            qk_rope_head_dim=_need(cfg, "qk_rope_head_dim"),
            qk_nope_head_dim=_need(cfg, "qk_nope_head_dim"),
            v_head_dim=_need(cfg, "v_head_dim"),
            q_lora_rank=_get(cfg, "q_lora_rank"),
        )
    dtype = str(_get(cfg, "torch_dtype", "dtype", default="bfloat16")).replace("torch.", "").lower()
    if dtype not in _DTYPE_BYTES:
        raise ConfigError(f"torch_dtype {dtype!r} is not supported (bfloat16, float16, float32)")
    dense_inter = _get(cfg, "intermediate_size", default=0)
    return ModelFacts(
        model_type=model_type or "unknown",
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=_need(cfg, "vocab_size"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=num_experts,
        experts_per_tok=topk,
        moe_intermediate_size=moe_inter,
        moe_layers=moe_layers,
        shared_intermediate_size=shared,
        dense_intermediate_size=_int(cfg, "intermediate_size", dense_inter),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        full_attention_layers=_full_attention_layers(cfg, num_layers, hybrid),
        max_position_embeddings=_int(
            cfg, "max_position_embeddings", _get(cfg, "max_position_embeddings", default=32768), minimum=1
        ),
        dtype=dtype,
        quant=_quant_from_config(cfg.get("quantization_config")),
        linear_attention=linear,
        mla=mla,
        attn_output_gate=bool(cfg.get("attn_output_gate", model_type == "qwen3_next")),
        source=source,
    )


def read_config(model_dir: Path) -> dict:
    """The parsed config.json of a model directory; ConfigError with the path when absent or malformed."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a model directory needs the checkpoint's config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
