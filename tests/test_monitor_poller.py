"""The Poller against a real HTTP server publishing vLLM's metrics: the rates and percentiles
it reports equal the values computed here from the increments and observations we made."""

from __future__ import annotations

import io
import json
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from lvllm_cli.monitor import view
from lvllm_cli.monitor.poller import Poller, snapshot
from monitor_fakes import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, Clock, FakeVllm, close, ref_quantile

LABELSETS = [("qwen", "0"), ("qwen", "1"), ("glm", "0")]


class Model:
    """What the test did to the fake server, per scrape, to compute expectations independently."""

    def __init__(self, fake: FakeVllm, seed: int) -> None:
        self.fake = fake
        self.rng = random.Random(seed)
        self.times: list[float] = []  # time of each scrape
        # per scrape (the first one included): labels -> increment since the previous scrape
        self.prompt: list[dict] = [{}]
        self.gen: list[dict] = [{}]
        self.obs: list[dict] = [{"ttft": {}, "itl": {}, "e2e": {}}]  # kind -> labels -> new observations
        self.gauges: dict = {}

    def advance(self) -> None:
        r = self.rng
        p, g, o = {}, {}, {"ttft": {}, "itl": {}, "e2e": {}}
        for ls in LABELSETS:
            p[ls] = r.randint(0, 5000)
            g[ls] = r.randint(0, 800)
            self.fake.prompt.labels(*ls).inc(p[ls])
            self.fake.generation.labels(*ls).inc(g[ls])
            for kind, hist, scale in (("ttft", self.fake.ttft, 0.2), ("itl", self.fake.itl, 0.04), ("e2e", self.fake.e2e, 4.0)):
                xs = [r.lognormvariate(math.log(scale), 0.8) for _ in range(r.randint(0, 12))]
                for x in xs:
                    hist.labels(*ls).observe(x)
                o[kind][ls] = xs
            run, wait, kv = r.randint(0, 16), r.randint(0, 4), r.random()
            self.fake.running.labels(*ls).set(run)
            self.fake.waiting.labels(*ls).set(wait)
            self.fake.kv.labels(*ls).set(kv)
            self.gauges[ls] = (run, wait, kv)
        self.prompt.append(p)
        self.gen.append(g)
        self.obs.append(o)

    def first_in_window(self, seconds: float) -> int:
        now = self.times[-1]
        return next(i for i, t in enumerate(self.times) if t >= now - seconds - 1e-9)

    def expected_rate(self, series: list[dict], seconds: float, keep) -> float | None:
        i0 = self.first_in_window(seconds)
        if i0 == len(self.times) - 1:
            return None
        inc = sum(v for step in series[i0 + 1:] for ls, v in step.items() if keep(ls))
        return inc / (self.times[-1] - self.times[i0])

    def expected_obs(self, kind: str, seconds: float, keep) -> list[float]:
        i0 = self.first_in_window(seconds)
        return [x for step in self.obs[i0 + 1:] for ls, xs in step[kind].items() if keep(ls) for x in xs]


def _check(frame, m: Model, keep, rate_w: float, lat_w: float) -> None:
    v = frame.vllm
    assert close(v.prompt_tokens_per_s, m.expected_rate(m.prompt, rate_w, keep))
    assert close(v.generation_tokens_per_s, m.expected_rate(m.gen, rate_w, keep))
    sel = [m.gauges[ls] for ls in LABELSETS if keep(ls)]
    assert v.requests_running == sum(s[0] for s in sel)
    assert v.requests_waiting == sum(s[1] for s in sel)
    assert close(v.kv_cache_usage, sum(s[2] for s in sel) / len(sel))
    for kind, bounds in (("ttft", TTFT_BUCKETS), ("itl", ITL_BUCKETS), ("e2e", E2E_BUCKETS)):
        obs = m.expected_obs(kind, lat_w, keep)
        lat = v.latency[kind]
        assert lat.count == len(obs)
        for q in (0.5, 0.9, 0.99):
            assert close(lat.q(q), ref_quantile(obs, bounds, q), rel=1e-6), (kind, q)


@pytest.mark.parametrize("seed", [1, 2])
def test_rates_and_quantiles_match_independent_computation(fake, seed):
    clock = Clock()
    rate_w, lat_w = 5.0, 12.0
    poller = Poller(fake.url, rate_window_s=rate_w, latency_window_s=lat_w, local=False, clock=clock)
    m = Model(fake, seed)
    for step in range(20):
        if step:
            m.advance()
            clock.t += m.rng.uniform(0.4, 1.6)
        frame = poller.poll()
        m.times.append(clock.t)
        assert frame.up and frame.is_vllm
        if step >= 1:
            _check(frame, m, lambda ls: True, rate_w, lat_w)
    assert frame.models == ["glm", "qwen"] and frame.engines == ["0", "1"]
    # selecting a model or an engine: the same figures over that subset only
    frame = poller.refilter({"model_name": "qwen"})
    _check(frame, m, lambda ls: ls[0] == "qwen", rate_w, lat_w)
    frame = poller.refilter({"model_name": "qwen", "engine": "1"})
    _check(frame, m, lambda ls: ls == ("qwen", "1"), rate_w, lat_w)
    frame = poller.refilter({"engine": "0"})
    _check(frame, m, lambda ls: ls[1] == "0", rate_w, lat_w)


