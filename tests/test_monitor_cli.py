"""`lvllm monitor` as a user runs it: a real process against a real HTTP server."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest

from monitor_fakes import ITL_BUCKETS, TTFT_BUCKETS, ref_quantile


def lvllm(*args, env=None, timeout=60):
    exe = shutil.which("lvllm", path=os.path.dirname(sys.executable)) or shutil.which("lvllm")
    full_env = {**os.environ, **(env or {})}
    for key in ("VLLM_API_KEY", "LVLLM_API_KEY"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def test_once_json_rates_and_percentiles(fake, tmp_path):
    rng = random.Random(9)
    made = []  # per scrape: the observations made just before it

    def advance(f):
        ttft = [rng.lognormvariate(-1.5, 0.7) for _ in range(rng.randint(5, 40))]
        itl = [rng.lognormvariate(-3.2, 0.4) for _ in range(rng.randint(50, 200))]
        for x in ttft:
            f.ttft.labels("qwen", "0").observe(x)
        for x in itl:
            f.itl.labels("qwen", "0").observe(x)
        f.prompt.labels("qwen", "0").inc(3000)
        f.generation.labels("qwen", "0").inc(250)
        f.running.labels("qwen", "0").set(7)
        f.waiting.labels("qwen", "0").set(2)
        f.kv.labels("qwen", "0").set(0.625)
        made.append((ttft, itl))

    fake.on_scrape = advance
    r = lvllm("monitor", "--once", "--json", "--interval", "0.3", "--metrics-dir", str(tmp_path / "none"), fake.url)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert fake.scrapes == 2 and d["server_up"] is True and d["is_vllm"] is True
    dt = d["interval_s"]
    assert 0.3 <= dt < 5
    # between the two scrapes the server counted exactly one advance
    assert d["prompt_tokens_per_s"] == pytest.approx(3000 / dt, rel=1e-5)
    assert d["generation_tokens_per_s"] == pytest.approx(250 / dt, rel=1e-5)
    assert (d["requests_running"], d["requests_waiting"], d["kv_cache_usage"]) == (7, 2, 0.625)
    ttft, itl = made[1]
    assert d["ttft_count"] == len(ttft) and d["itl_count"] == len(itl)
    for q in (50, 90, 99):
        assert d[f"ttft_p{q}_s"] == pytest.approx(ref_quantile(ttft, TTFT_BUCKETS, q / 100), rel=1e-5, abs=1e-6)
        assert d[f"itl_p{q}_s"] == pytest.approx(ref_quantile(itl, ITL_BUCKETS, q / 100), rel=1e-5, abs=1e-6)
    assert d["e2e_p50_s"] is None  # nothing finished in the interval
    assert d["moe"] is None and "plugin not active" in d["moe_note"]
    assert d["system"] is not None  # a local server: this machine's figures


def test_once_human_readable(fake):
    fake.on_scrape = lambda f: f.generation.labels("m", "0").inc(100)
    r = lvllm("monitor", "--once", "--interval", "0.2", fake.url)
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stdout and "tok/s" in r.stdout


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def test_unreachable_server_is_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    r = lvllm("monitor", "--once", "--json", url)
    assert r.returncode == 1
    assert "connection refused" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout)["server_up"] is False
    r = lvllm("monitor", "--once", url)
    assert r.returncode == 1 and "cannot read metrics" in r.stderr and r.stdout == ""


def test_not_vllm_and_unknown_model(fake):
    fake.prompt.labels("m", "0").inc(1)
    r = lvllm("monitor", "--json", "--interval", "0.1", "--model", "other", fake.url)  # --json implies --once
    assert r.returncode == 1 and "model_name='other'" in r.stderr and "the server has: m" in r.stderr
    fake.body_override = b"http_requests_total 3\n"
    r = lvllm("monitor", "--once", "--interval", "0.1", fake.url)
    assert r.returncode == 1 and "no vllm:* metrics" in r.stderr


def test_api_key_from_environment(fake):
    fake.required_auth = "tok3n"
    r = lvllm("monitor", "--once", "--interval", "0.1", fake.url)
    assert r.returncode == 1 and "--api-key" in r.stderr
    r = lvllm("monitor", "--once", "--interval", "0.1", fake.url, env={"VLLM_API_KEY": "tok3n"})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["ftp://x"], "unsupported scheme"),
    (["http://h:port"], "bad port"),
    (["--once", "--interval", "0"], "--interval"),
    (["--window", "0"], "--window"),
    (["--timeout", "-1"], "--timeout"),
    ([], "needs a terminal"),
])
def test_bad_input(args, needle):
    r = lvllm("monitor", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
