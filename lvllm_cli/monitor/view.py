"""Frame → Rich renderables and strings. Pure: the Textual app and `--once` both print with it."""

from __future__ import annotations

import math
import time

from rich.table import Table
from rich.text import Text

from lvllm_cli.monitor import figures
from lvllm_cli.monitor.poller import Frame

DASH = "—"


def _missing(x: float | None) -> bool:
    return x is None or not math.isfinite(x)


def fmt_num(x: float | None, digits: int = 1) -> str:
    if _missing(x):
        return DASH
    return f"{x:,.{digits}f}"


def fmt_count(x: float | None) -> str:
    return DASH if _missing(x) else f"{x:,.0f}"


def fmt_seconds(s: float | None) -> str:
    if _missing(s):
        return DASH
    a = abs(s)
    if a < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if a < 1:
        return f"{s * 1e3:.1f} ms"
    if a < 100:
        return f"{s:.2f} s"
    return f"{s:.0f} s"


def fmt_pct(f: float | None, digits: int = 1) -> str:
    return DASH if _missing(f) else f"{f * 100:.{digits}f} %"


def fmt_bytes(b: float | None) -> str:
    if _missing(b):
        return DASH
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def bar(frac: float | None, width: int = 12) -> Text:
    if _missing(frac):
        return Text("·" * width, style="dim")
    frac = min(1.0, max(0.0, frac))
    full = round(frac * width)
    style = "green" if frac < 0.7 else ("yellow" if frac < 0.9 else "red")
    return Text("█" * full, style=style) + Text("░" * (width - full), style="dim")


def fmt_ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def selection(value: str | None, choices: list[str]) -> str:
    if value is not None:
        return value
    if len(choices) == 1:
        return choices[0]
    return f"all ({len(choices)})" if choices else "all"


def status_line(frame: Frame | None, interval: float, server_note: str = "", paused: bool = False) -> Text:
    if frame is None:
        return Text("… first scrape", style="dim")
    t = Text()
    if server_note:
        t.append(f"■ {server_note}   ", style="bold red")
    if frame.up and frame.is_vllm:
        t.append("● up", style="bold green")
        t.append(f"  {frame.url}")
        t.append(f"   model: {selection(frame.filters.get('model_name'), frame.models)}")
        t.append(f"   engine: {selection(frame.filters.get('engine'), frame.engines)}")
        missing = [f"{k}={v}" for k, v in frame.filters.items()
                   if v not in (frame.models if k == "model_name" else frame.engines)]
        if missing:
            t.append(f"   (no series with {', '.join(missing)})", style="yellow")
    elif frame.up:
        t.append("● up", style="bold yellow")
        t.append(f"  but no vllm:* metrics at {frame.url}: is this a vLLM server?")
    elif frame.ever_up and frame.last_up_wall is not None:
        t.append("○ down", style="bold red")
        t.append(f"  {frame.error}  (last seen {fmt_ago(time.time() - frame.last_up_wall)} ago; retrying every {interval:g} s)")
    else:
        t.append("○ waiting for the server", style="bold yellow")
        t.append(f"  {frame.error}  (retrying every {interval:g} s)")
    if frame.bad_lines:
        t.append(f"   {frame.bad_lines} unparsable lines skipped", style="yellow")
    if paused:
        t.append("   ⏸ paused", style="bold cyan")
    return t


def throughput_line(label: str, value: float | None, window_s: float) -> Text:
    t = Text()
    t.append(f"{label:<8}", style="bold")
    t.append(f"{fmt_num(value):>12} tok/s", style="bold cyan" if value else "")
    if window_s:
        t.append(f"  ({window_s:.0f} s)", style="dim")
    return t


def requests_panel(frame: Frame) -> Table:
    v = frame.vllm
    tab = Table.grid(padding=(0, 1))
    tab.add_column(style="bold")
    tab.add_column(justify="right")
    tab.add_column()
    tab.add_row("running", fmt_count(v.requests_running), "")
    tab.add_row("waiting", fmt_count(v.requests_waiting), "")
    tab.add_row("KV cache", fmt_pct(v.kv_cache_usage), bar(v.kv_cache_usage))
    tab.add_row("finished", fmt_num(v.requests_finished_per_s, 2), "req/s")
    return tab


def latency_panel(frame: Frame) -> Table:
    v = frame.vllm
    tab = Table(box=None, padding=(0, 1), expand=False, show_edge=False)
    tab.add_column("", style="bold")
    for q in figures.QUANTILES:
        tab.add_column(f"p{round(q * 100)}", justify="right")
    tab.add_column("n", justify="right", style="dim")
    rows = 0
    for key, (title, _) in figures.LATENCIES.items():
        lat = v.latency.get(key)
        if lat is None:
            continue
        tab.add_row(title, *[fmt_seconds(lat.q(q)) for q in figures.QUANTILES], fmt_count(lat.count))
        rows += 1
    if not rows:
        tab.add_row("no latency histograms yet", *[""] * (len(figures.QUANTILES) + 1))
    return tab


