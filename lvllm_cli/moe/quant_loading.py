"""Quantized checkpoints into CPU layers, without importing vLLM.

vLLM picks a quantization method per MoE layer from the checkpoint's
quantization config.  For a CPU layer the plugin asks that method only two
things: the names and shapes of its parameters (so the model's own
`load_weights` finds them) and the format facts below.  The tensors vLLM's
loader then hands over, one expert projection and one kind at a time and in
any order, are sliced for this tensor-parallel rank, kept until an expert
projection has every piece its format needs (codes and scales; GPTQ and AWQ
also their zero points), converted with `quant_formats` and packed; the host
copies go as soon as each part is packed.

Taken: fp8 e4m3 (vLLM's Fp8MoEMethod and compressed-tensors W8A8-FP8: block,
per-channel or per-tensor weight scales; activation scales are ignored, the
CPU computes with bf16 activations) and 4-bit symmetric integer weights in
compressed-tensors pack-quantized form (group or per-channel scales), in
GPTQ form (sym=true, desc_act=false: AutoGPTQMoEMethod, or MoeWNA16Method
where Marlin cannot take the layer) and in AutoAWQ's GEMM form when every
zero point is the symmetric midpoint 8 (AutoAWQMoEMethod / MoeWNA16Method;
checked per tensor while loading).  Everything else is refused with a message
that names the layer or tensor, the format and what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lvllm_cli.moe import quant_formats as qf
from lvllm_cli.moe.quant_formats import UnsupportedQuantization

FP8_METHODS = ("Fp8MoEMethod", "CompressedTensorsW8A8Fp8MoEMethod")
INT4_METHODS = ("CompressedTensorsWNA16MarlinMoEMethod", "CompressedTensorsWNA16MoEMethod")
GPTQ_METHODS = ("AutoGPTQMoEMethod",)  # quant_method gptq / gptq_marlin / auto_gptq
AWQ_METHODS = ("AutoAWQMoEMethod",)  # quant_method awq / awq_marlin / auto_awq
WNA16_METHODS = ("MoeWNA16Method",)  # vLLM's fallback for GPTQ/AWQ layers Marlin cannot take (and moe_wna16)
# vLLM's RoutedExperts passes `intermediate_size_full` to create_weights of these methods only
# (_needs_intermediate_size_param); AutoGPTQMoEMethod and the compressed-tensors ones cannot do without it.
NEEDS_INTERMEDIATE_SIZE_FULL = GPTQ_METHODS + INT4_METHODS
SHARD_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}
ROLES = ("codes", "scales", "zeros", "g_idx")
_GPU_FIX = "keep these layers on the GPU with LVLLM_GPU_LAYERS"


@dataclass(frozen=True)
class QuantScheme:
    kind: str  # engine layer dtype: "fp8" or "int4"
    group: int  # scale group along the input dimension (0: one scale per row)
    block_rows: int  # fp8 block scales: output rows per scale block (0: not block-quantized)
    codes: str  # parameter suffix (after w13_ / w2_) that carries the codes
    scales: tuple[str, ...]  # suffixes that carry weight scales
    ignored: tuple[str, ...]  # suffixes the CPU does not need
    description: str
    packing: str = ""  # "gptq" / "awq": their int32 packings, stored [in, out]; "" for the [out, in] ones
    zeros: str = ""  # suffix of the packed zero points (GPTQ/AWQ): needed to check they are all 8
    g_idx: str = ""  # suffix of GPTQ's group index: checked to be the plain order k // group
    gptq_v2: bool = False  # GPTQ checkpoint_format gptq_v2 stores the zero point itself, v1 stores zero - 1

    @property
    def pieces(self) -> tuple[str, ...]:
        """What one expert projection needs before it can be converted."""
        return ("codes", "scales", "zeros") if self.zeros else ("codes", "scales")

    @property
    def transposed(self) -> bool:
        """GPTQ/AWQ tensors are [in, out] (vLLM marks them is_transposed): TP cuts gate/up along dim 1
        and down along dim 0, the other way round from the [out, in] formats."""
        return self.packing in ("gptq", "awq")


def _value(v: Any) -> str:
    """Enum members (compressed-tensors' strategies) and plain strings alike, lower case."""
    return str(getattr(v, "value", v)).lower()


def scheme_for(method: Any, layer_name: str) -> QuantScheme:
    """The format of vLLM's quantization method `method` for a CPU layer, or UnsupportedQuantization."""
    name = type(method).__name__
    if name in FP8_METHODS:
        return _fp8_scheme(method, layer_name, name)
    if name in INT4_METHODS:
        return _compressed_tensors_int4_scheme(method, layer_name, name)
    cfg = getattr(method, "quant_config", None)
    if name in GPTQ_METHODS:
        return _gptq_scheme(cfg.weight_bits, cfg.group_size, cfg.is_sym, cfg.desc_act, cfg.full_config, layer_name, name)
    if name in AWQ_METHODS:
        return _awq_scheme(cfg.weight_bits, cfg.group_size, cfg.zero_point, cfg.full_config, layer_name, name)
    if name in WNA16_METHODS:
        return _moe_wna16_scheme(cfg, layer_name, name)
    raise UnsupportedQuantization(
        f"{layer_name}: {name} experts cannot run on the CPU; lk_moe runs fp8 e4m3 (block, channel or tensor scales) "
        "and symmetric int4 (compressed-tensors pack-quantized, GPTQ sym=true, AWQ with zero points 8): use such a "
        f"checkpoint or the bf16 one, or {_GPU_FIX}")


def _fp8_scheme(method: Any, layer_name: str, name: str) -> QuantScheme:
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


def _four_bits(bits: Any, layer_name: str, fmt: str) -> None:
    if int(bits or 0) != 4:
        raise UnsupportedQuantization(
            f"{layer_name}: {bits}-bit integer experts ({fmt}); lk_moe runs 4-bit symmetric integer and fp8 experts: "
            f"use such a checkpoint or {_GPU_FIX}")


def _int4_group(group: Any, layer_name: str, fmt: str) -> int:
    """GPTQ/AWQ group_size: -1 is one scale per output row (0 here); a group must be a positive multiple of
    32, lk_moe's k-pairs and panels."""
    g = int(group if group is not None else -1)
    if g in (-1, 0):
        return 0
    if g < 0 or g % 32:
        raise UnsupportedQuantization(
            f"{layer_name}: int4 group size {g} ({fmt}): lk_moe needs a positive multiple of 32 or per-channel "
            f"scales; {_GPU_FIX}")
    return g


def _compressed_tensors_int4_scheme(method: Any, layer_name: str, name: str) -> QuantScheme:
    _four_bits(getattr(method, "num_bits", 0), layer_name, name)
    if not getattr(method, "symmetric", False):
        raise UnsupportedQuantization(
            f"{layer_name}: asymmetric int4 experts (zero points, {name}); lk_moe runs symmetric int4 only: use a "
            f"symmetric checkpoint or {_GPU_FIX}")
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
                       f"int4 symmetric, {_groups(group)} scales (compressed-tensors pack-quantized, {name})")


