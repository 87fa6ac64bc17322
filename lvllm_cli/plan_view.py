"""The human view of a plan: rich tables for `lvllm tune` and the header of `lvllm serve`."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from lvllm_cli.plan import Plan
from lvllm_cli.ranges import format_cpulist

GiB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def render_plan(plan: Plan, console: Console, *, show_env: bool = True) -> None:
    m = plan.model_summary
    title = plan.name + (f":{plan.variant}" if plan.variant else "")
    console.print(Text.assemble(("lvllm plan ", "bold"), (title, "bold cyan"), "  ->  ", plan.model))
    console.print(
        f"[dim]model:[/] {m['model_type']}, {m['layers']} layers ({m['moe_layers']} MoE), {m['experts']} experts "
        f"(top-{m['experts_per_token']}), hidden {m['hidden_size']}, expert width {m['moe_intermediate_size']}, "
        f"experts {m['experts_format']}: {_gib(m['expert_bytes_total'])} routed experts + "
        f"{_gib(m['non_expert_bytes'])} other weights"
    )
    console.print(f"[dim]facts from:[/] {plan.facts_source}")
    ms = plan.machine_summary
    gpus = ", ".join(
        f"GPU {g['index']} {_gib(g['memory_total_bytes'])} (node {g['numa_node'] if g['numa_node'] is not None else '?'})"
        for g in ms["gpus"]
    ) or "no GPU"
    console.print(
        f"[dim]machine:[/] {ms['sockets']} socket(s), {ms['physical_cores']} cores / {ms['logical_cpus']} threads, "
        f"{len(ms['numa_nodes'])} NUMA node(s), {_gib(ms['ram_total_bytes'])} RAM, {gpus}"
    )

    t = Table(title="choices", title_justify="left", show_lines=False, expand=False)
    t.add_column("setting", style="bold", no_wrap=True)
    t.add_column("value", no_wrap=True)
    t.add_column("why")
    for c in plan.choices:
        style = "red" if c["setting"] == "host RAM" and not plan.ram_needed_bytes <= plan.ram_available_bytes else None
        t.add_row(c["setting"], Text(c["value"], style=style or ""), c["why"])
    console.print(t)

    w = Table(title="workers (one per GPU; rank = pp_rank x TP + tp_rank)", title_justify="left")
    for col in ("rank", "GPU", "pp/tp", "NUMA nodes", "CPUs", "threads", "left free"):
        w.add_column(col, no_wrap=col != "CPUs")
    for wk in plan.workers:
        w.add_row(
            str(wk.rank),
            "-" if wk.gpu is None else str(wk.gpu),
            f"{wk.pp_rank}/{wk.tp_rank}",
            format_cpulist(wk.numa_nodes),
            format_cpulist(wk.cpus),
            str(wk.threads),
            format_cpulist(wk.reserved_cpus) or "-",
        )
    console.print(w)

    if plan.gpu_budgets:
        g = Table(title="GPU memory (per GPU)", title_justify="left")
        for col in ("GPU", "usable", "non-expert", "reserve", "KV cache", "room", "experts", "left"):
            g.add_column(col, justify="right", no_wrap=True)
        for b in plan.gpu_budgets:
            g.add_row(
                str(b.gpu),
                f"{_gib(b.usable_bytes)} ({b.vram_bytes / GiB:.0f} x {plan.gpu_memory_utilization:.2f})",
                _gib(b.non_expert_bytes),
                _gib(b.reserve_bytes),
                _gib(b.kv_bytes),
                _gib(b.room_for_experts),
                f"{b.expert_layers} layers, {_gib(b.expert_bytes)}",
                Text(_gib(b.left_bytes), style="red" if b.left_bytes < 0 else ""),
            )
        console.print(g)

    if show_env:
        console.print("[bold]environment[/] (read by the lvllm vLLM plugin)")
        for k, v in plan.env.items():
            console.print(f"  {k}={v}", markup=False, highlight=False)
        console.print("[bold]vLLM arguments[/]")
        console.print("  " + " ".join(plan.vllm_args), markup=False, highlight=False)
    render_verdict(plan, console)


def render_verdict(plan: Plan, console: Console) -> None:
    items = []
    for wmsg in plan.warnings:
        items.append(Text.assemble(("warning: ", "yellow bold"), wmsg))
    for p in plan.problems:
        items.append(Text.assemble(("problem: ", "red bold"), p))
    for s in plan.suggestions:
        items.append(Text.assemble(("suggestion: ", "green bold"), s))
    if plan.fits:
        items.append(Text("the plan fits this machine", style="green"))
    else:
        items.append(Text("the plan does NOT fit this machine", style="red bold"))
    console.print(Group(*items))
