"""`lvllm bench moe`: the engine at real model shapes against this machine's own limits.

In one run it measures (1) the read bandwidth of the engine's workers over
node-local memory, the decode roofline, (2) a straightforward PyTorch
implementation (per-expert F.linear, same thread count) and (3) the engine,
both cycling over enough layers that the weights are >= 8x the last-level
cache (DRAM, not cache, is measured) while fitting in free RAM.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

MODEL_SHAPES = {
    # name: (hidden, moe intermediate, experts, top-k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "qwen3-next-80b": (2048, 512, 512, 10),
}
DEFAULT_TOKENS = {"decode": [1], "prefill": [128, 1024]}
# bench dtype -> (layer dtype, scale group along K (the common checkpoints'), int8 activations for int4 decode)
WEIGHT_FORMATS = {"bfloat16": ("bfloat16", 0, True), "int4": ("int4", 128, True), "int4-bf16act": ("int4", 128, False),
                  "fp8": ("fp8", 128, True)}
MIN_WORKING_SET = 4 << 30  # bytes; and >= 8x L3


@dataclass
class Row:
    model: str
    mode: str  # decode / prefill
    tokens: int
    layers: int
    threads: int
    kernel: str
    us_per_layer: float
    gbps: float  # weight bytes streamed per second
    pct_of_bandwidth: float
    tflops: float
    torch_us_per_layer: float | None
    torch_ratio: float | None  # torch time / engine time (> 1: engine faster)
    bandwidth_gbps: float
    phases_us: dict | None = None  # engine phase times per call (see EngineStats)
    dtype: str = "bfloat16"  # expert weights: a WEIGHT_FORMATS key


def expert_bytes(hidden: int, inter: int, dtype_bytes: int = 2) -> int:
    return 3 * hidden * inter * dtype_bytes


def layers_for(layer_bytes: int, l3_bytes: int, free_bytes: int, budget_share: float = 0.6) -> int:
    """Enough layers for >= 8x L3 and >= 4 GiB, as long as they fit in a share of free RAM (at least 1)."""
    want = max(math.ceil(8 * max(l3_bytes, 1) / layer_bytes), math.ceil(MIN_WORKING_SET / layer_bytes), 2)
    fit = int(free_bytes * budget_share // layer_bytes)
    if fit < 1:
        raise MemoryError(
            f"one layer needs {layer_bytes / 2**30:.1f} GiB but only {free_bytes / 2**30:.1f} GiB of RAM is free"
        )
    return max(1, min(want, fit))


ROUTING_STEPS = 64  # distinct routings cycled through, so every expert gets touched, as in real decoding


def routing(tokens: int, experts: int, k: int, seed: int, steps: int = ROUTING_STEPS):
    """[steps, tokens, k] uniform random distinct experts per token (no locality: the worst case for streaming)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.argsort(torch.rand(steps, tokens, experts, generator=g), dim=2)[:, :, :k].to(torch.int32).contiguous()
    w = torch.rand(steps, tokens, k, generator=g)
    return ids, (w / w.sum(dim=2, keepdim=True)).contiguous()


