"""Pure maths: quantiles against a definition-based reference, counter increases with resets,
label filters."""

from __future__ import annotations

import math
import random

import pytest

from lvllm_cli.monitor import stats
from lvllm_cli.monitor.metrics import Scrape
from monitor_fakes import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, close, ref_quantile


def _cumulative(obs: list[float], bounds: list[float]) -> list[tuple[float, float]]:
    return [(b, float(sum(1 for x in obs if x <= b))) for b in bounds] + [(math.inf, float(len(obs)))]


@pytest.mark.parametrize("seed", range(40))
def test_histogram_quantile_matches_reference(seed):
    rng = random.Random(seed)
    bounds = rng.choice([TTFT_BUCKETS, ITL_BUCKETS, E2E_BUCKETS, sorted(rng.sample([0.5, 1, 2, 3, 5, 8, 13, 21], 4))])
    scale = rng.choice([0.01, 0.1, 1.0, 10.0])
    obs = [rng.lognormvariate(math.log(scale), 1.0) for _ in range(rng.randint(1, 300))]
    if rng.random() < 0.3:  # some observations exactly on a bound (le is inclusive)
        obs += [rng.choice(bounds) for _ in range(5)]
    buckets = _cumulative(obs, bounds)
    rng.shuffle(buckets)  # order of exposition must not matter
    for q in (0.5, 0.9, 0.99, rng.random()):
        assert close(stats.histogram_quantile(q, buckets), ref_quantile(obs, bounds, q), rel=1e-6)


def test_histogram_quantile_edge_cases():
    assert stats.histogram_quantile(0.5, []) is None
    assert stats.histogram_quantile(0.5, [(1.0, 3.0)]) is None  # no +Inf bucket
    assert stats.histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None  # no observations
    assert stats.histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 4.0)]) == 1.0  # all above the last bound
    assert stats.histogram_quantile(float("nan"), [(1.0, 1.0), (math.inf, 1.0)]) is None
    assert stats.histogram_quantile(-1, [(1.0, 1.0), (math.inf, 1.0)]) == -math.inf
    assert stats.histogram_quantile(2, [(1.0, 1.0), (math.inf, 1.0)]) == math.inf
    # non-monotonic counts (buckets read a moment apart) are forced monotonic, not an error
    v = stats.histogram_quantile(0.5, [(1.0, 5.0), (2.0, 4.0), (math.inf, 10.0)])
    assert v == 1.0  # (2.0, 4.0) is read as (2.0, 5.0): rank 5 is the end of the first bucket


def test_counter_increase_with_resets():
    rng = random.Random(7)
    for _ in range(50):
        # a counter that restarts at random points: the true increase is the sum of all positive steps
        # plus, at each restart, everything counted since the restart
        true = 0.0
        values = []
        cur = rng.uniform(0, 100)
        values.append(cur)
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.15 and cur > 0:
                # restarted and counted `cur` since; a restart is only visible as a drop (as in PromQL)
                cur = rng.uniform(0, min(5.0, cur) * 0.999)
                true += cur
            else:
                step = rng.uniform(0, 50)
                cur += step
                true += step
            values.append(cur)
        assert math.isclose(stats.counter_increase(values), true, rel_tol=1e-12, abs_tol=1e-9)


def _scrape(t, series):
    return Scrape(t=t, series=series)


def test_rate_is_per_series_so_a_vanishing_series_is_not_a_reset():
    a, b = (("engine", "0"),), (("engine", "1"),)
    hist = [
        _scrape(0.0, {"c_total": {a: 100.0, b: 1000.0}}),
        _scrape(1.0, {"c_total": {a: 110.0, b: 1010.0}}),
        _scrape(2.0, {"c_total": {a: 120.0}}),  # engine 1 gone: its total must not look like a drop
    ]
    assert stats.rate(hist, ["c_total"], {}) == pytest.approx((20 + 10) / 2.0)
    assert stats.rate(hist, ["c_total"], {"engine": "0"}) == pytest.approx(10.0)
    assert stats.rate(hist, ["c_total"], {"engine": "9"}) is None
    assert stats.rate(hist[:1], ["c_total"], {}) is None
    assert stats.rate(hist, ["missing"], {}) is None


def test_old_names_are_fallbacks():
    sc = _scrape(0.0, {"old": {(): 1.0}, "other": {(): 2.0}})
    assert stats.pick_name(sc, ["new", "old"]) == "old"
    sc.series["new"] = {(): 3.0}
    assert stats.pick_name(sc, ["new", "old"]) == "new"


def test_gauges_and_label_values():
    m1e0 = (("engine", "0"), ("model_name", "a"))
    m1e1 = (("engine", "1"), ("model_name", "a"))
    m2e10 = (("engine", "10"), ("model_name", "b"))
    sc = _scrape(0.0, {"vllm:g": {m1e0: 1.0, m1e1: 2.0, m2e10: 4.0}, "other": {(("engine", "zz"),): 1.0}})
    assert stats.gauge_sum(sc, ["vllm:g"], {}) == 7.0
    assert stats.gauge_sum(sc, ["vllm:g"], {"model_name": "a"}) == 3.0
    assert stats.gauge_mean(sc, ["vllm:g"], {"model_name": "a"}) == 1.5
    assert stats.gauge_sum(sc, ["vllm:g"], {"model_name": "a", "engine": "1"}) == 2.0
    assert stats.gauge_sum(sc, ["vllm:g"], {"model_name": "c"}) is None
    assert stats.label_values(sc, "engine", "vllm:") == ["0", "1", "10"]
    assert stats.label_values(sc, "model_name") == ["a", "b"]


def test_window_bucket_increases_sum_over_labels():
    bounds = [0.1, 1.0]
    rng = random.Random(3)
    series_obs = {("a", "0"): [], ("b", "0"): []}
    scrapes, snapshots = [], []
    for t in range(6):
        for key in series_obs:
            series_obs[key] += [rng.uniform(0, 2) for _ in range(rng.randint(1, 5))]
        snapshots.append({k: list(v) for k, v in series_obs.items()})
        bucket = {}
        for (m, e), obs in series_obs.items():
            for ub, c in _cumulative(obs, bounds):
                le = "+Inf" if math.isinf(ub) else str(ub)
                bucket[(("engine", e), ("le", le), ("model_name", m))] = c
        scrapes.append(_scrape(float(t), {"h_bucket": bucket}))

    def observed_between(t0, t1, ub, model=None):
        return sum(sum(1 for x in snapshots[t1][k] if x <= ub) - sum(1 for x in snapshots[t0][k] if x <= ub)
                   for k in series_obs if model is None or k[0] == model)

    got = stats.bucket_increases(scrapes[2:], "h", {})
    assert got == [(ub, float(observed_between(2, 5, ub))) for ub in (0.1, 1.0, math.inf)]
    got_b = stats.bucket_increases(scrapes[2:], "h", {"model_name": "b"})
    assert got_b == [(ub, float(observed_between(2, 5, ub, "b"))) for ub in (0.1, 1.0, math.inf)]
    assert stats.bucket_increases(scrapes[2:], "nope", {}) is None