def fmt_gib_pair(used: float | None, total: float | None) -> str:
    if _missing(used) or _missing(total):
        return DASH
    return f"{used / 2**30:.0f}/{total / 2**30:.0f} GiB" if total >= 10 * 2**30 else f"{fmt_bytes(used)}/{fmt_bytes(total)}"


def cpu_panel(frame: Frame) -> Table | Text:
    s = frame.system
    if s is None:
        return Text("CPU figures only for a server on this machine", style="dim")
    tab = Table.grid(padding=(0, 1))
    tab.add_column(style="bold", no_wrap=True)
    tab.add_column(no_wrap=True)
    tab.add_column(justify="right", no_wrap=True)
    tab.add_column(style="dim", no_wrap=True)
    for node, util in s.node_util.items():
        mem = s.node_mem.get(node)
        tab.add_row(f"node {node}", bar(util), fmt_pct(util, 0), f"mem {fmt_gib_pair(mem[0] - mem[1], mem[0])}" if mem else "")
    tab.add_row("vLLM", bar(s.vllm_cpu_share), fmt_pct(s.vllm_cpu_share, 0), f"of all CPUs ({s.vllm_processes} procs)")
    ram = s.ram_used_bytes / s.ram_total_bytes if s.ram_total_bytes else None
    tab.add_row("RAM", bar(ram), fmt_pct(ram, 0), fmt_gib_pair(s.ram_used_bytes, s.ram_total_bytes))
    return tab


def gpu_panel(frame: Frame) -> Table | Text:
    s = frame.system
    if s is None:
        return Text("GPU figures only for a server on this machine", style="dim")
    if not s.gpus:
        return Text(s.gpu_note or "no GPUs found", style="dim")
    tab = Table.grid(padding=(0, 1))
    tab.add_column(style="bold", no_wrap=True)
    tab.add_column(no_wrap=True)
    tab.add_column(justify="right", no_wrap=True)
    tab.add_column(justify="right", no_wrap=True)
    tab.add_column(justify="right", style="dim", no_wrap=True)
    for g in s.gpus:
        name = g.name.removeprefix("NVIDIA ").removeprefix("GeForce ")
        power = DASH if g.power_w is None else f"{g.power_w:.0f}" + ("" if g.power_limit_w is None else f"/{g.power_limit_w:.0f}") + " W"
        tab.add_row(f"{g.index} {name[:16]}", bar(g.util, 8), fmt_pct(g.util, 0), fmt_gib_pair(g.mem_used_bytes, g.mem_total_bytes), power)
    return tab


def engine_panel(frame: Frame) -> Table | Text:
    e = frame.engine
    if e is None:
        return Text(frame.engine_note or "no CPU-expert figures", style="dim")
    tab = Table.grid(padding=(0, 1))
    tab.add_column(style="bold", no_wrap=True)
    tab.add_column(justify="right", no_wrap=True)
    tab.add_column(style="bold", no_wrap=True)
    tab.add_column(justify="right", no_wrap=True)
    threads = DASH if e.threads is None else f"{e.threads:.0f}"
    tab.add_row("CPU time/call", fmt_seconds(e.cpu_s_per_call), "calls/s", fmt_num(e.calls_per_s, 0))
    tab.add_row("CPU busy", fmt_pct(e.cpu_busy, 0), "threads", f"{threads} ({e.workers} proc{'s' if e.workers != 1 else ''})")
    tab.add_row("tokens/s CPU", fmt_num(e.cpu_tokens_per_s, 0), "GPU", fmt_num(e.gpu_tokens_per_s, 0))
    tab.add_row("CPU share", fmt_pct(e.cpu_token_share), "", "")
    return tab


def once_report(frame: Frame) -> Table:
    """The human form of `--once` (without --json)."""
    v = frame.vllm
    tab = Table(title=f"{frame.url}  ({v.rate_window_s:.1f} s)", show_header=False, box=None, padding=(0, 2))
    tab.add_column(style="bold")
    tab.add_column()
    tab.add_row("prefill", f"{fmt_num(v.prompt_tokens_per_s)} tok/s")
    tab.add_row("decode", f"{fmt_num(v.generation_tokens_per_s)} tok/s")
    tab.add_row("requests", f"{fmt_count(v.requests_running)} running, {fmt_count(v.requests_waiting)} waiting")
    tab.add_row("KV cache", fmt_pct(v.kv_cache_usage))
    tab.add_row("latency", latency_panel(frame))
    if frame.engine is not None or frame.local:
        tab.add_row("CPU experts", engine_panel(frame))
    if frame.system is not None:
        tab.add_row("CPU", cpu_panel(frame))
        tab.add_row("GPU", gpu_panel(frame))
    return tab
