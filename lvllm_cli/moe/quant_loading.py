"""Quantized checkpoints into CPU layers, without importing vLLM.

vLLM picks a quantization method per MoE layer from the checkpoint's
quantization config.  For a CPU layer the plugin asks that method only two
things: the names and shapes of its parameters (so the model's own
`load_weights` finds them) and the format facts below.  The tensors vLLM's
loader then hands over, one expert projection and one kind at a time and in
any order, are sliced for this tensor-parallel rank, kept until an expert
projection has both its codes and its scales, converted with
`quant_formats` and packed; the host copies go as soon as each part is packed.

Taken: fp8 e4m3 (vLLM's Fp8MoEMethod and compressed-tensors W8A8-FP8: block,
per-channel or per-tensor weight scales; activation scales are ignored, the
CPU computes with bf16 activations) and 4-bit symmetric integer weights in
compressed-tensors pack-quantized form (group or per-channel scales).
Everything else is refused with a message that names the layer and the
format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lvllm_cli.moe import quant_formats as qf
from lvllm_cli.moe.quant_formats import UnsupportedQuantization

FP8_METHODS = ("Fp8MoEMethod", "CompressedTensorsW8A8Fp8MoEMethod")
INT4_METHODS = ("CompressedTensorsWNA16MarlinMoEMethod", "CompressedTensorsWNA16MoEMethod")
SHARD_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}


@dataclass(frozen=True)
class QuantScheme:
    kind: str  # engine layer dtype: "fp8" or "int4"
    group: int  # scale group along the input dimension (0: one scale per row)
    block_rows: int  # fp8 block scales: output rows per scale block (0: not block-quantized)
    codes: str  # parameter suffix (after w13_ / w2_) that carries the codes
    scales: tuple[str, ...]  # suffixes that carry weight scales
    ignored: tuple[str, ...]  # suffixes the CPU does not need
    description: str


def _value(v: Any) -> str:
    """Enum members (compressed-tensors' strategies) and plain strings alike, lower case."""
    return str(getattr(v, "value", v)).lower()


def scheme_for(method: Any, layer_name: str) -> QuantScheme:
    """The format of vLLM's quantization method `method` for a CPU layer, or UnsupportedQuantization."""
    name = type(method).__name__
    if name in FP8_METHODS:
        block = getattr(method, "weight_block_size", None)
        if block:
            bo, bi = (int(v) for v in block)
            if bi % 32:
                raise UnsupportedQuantization(
                    f"{layer_name}: fp8 blocks of {bo}x{bi}: the input block must be a multiple of 32 for lk_moe")
            return QuantScheme("fp8", bi, bo, "weight", ("weight_scale_inv", "weight_scale"), ("input_scale",),
                               f"fp8 e4m3, {bo}x{bi} block scales ({name})")
        return QuantScheme("fp8", 0, 0, "weight", ("weight_scale",), ("input_scale",),
                           f"fp8 e4m3, per-channel or per-tensor scales ({name})")
    if name in INT4_METHODS:
        bits = int(getattr(method, "num_bits", 0))
        if bits != 4:
            raise UnsupportedQuantization(
                f"{layer_name}: {bits}-bit integer experts ({name}); lk_moe runs 4-bit symmetric integer and fp8 experts")
        if not getattr(method, "symmetric", False):
            raise UnsupportedQuantization(
                f"{layer_name}: asymmetric int4 experts (zero points, {name}); lk_moe runs symmetric int4 only: use a "
                "symmetric checkpoint or keep these layers on the GPU with LVLLM_GPU_LAYERS")
        actorder = getattr(method, "actorder", None)
        if actorder is not None and _value(actorder) not in ("static", "none", "false"):
            raise UnsupportedQuantization(
                f"{layer_name}: int4 experts with activation reordering (actorder={_value(actorder)}, {name}) are not "
                "supported on the CPU")
        strategy = _value(getattr(method, "strategy", ""))
        if strategy == "group":
            group = int(getattr(method, "group_size", 0) or 0)
            if group <= 0 or group % 32:
                raise UnsupportedQuantization(
                    f"{layer_name}: int4 group size {group}: lk_moe needs a positive multiple of 32")
        elif strategy == "channel":
            group = 0
        else:
            raise UnsupportedQuantization(f"{layer_name}: int4 scale strategy {strategy!r} ({name}); lk_moe takes "
                                          "group or channel scales")
        return QuantScheme("int4", group, 0, "weight_packed", ("weight_scale",),
                           ("weight_shape", "weight_g_idx", "input_scale"),
                           f"int4 symmetric, {'group ' + str(group) if group else 'per-channel'} scales "
                           f"(compressed-tensors pack-quantized, {name})")
    raise UnsupportedQuantization(
        f"{layer_name}: {name} experts cannot run on the CPU; lk_moe runs fp8 e4m3 (block, channel or tensor scales) "
        "and symmetric int4 in compressed-tensors pack-quantized form: use such a checkpoint or the bf16 one, or keep "
        "these layers on the GPU with LVLLM_GPU_LAYERS")


def role(weight_name: str, scheme: QuantScheme) -> str | None:
    """'...experts.w13_weight_scale_inv' -> 'scales'; 'codes', 'scales' or None (nothing the CPU needs)."""
    leaf = weight_name.rsplit(".", 1)[-1]
    for prefix in ("w13_", "w2_"):
        if leaf.startswith(prefix):
            suffix = leaf[len(prefix):]
            break
    else:
        raise UnsupportedQuantization(f"{weight_name}: not a w13_/w2_ expert parameter")
    if suffix == scheme.codes:
        return "codes"
    if suffix in scheme.scales:
        return "scales"
    if suffix in scheme.ignored:
        return None
    raise UnsupportedQuantization(f"{weight_name}: the CPU experts ({scheme.description}) do not know {suffix!r}")


def rank_slice(t: Any, part: str, tp_rank: int, tp_size: int):
    """This rank's rows of gate/up (dim 0) or columns of down (dim 1), as vLLM's
    _load_w13/_load_w2 cut them; scalars and size-1 dimensions (per-tensor and
    per-channel down scales) are whole on every rank."""
    if tp_size == 1 or t.dim() < 2:
        return t
    dim = 1 if part == "down" else 0
    size = int(t.shape[dim])
    if size == 1:
        return t
    if size % tp_size:
        raise UnsupportedQuantization(
            f"{part} tensor of shape {tuple(t.shape)} does not split evenly over {tp_size} tensor-parallel ranks")
    per = size // tp_size
    return t.narrow(dim, per * tp_rank, per)


def dequantize_at_load(env) -> bool:
    """LVLLM_EXPERTS_BF16=1: widen quantized experts to bf16 while loading (2-4x the RAM;
    prefill then runs the bf16 AMX path without a per-call dequantization)."""
    raw = env.get("LVLLM_EXPERTS_BF16", "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"LVLLM_EXPERTS_BF16={raw!r}: use 1 (widen quantized experts to bf16 at load) or 0")
    return raw == "1"


class QuantAssembler:
    """One CPU layer: holds each expert projection's codes or scales until the
    other arrives, then converts and packs it into `layer` (a MoELayer): in the
    checkpoint's format, or widened to bf16 when the layer holds bf16."""

    def __init__(self, layer: Any, scheme: QuantScheme, layer_name: str):
        self.layer = layer
        self.scheme = scheme
        self.layer_name = layer_name
        self.widen = layer.weight_format == "bfloat16"
        self._pending: dict[tuple[int, str], dict[str, Any]] = {}

    def shape(self, part: str) -> tuple[int, int]:
        """(out, in) of one expert projection on this rank."""
        H, I = self.layer.hidden, self.layer.intermediate
        return (H, I) if part == "down" else (I, H)

    def add(self, expert: int, part: str, what: str, tensor: Any) -> None:
        if part not in ("gate", "up", "down") or what not in ("codes", "scales"):
            raise ValueError(f"bad expert part {part!r} / {what!r}")
        slot = self._pending.setdefault((expert, part), {})
        slot[what] = tensor.detach().to("cpu", copy=True)  # the loader's tensor may be a view of a mapped file
        if len(slot) == 2:
            del self._pending[(expert, part)]
            q = self.convert(expert, part, slot["codes"], slot["scales"])
            if self.widen:
                self.layer.load_expert(expert, part, qf.dequantize(q))  # float32 -> the layer's bf16
            else:
                self.layer.load_expert_quantized(expert, part, q.codes, q.scales)

    def convert(self, expert: int, part: str, codes: Any, scales: Any) -> qf.Quantized:
        n_out, n_in = self.shape(part)
        what = f"{self.layer_name}.{expert}.{part}_proj"
        if self.scheme.kind == "int4":
            return qf.from_compressed_tensors_int4(codes, scales, (n_out, n_in), group=self.scheme.group, name=what)
        if tuple(codes.shape) != (n_out, n_in):
            raise UnsupportedQuantization(f"{what}: fp8 weight of shape {tuple(codes.shape)}, expected {(n_out, n_in)}")
        block = (self.scheme.block_rows, self.scheme.group) if self.scheme.block_rows else None
        return qf.from_fp8(codes, scales, block=block, name=what)

    def incomplete(self) -> list[str]:
        """Expert projections that received codes or scales but not both."""
        return [f"expert {e} {p} has {'/'.join(sorted(slot))} only" for (e, p), slot in sorted(self._pending.items())]
