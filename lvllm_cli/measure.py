"""`lvllm tune --measure`: time the CPU-experts engine at the model's shapes; keep the fastest thread count
and, for a quantized checkpoint, feed the measured speeds of its format and of bf16 to the experts-format choice.

The benchmarks themselves are `lvllm_cli.moe.bench.bench_moe_decode` and
`bench_moe_format` (the engine issue's `lvllm bench moe`); this module only
chooses what to measure and what to keep.  `load_bench()` and
`load_format_bench()` are the only places that reach for the engine, so tests
can substitute them and builds without the engine skip measurement cleanly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from lvllm_cli.experts_format import PREFILL_TOKENS, Speed
from lvllm_cli.model_facts import ModelFacts, Quant
from lvllm_cli.plan import Plan, Request, Worker, build_plan, cpu_env
from lvllm_cli.ranges import format_cpulist

# bench(hidden, inter, experts, topk, threads, cpus, seconds) -> microseconds per layer
BenchFn = Callable[[int, int, int, int, int, "list[int] | None", float], float]
# format_bench(hidden, inter, experts, topk, dtype, group, threads, cpus, seconds, prefill_tokens)
#   -> {"decode_us": µs per layer at M=1, "prefill_us": µs per layer at M=prefill_tokens, ...}
FormatBenchFn = Callable[[int, int, int, int, str, int, int, "list[int] | None", float, int], dict]


def _engine_bench(name: str):
    try:
        from lvllm_cli.moe import bench
    except ImportError:
        return None
    return getattr(bench, name)


def load_bench() -> BenchFn | None:
    """The engine's decode benchmark, or None when this build has no engine module."""
    return _engine_bench("bench_moe_decode")


def load_format_bench() -> FormatBenchFn | None:
    """The engine's per-format benchmark, or None when this build has no engine module."""
    return _engine_bench("bench_moe_format")


def engine_format(quant: Quant) -> tuple[str, int]:
    """The engine's (dtype, scale group along the input) for a checkpoint's quantized experts."""
    if quant.method == "fp8":
        return "fp8", quant.block[1] if quant.block else 0
    if quant.method == "int4":
        return "int4", quant.group_size
    raise ValueError(f"{quant.label} experts are not quantized")


def thread_candidates(n: int, nodes: int) -> list[int]:
    """n, 3n/4, n/2, n/4 (each a multiple of the node count, so every node gets the same share), largest first."""
    nodes = max(1, nodes)
    out: list[int] = []
    for frac in (1.0, 0.75, 0.5, 0.25):
        k = max(nodes, int(math.floor(n * frac / nodes)) * nodes) if n >= nodes else n
        k = min(k, n)
        if k >= 1 and k not in out:
            out.append(k)
    return out


def pick_cpus(worker: Worker, k: int, node_of: dict[int, int]) -> list[int]:
    """k of the worker's CPUs, spread evenly over its nodes (lowest ids first within a node)."""
    by_node: dict[int, list[int]] = {}
    for c in worker.cpus:
        by_node.setdefault(node_of.get(c, 0), []).append(c)
    nodes = sorted(by_node)
    out: list[int] = []
    i = 0
    while len(out) < k:
        progressed = False
        for n in nodes:
            if i < len(by_node[n]) and len(out) < k:
                out.append(by_node[n][i])
                progressed = True
        if not progressed:
            break
        i += 1
    return sorted(out)


