"""One poll = scrape the server, read the engine files, sample the machine → a Frame.

The Textual app and `--once` share this class; it holds the short history
the rates and windowed quantiles need. No UI code here.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lvllm_cli.monitor import engine_metrics, figures, metrics, stats
from lvllm_cli.monitor.engine_metrics import EngineFigures
from lvllm_cli.monitor.figures import VllmFigures
from lvllm_cli.monitor.metrics import Scrape
from lvllm_cli.monitor.system import SystemFigures

HISTORY_S = 310.0  # longest latency window offered (300 s) plus slack
SPARK_POINTS = 120


@dataclass
class Frame:
    url: str
    wall_time: float
    up: bool
    error: str = ""
    ever_up: bool = False
    last_up_wall: float | None = None
    is_vllm: bool = False  # the page has vllm:* metrics
    bad_lines: int = 0
    filters: dict[str, str] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    vllm: VllmFigures = field(default_factory=VllmFigures)
    prompt_spark: list[float] = field(default_factory=list)
    generation_spark: list[float] = field(default_factory=list)
    local: bool = False
    engine: EngineFigures | None = None
    engine_note: str = ""
    system: SystemFigures | None = None


class Poller:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        filters: dict[str, str] | None = None,
        rate_window_s: float = 5.0,
        latency_window_s: float = 30.0,
        local: bool | None = None,
        metrics_dirs: list[Path] | None = None,
        server_pid: int | None = None,
        system: bool = True,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = metrics.metrics_url(url)
        self.api_key = api_key
        self.filters: dict[str, str] = dict(filters or {})
        self.rate_window_s = rate_window_s
        self.latency_window_s = latency_window_s
        self._host_is_local = metrics.is_local_url(self.url)
        # `local` can be forced (tests, a server in a container with a published port)
        self.local = self._host_is_local if local is None else local
        port = urllib.parse.urlsplit(self.url).port or (443 if self.url.startswith("https") else 80)
        self.metrics_dirs = metrics_dirs if metrics_dirs is not None else engine_metrics.candidate_dirs(port=port)
        self.timeout = timeout
        self.clock = clock
        self.history: deque[Scrape] = deque()
        self.engine_history: deque[Scrape] = deque()
        self.ever_up = False
        self.last_up_wall: float | None = None
        self._system = None
        if system and self.local:
            from lvllm_cli.monitor.system import SystemSampler

            self._system = SystemSampler(server_pid=server_pid, port=port)
        self.last_frame: Frame | None = None

    def _trim(self, hist: deque[Scrape], now: float) -> None:
        while hist and now - hist[0].t > HISTORY_S:
            hist.popleft()

    def scrape(self) -> tuple[metrics.FetchResult, Scrape | None]:
        res = metrics.fetch(self.url, self.api_key, self.timeout, local=self._host_is_local)
        if not res.ok:
            return res, None
        return res, metrics.parse_exposition(res.text, self.clock())

    def poll(self) -> Frame:
        res, scrape = self.scrape()
        now = self.clock()
        frame = Frame(url=self.url, wall_time=time.time(), up=res.ok, error=res.error, local=self.local)
        if scrape is not None:
            self.ever_up = True
            self.last_up_wall = frame.wall_time
            frame.bad_lines = scrape.bad_lines
            self.history.append(scrape.only((figures.PREFIX,)))
        self._trim(self.history, now)
        if self.local:
            read = engine_metrics.read_first(self.metrics_dirs, now)
            frame.engine_note = read.note
            if read.scrape is not None:
                self.engine_history.append(read.scrape)
            self._trim(self.engine_history, now)
            if read.status == "ok":
                frame.engine = engine_metrics.engine_figures(list(self.engine_history), read.workers, self.rate_window_s)
        else:
            frame.engine_note = "CPU-expert figures only for a server on this machine"
        if self._system is not None:
            frame.system = self._system.sample()
        frame.ever_up = self.ever_up
        frame.last_up_wall = self.last_up_wall
        self._fill_vllm(frame)
        self.last_frame = frame
        return frame

    def _fill_vllm(self, frame: Frame) -> None:
        """(Re)compute the vLLM figures from history; called again when the filters change."""
        frame.filters = dict(self.filters)
        hist = list(self.history)
        if not hist:
            return
        newest = hist[-1]
        frame.is_vllm = bool(newest.series or newest.types)  # a fresh server may declare but not yet sample
        frame.models = stats.label_values(newest, "model_name", figures.PREFIX)
        frame.engines = stats.label_values(newest, "engine", figures.PREFIX)
        if not frame.up:
            return  # no fresh numbers: the screen says the server is down rather than show old ones
        frame.vllm = figures.vllm_figures(hist, self.filters, self.rate_window_s, self.latency_window_s)
        frame.prompt_spark = figures.rate_series(hist, figures.PROMPT_TOKENS, self.filters, SPARK_POINTS)
        frame.generation_spark = figures.rate_series(hist, figures.GENERATION_TOKENS, self.filters, SPARK_POINTS)

    def refilter(self, filters: dict[str, str]) -> Frame | None:
        self.filters = dict(filters)
        if self.last_frame is not None:
            self._fill_vllm(self.last_frame)
        return self.last_frame

    def close(self) -> None:
        if self._system is not None:
            self._system.close()


# ------------------------------------------------------------------ JSON for scripts

SCHEMA = "lvllm.monitor/1"


def _r(x: float | None, nd: int = 6) -> float | None:
    """Rounded, and None for NaN/inf (which JSON cannot carry) as for missing."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def snapshot(frame: Frame) -> dict:
    """The `--once --json` document (schema documented in docs/readme/monitor.md)."""
    v = frame.vllm
    out: dict = {
        "schema": SCHEMA,
        "url": frame.url,
        "time": round(frame.wall_time, 3),
        "server_up": frame.up,
        "error": frame.error or None,
        "is_vllm": frame.is_vllm,
        "interval_s": _r(v.rate_window_s, 6) if v.rate_window_s else None,
        "model_name": frame.filters.get("model_name"),
        "engine": frame.filters.get("engine"),
        "models": frame.models,
        "engines": frame.engines,
        "prompt_tokens_per_s": _r(v.prompt_tokens_per_s, 3),
        "generation_tokens_per_s": _r(v.generation_tokens_per_s, 3),
        "requests_finished_per_s": _r(v.requests_finished_per_s, 4),
        "requests_running": _r(v.requests_running, 3),
        "requests_waiting": _r(v.requests_waiting, 3),
        "kv_cache_usage": _r(v.kv_cache_usage, 6),
    }
    for key in figures.LATENCIES:
        lat = v.latency.get(key)
        out[f"{key}_count"] = None if lat is None else _r(lat.count, 3)
        for q in figures.QUANTILES:
            out[f"{key}_p{round(q * 100)}_s"] = None if lat is None else _r(lat.q(q))
    e = frame.engine
    out["moe"] = None if e is None else {
        "workers": e.workers,
        "threads": _r(e.threads, 3),
        "calls_per_s": _r(e.calls_per_s, 3),
        "cpu_s_per_call": _r(e.cpu_s_per_call, 9),
        "cpu_busy": _r(e.cpu_busy, 4),
        "cpu_tokens_per_s": _r(e.cpu_tokens_per_s, 3),
        "gpu_tokens_per_s": _r(e.gpu_tokens_per_s, 3),
        "cpu_token_share": _r(e.cpu_token_share, 4),
    }
    out["moe_note"] = frame.engine_note or None
    s = frame.system
    out["system"] = None if s is None else {
        "cpu_util": _r(s.cpu_util, 4),
        "numa_cpu_util": {str(k): _r(u, 4) for k, u in s.node_util.items()},
        "vllm_cpu_share": _r(s.vllm_cpu_share, 4),
        "vllm_processes": s.vllm_processes,
        "ram_used_bytes": s.ram_used_bytes,
        "ram_total_bytes": s.ram_total_bytes,
        "gpus": [
            {"index": g.index, "name": g.name, "util": _r(g.util, 4), "mem_used_bytes": g.mem_used_bytes,
             "mem_total_bytes": g.mem_total_bytes, "power_w": _r(g.power_w, 1), "power_limit_w": _r(g.power_limit_w, 1)}
            for g in s.gpus
        ],
    }
    return out