def _groups(group: int) -> str:
    return f"group {group}" if group else "per-channel"


def _gptq_scheme(bits, group, sym, desc_act, full_config, layer_name: str, name: str) -> QuantScheme:
    fmt = f"GPTQ, {name}"
    _four_bits(bits, layer_name, fmt)
    if not sym:
        raise UnsupportedQuantization(
            f"{layer_name}: asymmetric GPTQ experts (sym=false, {name}); lk_moe runs symmetric int4 only: use a "
            f"sym=true GPTQ or a symmetric compressed-tensors checkpoint, or {_GPU_FIX}")
    g = _int4_group(group, layer_name, fmt)
    if desc_act and g:  # vLLM too treats desc_act with one group per row as no reordering
        raise UnsupportedQuantization(
            f"{layer_name}: GPTQ experts with activation reordering (desc_act=true, {name}) cannot run on the CPU: "
            f"use a checkpoint quantized with desc_act=false or {_GPU_FIX}")
    v2 = str((full_config or {}).get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    return QuantScheme("int4", g, 0, "qweight", ("scales",), (),
                       f"int4 symmetric, {_groups(g)} scales (GPTQ{' v2' if v2 else ''}, {name})",
                       packing="gptq", zeros="qzeros", g_idx="g_idx", gptq_v2=v2)


def _awq_scheme(bits, group, zero_point, full_config, layer_name: str, name: str) -> QuantScheme:
    fmt = f"AWQ, {name}"
    _four_bits(bits, layer_name, fmt)
    version = str((full_config or {}).get("version", "gemm")).lower()
    if version != "gemm":  # vLLM reads every AWQ checkpoint as GEMM-packed; the others pack differently
        raise UnsupportedQuantization(
            f"{layer_name}: AWQ version {version!r} ({name}): lk_moe reads AutoAWQ's GEMM packing only; use a GEMM "
            f"or compressed-tensors checkpoint, or {_GPU_FIX}")
    if not zero_point:
        raise UnsupportedQuantization(
            f"{layer_name}: AWQ without zero points (zero_point=false, {name}) has no published GEMM packing lk_moe "
            f"knows: use a compressed-tensors symmetric int4 checkpoint or {_GPU_FIX}")
    g = _int4_group(group, layer_name, fmt)
    return QuantScheme("int4", g, 0, "qweight", ("scales",), (),
                       f"int4, zero points 8 (checked at load), {_groups(g)} scales (AWQ GEMM, {name})",
                       packing="awq", zeros="qzeros")


def _moe_wna16_scheme(cfg: Any, layer_name: str, name: str) -> QuantScheme:
    """MoeWNA16Method keeps the checkpoint's own packing (its loader converts on the GPU, which the CPU
    layer bypasses): GPTQ or AWQ, told apart by the config it was built from."""
    full = getattr(cfg, "full_config", None) or {}
    packing = str(getattr(cfg, "linear_quant_method", "")).lower()
    if packing == "gptq":
        return _gptq_scheme(cfg.weight_bits, cfg.group_size, not cfg.has_zp, bool(full.get("desc_act", False)), full,
                            layer_name, name)
    if packing in ("awq", "awq_marlin"):
        return _awq_scheme(cfg.weight_bits, cfg.group_size, cfg.has_zp, full, layer_name, name)
    raise UnsupportedQuantization(f"{layer_name}: {name} over {packing!r} checkpoints: lk_moe reads GPTQ and AWQ "
                                  f"packings only; {_GPU_FIX}")


def role(weight_name: str, scheme: QuantScheme) -> str | None:
    """'...experts.w13_weight_scale_inv' -> 'scales'; one of ROLES, or None (nothing the CPU needs)."""
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
    if scheme.zeros and suffix == scheme.zeros:
        return "zeros"
    if scheme.g_idx and suffix == scheme.g_idx:
        return "g_idx"
    if suffix in scheme.ignored:
        return None
    raise UnsupportedQuantization(f"{weight_name}: the CPU experts ({scheme.description}) do not know {suffix!r}")


def rank_slice(t: Any, part: str, tp_rank: int, tp_size: int, *, transposed: bool = False):
    """This rank's share of one expert tensor, cut where vLLM's _load_w13/_load_w2 cut it: the
    intermediate dimension, which is dim 0 of gate/up and dim 1 of down in [out, in] tensors and the
    other way round in transposed ([in, out]: GPTQ/AWQ) ones.  Scalars and size-1 dimensions (per-tensor
    and per-channel down scales) are whole on every rank, and so is a 1-D tensor without that dimension
    (GPTQ's gate/up g_idx, which _load_g_idx copies whole; down's g_idx is cut)."""
    if tp_size == 1:
        return t
    if transposed:
        dim = 0 if part == "down" else 1
        if t.dim() <= dim:
            return t
    else:
        if t.dim() < 2:
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


def int8_activations(env) -> bool:
    """LVLLM_INT4_ACTIVATIONS=bf16: int4 experts decode on bf16 activations instead of int8 blocks
    of 16 (VNNI CPUs only; about 3x slower unpacking, for comparing accuracy)."""
    raw = env.get("LVLLM_INT4_ACTIVATIONS", "").strip().lower()
    if raw not in ("", "int8", "bf16"):
        raise ValueError(f"LVLLM_INT4_ACTIVATIONS={raw!r}: use int8 (the default) or bf16")
    return raw != "bf16"


class QuantAssembler:
    """One CPU layer: holds the pieces of each expert projection (codes, scales, and zero points for
    GPTQ/AWQ) until all have arrived, then converts and packs it into `layer` (a MoELayer): in the
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
        if part not in ("gate", "up", "down") or what not in ROLES:
            raise ValueError(f"bad expert part {part!r} / {what!r}")
        t = tensor.detach().to("cpu", copy=True)  # the loader's tensor may be a view of a mapped file
        if what == "g_idx":
            self.check_g_idx(expert, part, t)  # nothing to keep: it may come before or after the rest
            return
        if what not in self.scheme.pieces:
            raise ValueError(f"{self._name(expert, part)}: {what} is not part of {self.scheme.description}")
        slot = self._pending.setdefault((expert, part), {})
        slot[what] = t
        if len(slot) == len(self.scheme.pieces):
            del self._pending[(expert, part)]
            q = self.convert(expert, part, slot)
            if self.widen:
                self.layer.load_expert(expert, part, qf.dequantize(q))  # float32 -> the layer's bf16
            else:
                self.layer.load_expert_quantized(expert, part, q.codes, q.scales)

    def _name(self, expert: int, part: str) -> str:
        return f"{self.layer_name}.{expert}.{part}_proj"

    def convert(self, expert: int, part: str, pieces: dict[str, Any]) -> qf.Quantized:
        n_out, n_in = self.shape(part)
        what = self._name(expert, part)
        codes, scales, group = pieces["codes"], pieces["scales"], self.scheme.group
        if self.scheme.packing == "gptq":
            return qf.from_gptq_int4(codes, pieces["zeros"], scales, group=group, v2=self.scheme.gptq_v2,
                                     shape=(n_out, n_in), name=what)
        if self.scheme.packing == "awq":
            return qf.from_awq_int4(codes, pieces["zeros"], scales, group=group, shape=(n_out, n_in), name=what)
        if self.scheme.kind == "int4":
            return qf.from_compressed_tensors_int4(codes, scales, (n_out, n_in), group=group, name=what)
        if tuple(codes.shape) != (n_out, n_in):
            raise UnsupportedQuantization(f"{what}: fp8 weight of shape {tuple(codes.shape)}, expected {(n_out, n_in)}")
        block = (self.scheme.block_rows, self.scheme.group) if self.scheme.block_rows else None
        return qf.from_fp8(codes, scales, block=block, name=what)

    def check_g_idx(self, expert: int, part: str, g_idx: Any) -> None:
        """GPTQ stores g_idx[k] = k // group unless it was quantized with activation reordering, which
        the scales cannot follow on the CPU.  Down's g_idx arrives cut for this TP rank and keeps the
        global group numbers, so the order is checked from its first entry on."""
        n_in = self.shape(part)[1]
        name = f"{self._name(expert, part)}.g_idx"
        gi = g_idx.numpy().astype(np.int64).reshape(-1)
        if gi.shape != (n_in,):
            raise UnsupportedQuantization(f"{name}: GPTQ g_idx of shape {tuple(gi.shape)}, expected ({n_in},)")
        if not np.array_equal(gi - gi[0], np.arange(n_in) // (self.scheme.group or n_in)):
            raise UnsupportedQuantization(
                f"{name}: GPTQ with activation reordering (desc_act: g_idx is not k // group) cannot run on the "
                f"CPU: use a checkpoint quantized with desc_act=false or {_GPU_FIX}")

    def incomplete(self) -> list[str]:
        """Expert projections that received some of their pieces but not all."""
        out = []
        for (e, p), slot in sorted(self._pending.items()):
            lacking = [w for w in self.scheme.pieces if w not in slot]
            out.append(f"expert {e} {p} has {'/'.join(sorted(slot))} only, lacks {'/'.join(lacking)}")
        return out
