"""Pure maths over scrapes: label filters, counter rates, histogram quantiles.

Semantics follow PromQL so numbers agree with a Grafana board on the same
server: increases are computed per series with counter resets handled
(`increase()`), then summed; quantiles interpolate linearly inside the bucket
that holds the rank (`histogram_quantile()`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from lvllm_cli.monitor.metrics import Labels, Scrape

Filters = Mapping[str, str]  # label name -> required value; absent = any (summed)


def matches(labels: Labels, filters: Filters) -> bool:
    if not filters:
        return True
    d = dict(labels)
    return all(d.get(k) == v for k, v in filters.items())


def pick_name(scrape: Scrape, names: Sequence[str]) -> str | None:
    """The first of several alternative metric names (new vLLM name first, then older ones) present."""
    for n in names:
        if n in scrape.series:
            return n
    return None


def pick_name_in(history: Sequence[Scrape], names: Sequence[str]) -> str | None:
    return pick_name(history[-1], names) if history else None


def label_values(scrape: Scrape, label: str, prefix: str = "") -> list[str]:
    """Distinct values of one label over the series whose names start with prefix, sorted."""
    seen: set[str] = set()
    for name, series in scrape.series.items():
        if not name.startswith(prefix):
            continue
        for labels in series:
            for k, v in labels:
                if k == label:
                    seen.add(v)
    return sorted(seen, key=lambda v: (len(v), v))  # "2" before "10"


def gauge_values(scrape: Scrape, names: Sequence[str], filters: Filters) -> list[float]:
    name = pick_name(scrape, names)
    if name is None:
        return []
    return [v for labels, v in scrape.series[name].items() if matches(labels, filters) and not math.isnan(v)]


def gauge_sum(scrape: Scrape, names: Sequence[str], filters: Filters) -> float | None:
    vals = gauge_values(scrape, names, filters)
    return sum(vals) if vals else None


def gauge_mean(scrape: Scrape, names: Sequence[str], filters: Filters) -> float | None:
    vals = gauge_values(scrape, names, filters)
    return sum(vals) / len(vals) if vals else None


def counter_increase(values: Iterable[float]) -> float:
    """Increase of one counter over consecutive readings; a drop means the process restarted
    and counted again from zero, so the new reading is all increase (as PromQL does)."""
    total = 0.0
    prev: float | None = None
    for v in values:
        if math.isnan(v):
            continue
        if prev is not None:
            total += v - prev if v >= prev else v
        prev = v
    return total


def window(history: Sequence[Scrape], seconds: float) -> list[Scrape]:
    """The scrapes no older than `seconds` before the newest one (oldest first)."""
    if not history:
        return []
    newest = history[-1].t
    return [s for s in history if s.t >= newest - seconds - 1e-9]


def _series_increases(history: Sequence[Scrape], name: str, filters: Filters) -> dict[Labels, float]:
    """Increase of each series. A series missing from an earlier scrape of the window was created
    since (a label set first used, a worker started): it counted from zero, so zero is its baseline.
    (PromQL would drop its first sample; a dashboard watching from the start knows better.)"""
    readings: dict[Labels, list[float]] = {}
    for i, s in enumerate(history):
        for labels, v in s.series.get(name, {}).items():
            if matches(labels, filters):
                if labels not in readings:
                    readings[labels] = [0.0] if i > 0 else []
                readings[labels].append(v)
    return {labels: counter_increase(vals) for labels, vals in readings.items()}


def increase(history: Sequence[Scrape], names: Sequence[str], filters: Filters) -> float | None:
    """Summed increase over the scrapes given (per series first, so one series vanishing is no reset)."""
    if len(history) < 2:
        return None
    name = pick_name_in(history, names)
    if name is None:
        return None
    incs = _series_increases(history, name, filters)
    return sum(incs.values()) if incs else None


def rate(history: Sequence[Scrape], names: Sequence[str], filters: Filters) -> float | None:
    """Per-second increase over the span of the scrapes given."""
    if len(history) < 2:
        return None
    dt = history[-1].t - history[0].t
    inc = increase(history, names, filters)
    if inc is None or dt <= 0:
        return None
    return inc / dt


def _le(labels: Labels) -> tuple[float | None, Labels]:
    le: float | None = None
    rest = []
    for k, v in labels:
        if k == "le":
            try:
                le = float(v)  # float() reads "+Inf" too
            except ValueError:
                le = None
        else:
            rest.append((k, v))
    return le, tuple(rest)


def bucket_increases(history: Sequence[Scrape], base: str, filters: Filters) -> list[tuple[float, float]] | None:
    """Per-bucket observation counts over the scrapes given, summed over the other labels.

    Returns sorted (upper bound, cumulative count) pairs, or None when the histogram is absent.
    """
    if len(history) < 2:
        return None
    name = base + "_bucket"
    if name not in history[-1].series:
        return None
    by_le: dict[float, float] = {}
    for labels, inc in _series_increases(history, name, filters).items():
        le, _ = _le(labels)
        if le is None or math.isnan(le):
            continue
        by_le[le] = by_le.get(le, 0.0) + inc
    return sorted(by_le.items()) if by_le else None


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over (upper bound, cumulative count) buckets.

    None when there is nothing to say (no observations, no +Inf bucket).
    Linear interpolation inside the bucket holding the rank; the first bucket
    starts at 0; a rank in the +Inf bucket yields the highest finite bound.
    """
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for ub, c in buckets:
        merged[ub] = merged.get(ub, 0.0) + c
    bs = sorted(merged.items())
    if len(bs) < 2 or not math.isinf(bs[-1][0]) or bs[-1][0] < 0:
        return None
    # Buckets scraped a moment apart can be slightly non-monotonic; PromQL forces monotonicity.
    fixed: list[tuple[float, float]] = []
    high = 0.0
    for ub, c in bs:
        high = max(high, c)
        fixed.append((ub, high))
    bs = fixed
    observations = bs[-1][1]
    if observations <= 0:
        return None
    rank = q * observations
    b = next(i for i, (_, c) in enumerate(bs) if c >= rank)
    if b == len(bs) - 1:
        return bs[-2][0]
    if b == 0 and bs[0][0] <= 0:
        return bs[0][0]
    start, end, count = 0.0, bs[b][0], bs[b][1]
    if b > 0:
        start = bs[b - 1][0]
        count -= bs[b - 1][1]
        rank -= bs[b - 1][1]
    if count <= 0:
        return end
    return start + (end - start) * (rank / count)


def histogram_count(buckets: Sequence[tuple[float, float]] | None) -> float:
    if not buckets:
        return 0.0
    return max(c for _, c in buckets)