def torch_moe(x, w13, w2, ids, tw):
    """The straightforward PyTorch implementation: loop over the selected experts, F.linear each."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = w2.shape[2]
    flat = ids.view(-1)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tokens = (order // ids.shape[1])
    weights = tw.view(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = tokens[start : start + n]
        h = F.linear(x[rows], w13[e])
        a = F.silu(h[:, :inter]) * h[:, inter:]
        y = F.linear(a, w2[e])
        out.index_add_(0, rows, (y * weights[start : start + n, None]).float())
        start += n
    return out.to(x.dtype)


def _median_us(samples_ns):
    return statistics.median(samples_ns) / 1e3


def bench_moe(
    models: list[str],
    tokens: dict[str, list[int]] | None = None,
    *,
    threads: int | None = None,
    virtual_nodes: int | None = None,
    passes: int = 3,
    with_torch: bool = True,
    dtypes: tuple[str, ...] = ("bfloat16",),
    group: int | None = None,
    l3_bytes: int | None = None,
    free_bytes: int | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> tuple[float, list[Row]]:
    import psutil
    import torch

    from lvllm_cli.moe import get_engine
    from lvllm_cli.moe import native

    lk = native.load()
    tokens = tokens or DEFAULT_TOKENS
    for m in models:
        if m not in MODEL_SHAPES:
            raise ValueError(f"unknown model shape {m!r}; known: {', '.join(MODEL_SHAPES)}")
    for d in dtypes:
        if d not in WEIGHT_FORMATS:
            raise ValueError(f"unknown expert dtype {d!r}; known: {', '.join(WEIGHT_FORMATS)}")
    if group is not None and (group < 0 or group % 32):
        raise ValueError(f"group {group}: a quantization group is a positive multiple of 32, or 0 for one scale per row")
    if l3_bytes is None:
        from lvllm_cli.probe import probe

        l3_bytes = probe(use_nvml=False).cpu.l3_bytes or (32 << 20)
    free_bytes = free_bytes if free_bytes is not None else psutil.virtual_memory().available
    engine = get_engine(threads=threads, virtual_nodes=virtual_nodes)
    nthreads = engine.threads

    bw_bytes = min(max(8 * l3_bytes, 1 << 30), int(free_bytes * 0.3))
    progress(f"measuring read bandwidth over {bw_bytes / 2**30:.1f} GiB with {nthreads} threads")
    bandwidth = lk.read_bandwidth(engine, bw_bytes, 5)
    progress(f"read bandwidth: {bandwidth:.1f} GB/s")

    rows: list[Row] = []
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        for name in models:
            H, I, E, k = MODEL_SHAPES[name]
            layer_bytes = E * expert_bytes(H, I)
            nl = layers_for(layer_bytes, l3_bytes, free_bytes)
            cases = [(mode, t) for mode in ("decode", "prefill") for t in tokens.get(mode, [])]
            torch_us: dict[int, float] = {}
            if with_torch:
                progress(f"{name}: {nl} layers x {layer_bytes / 2**30:.2f} GiB for the PyTorch reference")
                tl = [
                    ((torch.rand(E, 2 * I, H) - 0.5).to(torch.bfloat16) / H**0.5, (torch.rand(E, H, I) - 0.5).to(torch.bfloat16) / I**0.5)
                    for _ in range(nl)
                ]
                for mode, t in cases:
                    x = torch.randn(t, H).to(torch.bfloat16)
                    ids, tw = routing(t, E, k, seed=t)
                    for i, (w13, w2) in enumerate(tl):  # warm-up pass
                        torch_moe(x, w13, w2, ids[i % ROUTING_STEPS], tw[i % ROUTING_STEPS])
                    ns = []
                    call = 0
                    for _ in range(passes):
                        for w13, w2 in tl:
                            s = call % ROUTING_STEPS
                            call += 1
                            t0 = time.perf_counter_ns()
                            torch_moe(x, w13, w2, ids[s], tw[s])
                            ns.append(time.perf_counter_ns() - t0)
                    torch_us[t] = _median_us(ns)
                    progress(f"{name} {mode} M={t}: torch {torch_us[t]:.0f} us/layer")
                del tl
            for dtype in dtypes:
                rows += _time_engine(lk, engine, name, dtype, group, cases, torch_us, bandwidth, l3_bytes, free_bytes,
                                     passes, progress)
    finally:
        torch.set_num_threads(prev_threads)
    return bandwidth, rows


def _time_engine(lk, engine, name, dtype, group, cases, torch_us, bandwidth, l3_bytes, free_bytes, passes,
                 progress) -> list[Row]:
    import torch

    from lvllm_cli.moe import MoELayer

    H, I, E, k = MODEL_SHAPES[name]
    kind, default_group, int8 = WEIGHT_FORMATS[dtype]
    group = default_group if group is None or kind == "bfloat16" else group
    probe_layer = MoELayer.empty(E, H, I, kind, group_size=group, engine=engine)
    per_expert = probe_layer.native.expert_bytes  # packed bytes one expert streams (scales included)
    del probe_layer
    nl = layers_for(E * per_expert, l3_bytes, free_bytes)
    progress(f"{name} {dtype}: packing {nl} layers x {E * per_expert / 2**30:.2f} GiB for the engine")
    layers = _fill_random([MoELayer.empty(E, H, I, kind, group_size=group, engine=engine, int8_activations=int8)
                           for _ in range(nl)], H)
    rows = []
    for mode, t in cases:
        x = torch.randn(t, H).to(torch.bfloat16)
        out = torch.empty_like(x)
        ids, tw = routing(t, E, k, seed=t)
        args = (x.data_ptr(), "bfloat16", ids.data_ptr(), False, tw.data_ptr(), t, k, out.data_ptr(), "bfloat16",
                ROUTING_STEPS)
        lk.time_layers([l.native for l in layers], *args, 1)  # warm-up pass
        engine.reset_stats()
        ns = lk.time_layers([l.native for l in layers], *args, max(passes, 5 if t == 1 else passes))
        st = engine.stats()
        phases = {k2: round(v / max(st["calls"], 1) / 1e3, 1) for k2, v in st["phase_ns"].items()}
        us = _median_us(ns)
        # Weight bytes one call streams: its distinct experts (averaged over the routings).
        active = sum(int(torch.unique(ids[s]).numel()) for s in range(ROUTING_STEPS)) / ROUTING_STEPS
        gbps = active * per_expert / (us * 1e-6) / 1e9
        flops = 2 * t * k * 3 * H * I
        tus = torch_us.get(t) if dtype == "bfloat16" else None
        rows.append(
            Row(
                model=name, mode=mode, tokens=t, layers=nl, threads=engine.threads,
                kernel=layers[0].kernel + ("+int8" if layers[0].int8_activations else ""),
                us_per_layer=round(us, 1), gbps=round(gbps, 1), pct_of_bandwidth=round(100 * gbps / bandwidth, 1),
                tflops=round(flops / (us * 1e-6) / 1e12, 3),
                torch_us_per_layer=round(tus, 1) if tus else None,
                torch_ratio=round(tus / us, 2) if tus else None,
                bandwidth_gbps=round(bandwidth, 1),
                phases_us=phases,
                dtype=dtype if group == default_group else f"{dtype}-g{group}",
            )
        )
        progress(f"{name} {dtype} {mode} M={t}: {us:.0f} us/layer, {gbps:.1f} GB/s ({100 * gbps / bandwidth:.0f}% of bandwidth)")
    return rows


def _fill_random(layers: list, hidden: int) -> list:
    """Random experts in every layer (uniform, scaled like an initialised linear layer), each its own seed."""
    for i, layer in enumerate(layers):
        layer.fill_random(seed=i + 1, scale=1.0 / math.sqrt(hidden))
    return layers


def _time_tokens(lk, layers, tokens: int, hidden: int, experts: int, topk: int, seconds: float, seed: int = 0) -> float:
    """Median microseconds per layer call with `tokens` rows, cycling over `layers` for about `seconds`."""
    import torch

    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    out = torch.empty_like(x)
    ids, tw = routing(tokens, experts, topk, seed=seed)
    args = (x.data_ptr(), "bfloat16", ids.data_ptr(), False, tw.data_ptr(), tokens, topk, out.data_ptr(), "bfloat16",
            ROUTING_STEPS)
    ns = lk.time_layers([l.native for l in layers], *args, 1)  # warm-up pass, and the time one pass takes
    passes = max(1, int(seconds / max(sum(ns) / 1e9, 1e-6)))
    return _median_us(lk.time_layers([l.native for l in layers], *args, passes))


def bench_moe_decode(hidden: int, inter: int, experts: int, topk: int, threads: int, cpus=None, seconds: float = 2.0) -> float:
    """Microseconds per decode layer (M=1) at these shapes, for `lvllm tune --measure`."""
    import psutil

    from lvllm_cli.moe import MoELayer, get_engine, native
    from lvllm_cli.probe import probe

    lk = native.load()
    engine = get_engine(threads=threads, cpus=cpus)
    layer_bytes = experts * expert_bytes(hidden, inter)
    nl = layers_for(layer_bytes, probe(use_nvml=False).cpu.l3_bytes or (32 << 20), psutil.virtual_memory().available)
    layers = _fill_random([MoELayer.empty(experts, hidden, inter, "bfloat16", engine=engine) for _ in range(nl)], hidden)
    return _time_tokens(lk, layers, 1, hidden, experts, topk, seconds)


# Working set of the expert-format benchmark: this many times the last-level cache (so DRAM is what is timed)
# and at least 2 layers, within a share of free RAM.  Smaller than `layers_for` (>= 4 GiB): tune measures
# two formats on top of its thread counts, and the ratio between formats is what it needs.
FORMAT_CACHE_MULTIPLE = 4


def layers_over_cache(layer_bytes: int, l3_bytes: int, free_bytes: int, budget_share: float = 0.3) -> int:
    """At least 2 layers and FORMAT_CACHE_MULTIPLE x L3, as long as they fit in a share of free RAM (at least 1)."""
    want = max(math.ceil(FORMAT_CACHE_MULTIPLE * max(l3_bytes, 1) / layer_bytes), 2)
    fit = int(free_bytes * budget_share // layer_bytes)
    if fit < 1:
        raise MemoryError(
            f"one layer needs {layer_bytes / 2**30:.1f} GiB but only {free_bytes / 2**30:.1f} GiB of RAM is free"
        )
    return min(want, fit)


def bench_moe_format(
    hidden: int,
    inter: int,
    experts: int,
    topk: int,
    dtype: str,
    group: int,
    threads: int,
    cpus=None,
    seconds: float = 1.0,
    prefill_tokens: int = 128,
    *,
    l3_bytes: int | None = None,
    free_bytes: int | None = None,
) -> dict:
    """One expert format at these shapes: µs per layer for a decode token (M=1) and a prefill chunk
    (M=prefill_tokens), each timed for about `seconds`, on random weights larger than the cache.

    dtype: bfloat16, int4 or fp8; group: the scale group along the input dimension (0: one per row).
    For `lvllm tune --measure`'s experts-format choice."""
    import psutil

    from lvllm_cli.moe import MoELayer, get_engine, native

    lk = native.load()
    engine = get_engine(threads=threads, cpus=cpus)
    if l3_bytes is None:
        from lvllm_cli.probe import probe

        l3_bytes = probe(use_nvml=False).cpu.l3_bytes or (32 << 20)
    free_bytes = psutil.virtual_memory().available if free_bytes is None else free_bytes
    first = MoELayer.empty(experts, hidden, inter, dtype, group_size=group, engine=engine)
    nl = layers_over_cache(first.packed_bytes, l3_bytes, free_bytes)
    more = [MoELayer.empty(experts, hidden, inter, dtype, group_size=group, engine=engine) for _ in range(nl - 1)]
    layers = _fill_random([first, *more], hidden)
    return {
        "dtype": dtype,
        "group": group,
        "layers": nl,
        "layer_bytes": first.packed_bytes,
        "threads": engine.threads,
        "kernel": first.kernel,
        "decode_us": round(_time_tokens(lk, layers, 1, hidden, experts, topk, seconds), 1),
        "prefill_tokens": prefill_tokens,
        "prefill_us": round(_time_tokens(lk, layers, prefill_tokens, hidden, experts, topk, seconds, seed=1), 1),
    }


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