def test_old_vllm_names(fake):
    old = FakeVllm(old_names=True).start()
    try:
        clock = Clock()
        poller = Poller(old.url, local=False, clock=clock)
        poller.poll()
        old.kv.labels("m", "0").set(0.25)
        for x in (0.011, 0.02, 0.06):
            old.itl.labels("m", "0").observe(x)
        clock.t += 1
        frame = poller.poll()
        assert frame.vllm.kv_cache_usage == 0.25
        assert close(frame.vllm.latency["itl"].q(0.5), ref_quantile([0.011, 0.02, 0.06], ITL_BUCKETS, 0.5))
    finally:
        old.stop()


def test_server_down_restarting_and_back(fake):
    clock = Clock()
    poller = Poller(fake.url, rate_window_s=10.0, local=False, clock=clock)
    fake.prompt.labels("m", "0").inc(1_000_000)
    poller.poll()
    clock.t += 1
    fake.prompt.labels("m", "0").inc(500)
    frame = poller.poll()
    assert frame.up and close(frame.vllm.prompt_tokens_per_s, 500.0)

    port = fake.port
    fake.stop()
    clock.t += 1
    frame = poller.poll()
    assert not frame.up and frame.ever_up and "connection refused" in frame.error
    assert frame.vllm.prompt_tokens_per_s is None  # no stale numbers while down
    d = snapshot(frame)
    assert d["server_up"] is False and d["prompt_tokens_per_s"] is None

    fake.reset()  # the restarted server counts from zero
    fake.prompt.labels("m", "0").inc(300)
    fake.start(port)
    clock.t += 1
    frame = poller.poll()
    assert frame.up
    # over the 3 s since the first scrape: 500 before going down, 300 counted by the new process
    assert close(frame.vllm.prompt_tokens_per_s, (500 + 300) / 3.0)


def test_not_a_vllm_server(fake):
    fake.body_override = b"# TYPE http_requests_total counter\nhttp_requests_total 5\n"
    frame = Poller(fake.url, local=False).poll()
    assert frame.up and not frame.is_vllm
    assert snapshot(frame)["is_vllm"] is False


def test_snapshot_schema_keys(fake):
    clock = Clock()
    poller = Poller(fake.url, local=False, clock=clock)
    fake.itl.labels("m", "0")  # published, never observed: count 0, no percentiles
    poller.poll()
    fake.prompt.labels("m", "0").inc(10)
    fake.ttft.labels("m", "0").observe(0.1)
    clock.t += 2
    d = snapshot(poller.poll())
    for key in ("prompt_tokens_per_s", "generation_tokens_per_s", "requests_running", "requests_waiting",
                "kv_cache_usage", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_p50_s", "itl_p90_s", "itl_p99_s",
                "e2e_p50_s", "e2e_p90_s", "e2e_p99_s", "server_up", "interval_s", "moe", "system"):
        assert key in d
    assert d["prompt_tokens_per_s"] == 5.0 and d["interval_s"] == 2.0
    assert d["ttft_count"] == 1 and d["itl_count"] == 0 and d["itl_p50_s"] is None
    assert d["e2e_count"] is None and d["e2e_p50_s"] is None  # not published at all


# ---------------------------------------------------------------- anything the server may send

_names = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_requests_running",
          "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
          "vllm:e2e_request_latency_seconds_count", "vllm:request_success_total"]
_values = ["0", "1", "-1", "1e308", "-1e308", "NaN", "+Inf", "-Inf", "3.5", "1e-320", "x"]
_labels = ['', '{le="0.1"}', '{le="+Inf"}', '{le="abc"}', '{le="NaN"}', '{model_name="m",engine="0"}',
           '{model_name="m",le="0.5"}', '{engine="1",le="-Inf"}', '{le="1e308"}', '{']


@st.composite
def _pages(draw):
    lines = draw(st.lists(st.tuples(st.sampled_from(_names), st.sampled_from(_labels), st.sampled_from(_values)), max_size=25))
    junk = draw(st.lists(st.text(max_size=20), max_size=3))
    return "\n".join(f"{n}{lab} {v}" for n, lab, v in lines) + "\n" + "\n".join(junk)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=st.lists(_pages(), min_size=2, max_size=3))
def test_fuzz_any_page_sequence_gives_a_frame_and_valid_json(fake, pages):
    clock = Clock()
    poller = Poller(fake.url, local=False, clock=clock)
    console = Console(file=io.StringIO(), width=120)
    for page in pages:
        fake.body_override = page.encode("utf-8", "surrogatepass")
        clock.t += 1
        frame = poller.poll()
        json.dumps(snapshot(frame), allow_nan=False)
        for render in (view.requests_panel, view.latency_panel, view.engine_panel, view.cpu_panel, view.gpu_panel):
            console.print(render(frame))
        console.print(view.status_line(frame, 1.0))
        console.print(view.throughput_line("prefill", frame.vllm.prompt_tokens_per_s, frame.vllm.rate_window_s))
