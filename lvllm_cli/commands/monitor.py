"""`lvllm monitor`: live dashboard of a running server, or one snapshot for scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

ORDER = 60

HELP = """Watch a running vLLM / lvllm server: tokens/s, requests, KV cache, latency percentiles,
CPU per NUMA node, GPUs and the CPU-expert engine.

`lvllm monitor` watches http://127.0.0.1:8000; give another URL for another server
(CPU, GPU and CPU-expert panels only for a server on this machine).

`lvllm monitor --once --json` prints one snapshot for scripts, rates over --interval seconds.
"""


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def monitor(
    url: Optional[str] = typer.Argument(None, help="Server URL (its /metrics is read). Default http://127.0.0.1:8000.", show_default=False),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=["LVLLM_API_KEY", "VLLM_API_KEY"],
                                          help="Bearer token, if a proxy guards /metrics.", show_default=False),
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit instead of the dashboard."),
    as_json: bool = typer.Option(False, "--json", help="With --once: print JSON (implies --once)."),
    interval: Optional[float] = typer.Option(None, "--interval", metavar="S",
                                             help="--once: seconds between the two scrapes (default 2). Dashboard: refresh period (default 1).",
                                             show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help="Only this model_name label value (default: sum of all)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Only this engine label value (default: sum of all)."),
    window: float = typer.Option(30.0, "--window", metavar="S", help="Dashboard: latency percentiles over the last S seconds."),
    metrics_dir: Optional[Path] = typer.Option(None, "--metrics-dir", help="Where the CPU-expert engine writes its figures (default: $LVLLM_METRICS_DIR, else "
                                               "what `lvllm serve` uses for the URL's port, $XDG_RUNTIME_DIR/lvllm/port-<port> or "
                                               "/tmp/lvllm-<uid>/port-<port>, else those directories themselves).",
                                               show_default=False),
    timeout: float = typer.Option(2.0, "--timeout", metavar="S", help="HTTP timeout per scrape."),
) -> None:
    """Live dashboard of a running server (or --once --json for scripts)."""
    from lvllm_cli.monitor.metrics import BadURL, metrics_url

    once = once or as_json
    try:
        metrics_url(url)
    except BadURL as exc:
        _fail(str(exc))
    if interval is None:
        interval = 2.0 if once else 1.0
    if not (0.05 <= interval <= 3600):
        _fail(f"--interval {interval:g} is out of range: give seconds between 0.05 and 3600")
    if not (1 <= window <= 3600):
        _fail(f"--window {window:g} is out of range: give seconds between 1 and 3600")
    if not (0.1 <= timeout <= 120):
        _fail(f"--timeout {timeout:g} is out of range: give seconds between 0.1 and 120")
    filters = {k: v for k, v in (("model_name", model), ("engine", engine)) if v is not None}
    dirs = [metrics_dir] if metrics_dir is not None else None
    if once:
        raise typer.Exit(_once(url, api_key, interval, filters, dirs, timeout, as_json))
    _dashboard(url, api_key, interval, filters, window, dirs, timeout)


def _once(url, api_key, interval, filters, dirs, timeout, as_json) -> int:
    import json
    import time

    from rich.console import Console

    from lvllm_cli.monitor import view
    from lvllm_cli.monitor.poller import HISTORY_S, Poller, snapshot

    # Both windows span the whole run: exactly the two scrapes taken here.
    poller = Poller(url, api_key=api_key, filters=filters, rate_window_s=HISTORY_S, latency_window_s=HISTORY_S,
                    metrics_dirs=dirs, timeout=timeout)
    try:
        frame = poller.poll()
        if frame.up:
            time.sleep(interval)
            frame = poller.poll()
    finally:
        poller.close()
    problem = ""
    if not frame.up:
        problem = f"cannot read metrics from {frame.url}: {frame.error}"
    elif not frame.is_vllm:
        problem = f"{frame.url} answers but publishes no vllm:* metrics: is this a vLLM server?"
    else:
        for key, have in (("model_name", frame.models), ("engine", frame.engines)):
            if key in filters and filters[key] not in have:
                problem = f"no series with {key}={filters[key]!r}; the server has: {', '.join(have) or 'none'}"
    if as_json:
        typer.echo(json.dumps(snapshot(frame), indent=2, allow_nan=False))
    elif not problem:
        Console().print(view.once_report(frame))
    if problem:
        typer.secho(f"error: {problem}", err=True, fg=typer.colors.RED)
        return 1
    return 0


def _dashboard(url, api_key, interval, filters, window, dirs, timeout) -> None:
    import sys

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        _fail("the dashboard needs a terminal; for scripts use `lvllm monitor --once --json`")
    from lvllm_cli.monitor.app import MonitorApp
    from lvllm_cli.monitor.poller import Poller

    poller = Poller(url, api_key=api_key, filters=filters, latency_window_s=window, metrics_dirs=dirs, timeout=timeout)
    MonitorApp(interval=interval, poller=poller).run()


def register(app: typer.Typer) -> None:
    app.command("monitor", help=HELP)(monitor)