def measure_threads(
    plan: Plan,
    facts: ModelFacts,
    node_of: dict[int, int],
    bench: BenchFn,
    *,
    seconds: float = 2.0,
    report: Callable[[str], None] = lambda s: None,
) -> Plan:
    """Time each thread-count candidate on worker 0's CPUs and apply the fastest fraction to every worker."""
    if not plan.workers or not plan.cpu_layers:
        report("nothing to measure: no MoE layer runs on the CPU in this plan")
        return plan
    w0 = plan.workers[0]
    inter = facts.moe_intermediate_size // plan.tp  # each TP rank's engine holds a slice of every expert
    results = []
    for k in thread_candidates(w0.threads, len(w0.numa_nodes)):
        cpus = pick_cpus(w0, k, node_of)
        us = float(bench(facts.hidden_size, inter, facts.num_experts, facts.experts_per_tok, k, cpus, seconds))
        results.append({"threads": k, "cpus": format_cpulist(cpus), "us_per_layer": us})
        report(f"{k:4d} threads on {format_cpulist(cpus)}: {us:9.1f} us per layer")
    best = min(results, key=lambda r: (r["us_per_layer"], r["threads"]))
    frac = best["threads"] / w0.threads
    workers = []
    for w in plan.workers:
        k = w.threads if best["threads"] == w0.threads else max(1, round(w.threads * frac))
        cpus = pick_cpus(w, k, node_of)
        workers.append(replace(w, cpus=cpus, threads=len(cpus)))
    note = (
        f"measured: {best['threads']} threads per worker were fastest ({best['us_per_layer']:.1f} us per layer; "
        f"tried {', '.join(str(r['threads']) for r in results)})"
    )
    choices = [
        {**c, "value": " + ".join(str(w.threads) for w in workers), "why": f"{c['why']}; {note}"}
        if c["setting"] == "threads"
        else c
        for c in plan.choices
    ]
    reasons = [f"{c['setting']} = {c['value']}: {c['why']}" for c in choices]
    env = {**plan.env, **cpu_env(workers, plan.tp, plan.pp)}
    return replace(plan, workers=workers, reasons=reasons, choices=choices, env=env, measurements=results)


def measure_formats(
    plan: Plan,
    facts: ModelFacts,
    bench: FormatBenchFn,
    *,
    seconds: float = 2.0,
    report: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, Speed], list[dict]] | None:
    """Time the checkpoint's quantized format and bf16 on worker 0's CPUs, at each TP rank's expert shapes.

    None (and a line to `report`) when the plan's experts-format choice does not depend on speed."""
    fmt = plan.experts_format
    if not fmt.get("speed_matters"):
        report(f"experts format not measured: {fmt.get('reason', 'no choice to make')}")
        return None
    w0 = plan.workers[0]
    inter = facts.moe_intermediate_size // plan.tp
    speeds: dict[str, Speed] = {}
    rows: list[dict] = []
    for name, (dtype, group) in (("quantized", engine_format(facts.quant)), ("bf16", ("bfloat16", 0))):
        r = dict(bench(facts.hidden_size, inter, facts.num_experts, facts.experts_per_tok, dtype, group, w0.threads,
                       list(w0.cpus), seconds / 2, PREFILL_TOKENS))
        speeds[name] = Speed(decode_us=float(r["decode_us"]), prefill_us=float(r["prefill_us"]))
        rows.append({"format": name, **r})
        report(f"{dtype:>8s}{f' group {group}' if group else ''}: decode {r['decode_us']:9.1f} us per layer, "
               f"prefill M={PREFILL_TOKENS} {r['prefill_us']:9.1f} us per layer ({w0.threads} threads)")
    return speeds, rows


def measure_plan(
    machine,
    target,
    request: Request,
    plan: Plan,
    *,
    threads_bench: BenchFn | None,
    format_bench: FormatBenchFn | None,
    seconds: float = 2.0,
    report: Callable[[str], None] = lambda s: None,
) -> Plan:
    """--measure: the experts format first (its speeds re-plan: RAM and env follow the choice), then the
    thread count on the re-planned workers.  A missing benchmark skips its part."""
    if format_bench is not None:
        try:
            measured = measure_formats(plan, target.facts, format_bench, seconds=seconds, report=report)
        except Exception as e:  # the engine's own errors (memory, an unsupported group): keep the known ratios
            report(f"experts format not measured: {type(e).__name__}: {e}; the choice keeps the known ratios")
            measured = None
        if measured is not None:
            speeds, rows = measured
            plan = build_plan(machine, target, request, speeds=speeds)
            plan.experts_format["measurements"] = rows
            report(f"experts format: {plan.experts_format['value']}")
    else:
        report("experts format not measured: this build has no format benchmark (lvllm_cli.moe.bench.bench_moe_format)")
    if threads_bench is None:
        report("thread count not measured: this build has no decode benchmark (lvllm_cli.moe.bench.bench_moe_decode)")
    else:
        plan = measure_threads(plan, target.facts, {c.id: c.node for c in machine.cpu.online}, threads_bench,
                               seconds=seconds, report=report)
    return plan
