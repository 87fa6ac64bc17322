"""From vLLM's metric names to the figures the dashboard and `--once --json` show.

Each figure lists its metric names newest first; older vLLM releases used the
later names. A figure whose metrics are absent is None ("not published by this
server"), never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lvllm_cli.monitor import stats
from lvllm_cli.monitor.metrics import Scrape
from lvllm_cli.monitor.stats import Filters

PREFIX = "vllm:"

PROMPT_TOKENS = ("vllm:prompt_tokens_total",)
GENERATION_TOKENS = ("vllm:generation_tokens_total",)
REQUESTS_RUNNING = ("vllm:num_requests_running",)
REQUESTS_WAITING = ("vllm:num_requests_waiting",)
KV_CACHE_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # a fraction 0..1 despite the name
REQUESTS_FINISHED = ("vllm:request_success_total",)

# short key -> (title, histogram base names newest first)
LATENCIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ttft": ("time to first token", ("vllm:time_to_first_token_seconds",)),
    "itl": ("inter-token latency", ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")),
    "e2e": ("end-to-end latency", ("vllm:e2e_request_latency_seconds",)),
    "prefill": ("prefill time", ("vllm:request_prefill_time_seconds",)),
    "decode": ("decode time", ("vllm:request_decode_time_seconds",)),
    "queue": ("queue time", ("vllm:request_queue_time_seconds",)),
}
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Latency:
    count: float = 0.0  # observations inside the window
    quantiles: dict[float, float | None] = field(default_factory=dict)

    def q(self, q: float) -> float | None:
        return self.quantiles.get(q)


@dataclass
class VllmFigures:
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    requests_finished_per_s: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    latency: dict[str, Latency] = field(default_factory=dict)  # key of LATENCIES -> Latency (absent: not published)
    rate_window_s: float = 0.0  # span the rates were taken over
    latency_window_s: float = 0.0


def latency(history: Sequence[Scrape], names: Sequence[str], filters: Filters) -> Latency | None:
    base = stats.pick_name(history[-1], [n + "_bucket" for n in names]) if history else None
    if base is None:
        return None
    buckets = stats.bucket_increases(history, base[: -len("_bucket")], filters)
    out = Latency(count=stats.histogram_count(buckets))
    for q in QUANTILES:
        out.quantiles[q] = stats.histogram_quantile(q, buckets) if buckets else None
    return out


def vllm_figures(history: Sequence[Scrape], filters: Filters, rate_window_s: float, latency_window_s: float) -> VllmFigures:
    """Figures over the newest scrapes: rates over rate_window_s, latency quantiles over latency_window_s."""
    fig = VllmFigures()
    if not history:
        return fig
    newest = history[-1]
    fig.requests_running = stats.gauge_sum(newest, REQUESTS_RUNNING, filters)
    fig.requests_waiting = stats.gauge_sum(newest, REQUESTS_WAITING, filters)
    # One KV cache per engine: the mean says how full "the" cache is; a sum would exceed 100 %.
    fig.kv_cache_usage = stats.gauge_mean(newest, KV_CACHE_USAGE, filters)
    recent = stats.window(history, rate_window_s)
    if len(recent) >= 2:
        fig.rate_window_s = recent[-1].t - recent[0].t
    fig.prompt_tokens_per_s = stats.rate(recent, PROMPT_TOKENS, filters)
    fig.generation_tokens_per_s = stats.rate(recent, GENERATION_TOKENS, filters)
    fig.requests_finished_per_s = stats.rate(recent, REQUESTS_FINISHED, filters)
    lat_hist = stats.window(history, latency_window_s)
    if len(lat_hist) >= 2:
        fig.latency_window_s = lat_hist[-1].t - lat_hist[0].t
        for key, (_, names) in LATENCIES.items():
            lat = latency(lat_hist, names, filters)
            if lat is not None:
                fig.latency[key] = lat
    return fig


def rate_series(history: Sequence[Scrape], names: Sequence[str], filters: Filters, points: int) -> list[float]:
    """Rate between each pair of consecutive scrapes, newest `points` of them (for sparklines)."""
    out: list[float] = []
    tail = history[-(points + 1) :]
    for a, b in zip(tail, tail[1:]):
        r = stats.rate([a, b], names, filters)
        out.append(r if r is not None else 0.0)
    return out
