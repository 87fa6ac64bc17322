"""Python face of the lk_moe engine: one MoE layer's routed experts on the CPU.

    layer = MoELayer(w13, w2)                  # [E, 2I, H], [E, H, I]: torch or NumPy
    out = layer.forward(x, topk_ids, topk_weights)

or incrementally, as checkpoint shards arrive (peak memory stays near the
packed size):

    layer = MoELayer.empty(E, H, I, "bfloat16")
    layer.load_expert(e, "gate", w1_e); layer.load_expert(e, "up", w3_e); layer.load_expert(e, "down", w2_e)

Semantics are vLLM's fused_experts (see lvllm_cli/native/engine.h).  All
layers of a process share one engine (worker pool) per placement setting.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from lvllm_cli.moe import native
from lvllm_cli.moe.placement import Group, Settings, default_groups, plan_groups, local_topology, settings_from_env

WEIGHT_DTYPES = ("bfloat16", "float16")
QUANT_FORMATS = ("int4", "fp8")
PARTS = ("gate", "up", "gate_up", "down")

_engines: dict[Any, Any] = {}
_engines_lock = threading.Lock()


def _spin_us() -> int:
    raw = os.environ.get("LK_SPIN_US", "2000")
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"LK_SPIN_US={raw!r} is not a whole number of microseconds") from None


def get_engine(
    *,
    threads: int | None = None,
    nodes: Sequence[int] | None = None,
    cpus: Sequence[int] | None = None,
    virtual_nodes: int | None = None,
    groups: Sequence[Group] | None = None,
    isa: str | None = None,
):
    """The process-wide engine for these placement settings (created once).

    Unset arguments come from the environment (LK_THREADS, LK_NODES, LK_CPUS,
    LK_VIRTUAL_NODES, LK_SMT, LK_ISA, LK_SPIN_US); see placement.py.
    """
    lk = native.load()
    isa = isa or os.environ.get("LK_ISA") or "amx"
    if groups is None:
        explicit = (threads, nodes, cpus, virtual_nodes)
        if all(v is None for v in explicit):
            groups = default_groups()
        else:
            env = settings_from_env(os.environ)
            s = Settings(
                threads=threads if threads is not None else env.threads,
                cpus=tuple(cpus) if cpus is not None else env.cpus,
                nodes=tuple(nodes) if nodes is not None else env.nodes,
                virtual_nodes=virtual_nodes if virtual_nodes is not None else env.virtual_nodes,
                smt=env.smt,
                reserve=env.reserve,
            )
            groups = plan_groups(local_topology(), set(os.sched_getaffinity(0)), s)
    key = (tuple(groups), isa)
    with _engines_lock:
        eng = _engines.get(key)
        if eng is None:
            eng = lk.Engine([(g.numa_node, list(g.cpus)) for g in groups], _spin_us(), isa)
            _engines[key] = eng
        return eng


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


def _weight_dtype_of(a: Any) -> str:
    name = str(a.dtype).replace("torch.", "")
    if name in WEIGHT_DTYPES:
        return name
    raise TypeError(f"expert weights must be bfloat16 or float16 tensors, got {name}")


def _cpu_array(a: Any, what: str):
    """Something nanobind can take as a CPU array (torch tensors and NumPy arrays both speak DLPack)."""
    if _is_torch(a):
        if a.device.type != "cpu":
            raise ValueError(f"{what} is on {a.device}; the CPU engine needs CPU tensors (use .cpu())")
        return a.detach()
    return a


class MoELayer:
    def __init__(
        self,
        w13: Any = None,
        w2: Any = None,
        *,
        threads: int | None = None,
        nodes: Sequence[int] | None = None,
        virtual_nodes: int | None = None,
        engine: Any = None,
        isa: str | None = None,
        _shape: tuple[int, int, int, str] | None = None,
        group_size: int = 0,
        int8_activations: bool = True,
    ):
        lk = native.load()
        if _shape is None:
            if w13 is None or w2 is None:
                raise TypeError("MoELayer(w13, w2) needs both weight tensors (or use MoELayer.empty)")
            if len(w13.shape) != 3 or len(w2.shape) != 3:
                raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I]; got {tuple(w13.shape)} and {tuple(w2.shape)}")
            E, two_i, H = (int(v) for v in w13.shape)
            if two_i % 2:
                raise ValueError(f"w13's second dimension ({two_i}) must be 2 x intermediate size")
            I = two_i // 2
            if tuple(int(v) for v in w2.shape) != (E, H, I):
                raise ValueError(f"w2 has shape {tuple(w2.shape)}, expected {(E, H, I)} to match w13 {tuple(w13.shape)}")
            dtype = _weight_dtype_of(w13)
            if _weight_dtype_of(w2) != dtype:
                raise TypeError(f"w13 is {dtype} but w2 is {_weight_dtype_of(w2)}")
        else:
            E, H, I, dtype = _shape
        if dtype not in WEIGHT_DTYPES + QUANT_FORMATS:
            raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES + QUANT_FORMATS}, got {dtype!r}")
        self.engine = engine or get_engine(threads=threads, nodes=nodes, virtual_nodes=virtual_nodes, isa=isa)
        self._native = lk.MoELayer(self.engine, E, H, I, dtype, int(group_size), bool(int8_activations))
        if _shape is None:
            for e in range(E):
                self.load_expert(e, "gate_up", w13[e])
                self.load_expert(e, "down", w2[e])

    @classmethod
    def empty(cls, experts: int, hidden: int, intermediate: int, dtype: str = "bfloat16", *, group_size: int = 0,
              **kwargs) -> "MoELayer":
        """Weights to be loaded expert by expert.  dtype: bfloat16, float16, int4 or fp8 (e4m3);
        quantized layers take a scale group along the input dimension (0: one scale per row).
        int4 layers decode on int8 activations where the CPU has VNNI unless int8_activations=False."""
        for name, v in (("experts", experts), ("hidden", hidden), ("intermediate", intermediate)):
            if int(v) <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        return cls(_shape=(int(experts), int(hidden), int(intermediate), str(dtype).replace("torch.", "")),
                   group_size=group_size, **kwargs)

    # -- facts ---------------------------------------------------------------
    experts = property(lambda self: self._native.experts)
    hidden = property(lambda self: self._native.hidden)
    intermediate = property(lambda self: self._native.intermediate)
    weight_dtype = property(lambda self: self._native.weight_dtype)
    weight_format = property(lambda self: self._native.weight_format, doc="bfloat16, float16, int4 or fp8_e4m3")
    group_size = property(lambda self: self._native.group_size)
    kernel = property(lambda self: self._native.kernel, doc="kernel family that runs (amx, avx512_bf16, avx512, avx2, scalar)")
    int8_activations = property(lambda self: self._native.int8_activations,
                                doc="int4 decode runs on int8 activations (16-value blocks), not bf16")
    packed_bytes = property(lambda self: self._native.packed_bytes)
    slices = property(lambda self: self._native.slices, doc="(first, count) of the intermediate rows held by each node group")
    complete = property(lambda self: self._native.complete, doc="every expert's gate, up and down weights are loaded")

    @property
    def native(self):
        return self._native

    # -- weights -------------------------------------------------------------
    def load_expert(self, expert: int, part: str, weights: Any) -> None:
        """Pack one expert's gate [I,H], up [I,H], gate_up [2I,H] or down [H,I] (torch or NumPy; bf16/fp16/fp32)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if not 0 <= int(expert) < self.experts:
            raise ValueError(f"expert {expert} out of range [0, {self.experts})")
        self._native.load(int(expert), part, _cpu_array(weights, f"expert {expert} {part} weights"))

    def load_expert_quantized(self, expert: int, part: str, codes: Any, scales: Any) -> None:
        """Pack one part of a quantized layer in the canonical form of lvllm_cli.moe.quant_formats:
        codes [out, in] (int4: int8 in [-8, 7]; fp8: e4m3 as uint8 or float8_e4m3fn), scales [out, groups]."""
        import numpy as np

        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if not 0 <= int(expert) < self.experts:
            raise ValueError(f"expert {expert} out of range [0, {self.experts})")
        if self.weight_format not in ("int4", "fp8_e4m3"):
            raise ValueError(f"this layer holds {self.weight_format} weights: use load_expert")
        if _is_torch(codes):
            codes = codes.detach().cpu()
            if str(codes.dtype).startswith("torch.float8"):
                import torch

                codes = codes.view(torch.uint8)
            codes = codes.numpy()
        codes = np.asarray(codes)
        if self.weight_format == "int4":
            if codes.dtype != np.int8:
                raise TypeError(f"int4 codes must be int8, got {codes.dtype}")
            if codes.size and (codes.min() < -8 or codes.max() > 7):
                bad = np.argwhere((codes < -8) | (codes > 7))[0]
                raise ValueError(f"int4 code {int(codes[tuple(bad)])} at {tuple(int(v) for v in bad)} is outside [-8, 7]")
        if _is_torch(scales):
            scales = scales.detach().cpu().float().numpy()
        scales = np.ascontiguousarray(np.asarray(scales, dtype=np.float32))
        self._native.load_quantized(int(expert), part, codes, scales)

    def fill_random(self, seed: int = 0, scale: float = 1e-3) -> None:
        """Random weights in [-scale, scale] for every part not loaded yet (vLLM's --load-format dummy)."""
        self._native.fill_random(int(seed), float(scale))

    # -- compute -------------------------------------------------------------
    def forward(self, x: Any, topk_ids: Any, topk_weights: Any, out: Any = None):
        """out[m] = sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m]), same dtype (and kind) as x."""
        x = _cpu_array(x, "x")
        topk_ids = _cpu_array(topk_ids, "topk_ids")
        topk_weights = _cpu_array(topk_weights, "topk_weights")
        if len(x.shape) != 2 or int(x.shape[1]) != self.hidden:
            raise ValueError(f"x must be [tokens, {self.hidden}], got {tuple(x.shape)}")
        if out is None:
            if _is_torch(x):
                import torch

                out = torch.empty(tuple(x.shape), dtype=x.dtype)
            else:
                import numpy as np

                out = np.empty(tuple(x.shape), dtype=x.dtype)
        else:
            out = _cpu_array(out, "out")
        self._native.forward(x, topk_ids, topk_weights, out)
        return out

    def submit(self, x_ptr: int, x_dtype: str, topk_ids_ptr: int, ids_int64: bool, topk_weights_ptr: int,
               tokens: int, k: int, out_ptr: int, out_dtype: str, ldx: int = 0, ldo: int = 0) -> None:
        """Start a forward on raw host pointers and return at once; `wait()` completes it.

        Expert ids out of range are skipped and counted in engine.stats()["invalid_ids"]
        (this path may run where no exception can be raised).
        """
        self._native.submit_ptr(x_ptr, x_dtype, ldx, topk_ids_ptr, ids_int64, topk_weights_ptr, tokens, k,
                                out_ptr, out_dtype, ldo)

    def wait(self) -> None:
        self.engine.wait()
