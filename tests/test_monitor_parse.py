"""Prometheus text parsing and fetching: agrees with prometheus_client on real output,
survives anything malformed, and explains every fetch failure."""

from __future__ import annotations

import math
import random
import socket
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lvllm_cli.monitor.metrics import BadURL, fetch, metrics_url, parse_exposition, parse_sample_line
from monitor_fakes import FakeVllm


def _reference(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _ours(text: str) -> dict[tuple[str, tuple], float]:
    sc = parse_exposition(text)
    assert sc.bad_lines == 0
    return {(n, labels): v for n, series in sc.series.items() for labels, v in series.items()}


def _random_registry(rng: random.Random) -> CollectorRegistry:
    reg = CollectorRegistry()
    alphabet = string.ascii_letters + string.digits + ' _-./:\\"\n{},=#é€'
    for i in range(rng.randint(1, 6)):
        labels = [f"l{j}" for j in range(rng.randint(0, 3))]
        kind = rng.choice(["counter", "gauge", "histogram"])
        name = f"vllm:m{i}_{kind}"
        values = [tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in labels) for _ in range(rng.randint(1, 3))]
        if kind == "counter":
            m = Counter(name, "help text", labels, registry=reg)
            for v in values:
                (m.labels(*v) if labels else m).inc(rng.uniform(0, 1e6))
        elif kind == "gauge":
            m = Gauge(name, "help \\ text\nmore", labels, registry=reg)
            for v in values:
                (m.labels(*v) if labels else m).set(rng.choice([rng.uniform(-1e9, 1e9), math.inf, -math.inf, 1e-300]))
        else:
            bounds = sorted(rng.sample([0.001, 0.01, 0.1, 0.5, 1, 2.5, 10, 100], rng.randint(1, 6)))
            m = Histogram(name, "h", labels, buckets=bounds, registry=reg)
            for v in values:
                for _ in range(rng.randint(0, 20)):
                    (m.labels(*v) if labels else m).observe(rng.expovariate(1.0))
    return reg


@pytest.mark.parametrize("seed", range(25))
def test_parse_agrees_with_prometheus_client(seed):
    text = generate_latest(_random_registry(random.Random(seed))).decode()
    assert _ours(text) == _reference(text)


def test_parse_vllm_page_names_and_labels():
    fake = FakeVllm()
    fake.prompt.labels("qwen", "0").inc(7)
    fake.ttft.labels("qwen", "0").observe(0.3)
    text = fake.render().decode()
    assert _ours(text) == _reference(text)
    sc = parse_exposition(text)
    assert sc.series["vllm:prompt_tokens_total"] == {(("engine", "0"), ("model_name", "qwen")): 7.0}
    assert sc.types["vllm:time_to_first_token_seconds"] == "histogram"


@pytest.mark.parametrize("line,expected", [
    ('a 1', ("a", (), 1.0)),
    ('a{} 1 1700000000000', ("a", (), 1.0)),
    ('a{x="1",} +Inf', ("a", (("x", "1"),), math.inf)),
    ('a { x = "q\\"\\\\\\n" } -inf', ("a", (("x", 'q"\\\n'),), -math.inf)),
    ('a{x="#"} 2 # {trace_id="abc"} 1.0 123', ("a", (("x", "#"),), 2.0)),  # OpenMetrics exemplar
    ('{"vllm.dotted", engine="0"} 3', ("vllm.dotted", (("engine", "0"),), 3.0)),
    ('a{x="unknown \\q escape"} 1', ("a", (("x", "unknown \\q escape"),), 1.0)),
])
def test_sample_lines(line, expected):
    assert parse_sample_line(line) == expected


def test_nan_value():
    name, labels, v = parse_sample_line("a NaN")
    assert name == "a" and math.isnan(v)


@pytest.mark.parametrize("line", [
    "a", "a{", 'a{x="1"', 'a{x=1} 2', 'a{x="1" y="2"} 3', "a 1_000", "a one", "a 1 2 3", "1a 2",
    'a{x="1"}3', "{} 1", 'a{"x"="y", "n"} 1', "a\\ 1", 'a{x="\\', "a 1 notatimestamp",
])
def test_malformed_lines_are_skipped_not_fatal(line):
    text = f"good_before 1\n{line}\ngood_after 2\n"
    sc = parse_exposition(text)
    assert sc.bad_lines == 1
    assert sc.series["good_before"][()] == 1.0 and sc.series["good_after"][()] == 2.0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_fuzz_arbitrary_text_never_raises(text):
    sc = parse_exposition(text)
    assert sc.bad_lines >= 0
    for name, series in sc.series.items():
        assert name
        for labels, v in series.items():
            assert isinstance(v, float)
            assert all(isinstance(k, str) and isinstance(val, str) for k, val in labels)


_piece = st.sampled_from(['vllm:x', '{', '}', '"', '\\', '=', ',', ' ', '\t', '\n', '#', 'le', '"0.5"', '1', '+Inf', 'NaN',
                          '-', 'e', '.', 'TYPE', 'HELP', 'model_name', '\r', '\x00', 'é'])


@settings(max_examples=400, deadline=None)
@given(st.lists(_piece, max_size=60).map("".join))
def test_fuzz_exposition_shaped_text_never_raises(text):
    parse_exposition(text)


@given(st.dictionaries(st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True).filter(lambda k: k != "__name__"),
                       st.text(max_size=12), max_size=4),
       st.floats(allow_nan=False))
@settings(max_examples=200, deadline=None)
def test_roundtrip_random_labels(labels, value):
    esc = {k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    line = "m{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "} " + repr(value)
    assert parse_sample_line(line) == ("m", tuple(sorted(labels.items())), value)


# ---------------------------------------------------------------- fetch


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300))
def test_fuzz_fetch_layer_with_garbage_bodies(fake, body):
    fake.body_override = body
    res = fetch(metrics_url(fake.url))
    assert res.ok
    parse_exposition(res.text)


def test_fetch_ok_and_partial_garbage(fake):
    fake.prompt.labels("m", "0").inc(3)
    fake.extra_text = "vllm:broken{ 1\n\xff\xfe garbage\nvllm:after 5\n"
    res = fetch(metrics_url(fake.url))
    sc = parse_exposition(res.text)
    assert sc.series["vllm:prompt_tokens_total"][(("engine", "0"), ("model_name", "m"))] == 3.0
    assert sc.series["vllm:after"][()] == 5.0
    assert sc.bad_lines == 2


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_fetch_errors_are_explained(fake):
    res = fetch(f"http://127.0.0.1:{_free_port()}/metrics")
    assert not res.ok and "connection refused" in res.error
    res = fetch(fake.url + "/nothing")
    assert not res.ok and "404" in res.error and "root URL" in res.error
    fake.required_auth = "sekrit"
    res = fetch(metrics_url(fake.url))
    assert not res.ok and "--api-key" in res.error
    assert fetch(metrics_url(fake.url), api_key="sekrit").ok
    res = fetch(fake.url + "/redirect", api_key="sekrit")
    assert not res.ok and "redirect" in res.error and "sekrit" not in res.error
    res = fetch("http://no-such-host.invalid:8000/metrics", timeout=1)
    assert not res.ok and "no-such-host.invalid" in res.error
    fake.status = 500
    fake.required_auth = None
    res = fetch(metrics_url(fake.url))
    assert not res.ok and "500" in res.error


def test_fetch_timeout():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts the connection, never answers
    try:
        res = fetch(f"http://127.0.0.1:{srv.getsockname()[1]}/metrics", timeout=0.3)
        assert not res.ok and "0.3 s" in res.error
    finally:
        srv.close()


def test_fetch_refuses_oversized_pages(fake):
    fake.body_override = b"a 1\n" * 1000
    res = fetch(metrics_url(fake.url), max_bytes=1000)
    assert not res.ok and "not a metrics page" in res.error


@pytest.mark.parametrize("given_,expected", [
    (None, "http://127.0.0.1:8000/metrics"),
    ("localhost:9000", "http://localhost:9000/metrics"),
    ("http://h:1/", "http://h:1/metrics"),
    ("http://h:1/v1", "http://h:1/metrics"),
    ("https://h/v1/", "https://h/metrics"),
    ("http://h:1/custom/metrics", "http://h:1/custom/metrics"),
])
def test_metrics_url(given_, expected):
    assert metrics_url(given_) == expected


@pytest.mark.parametrize("bad", ["ftp://h/", "http://", "http://h:port/"])
def test_metrics_url_rejects(bad):
    with pytest.raises(BadURL):
        metrics_url(bad)
