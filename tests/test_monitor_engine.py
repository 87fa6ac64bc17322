"""The CPU-expert engine's per-worker .prom files: the directory rule, the plugin-side writer,
and the monitor's sums and rates (worker files written by prometheus_client as reference)."""

from __future__ import annotations

import os
import random
import stat
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from lvllm_cli.monitor import engine_metrics as em
from lvllm_cli.monitor.poller import Poller, snapshot
from monitor_fakes import Clock, close


def test_metrics_dir_rule():
    uid = os.getuid()
    assert em.metrics_dir({"LVLLM_METRICS_DIR": "/x/y", "XDG_RUNTIME_DIR": "/run/user/1"}) == Path("/x/y")
    assert em.metrics_dir({"XDG_RUNTIME_DIR": "/run/user/1"}) == Path("/run/user/1/lvllm")
    assert em.metrics_dir({"XDG_RUNTIME_DIR": "relative"}) == Path(f"/tmp/lvllm-{uid}")
    assert em.metrics_dir({}) == Path(f"/tmp/lvllm-{uid}")
    assert em.candidate_dirs({"LVLLM_METRICS_DIR": "/x"}) == [Path("/x")]
    assert em.candidate_dirs({"XDG_RUNTIME_DIR": "/run/user/1"}) == [Path("/run/user/1/lvllm"), Path(f"/tmp/lvllm-{uid}")]
    # a local server on a port: the directory `lvllm serve` gives its plugin comes first
    assert em.candidate_dirs({"XDG_RUNTIME_DIR": "/run/user/1"}, port=8001) == [
        Path("/run/user/1/lvllm/port-8001"), Path(f"/tmp/lvllm-{uid}/port-8001"), Path("/run/user/1/lvllm"), Path(f"/tmp/lvllm-{uid}")]
    assert em.candidate_dirs({"LVLLM_METRICS_DIR": "/x"}, port=8001) == [Path("/x")]
    assert em.server_metrics_dir(8001, {"XDG_RUNTIME_DIR": "/run/user/1"}) == Path("/run/user/1/lvllm/port-8001")
    assert em.server_metrics_dir(8001, {"LVLLM_METRICS_DIR": "/x"}) == Path("/x")
    for port in (8001, 9000):  # serve's directory is where the monitor looks first for that URL
        env = {"XDG_RUNTIME_DIR": "/run/user/1"}
        assert em.candidate_dirs(env, port=port)[0] == em.server_metrics_dir(port, env)


def test_remove_dead_workers_keeps_live_ones(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (os.getpid(), dead.pid):
        em.write_metrics_file(tmp_path, em.format_metrics(1, 1, 1, 1, 1), pid=pid)
    (tmp_path / "notes.prom").write_text("x 1\n")
    assert em.remove_dead_workers(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"lk_moe-{os.getpid()}.prom", "notes.prom"])
    assert em.remove_dead_workers(tmp_path / "missing") == 0


def test_prepare_dir_is_private_and_refuses_symlinks(tmp_path):
    d = em.prepare_dir(tmp_path / "a" / "lvllm")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o755)
    em.prepare_dir(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(PermissionError, match="LVLLM_METRICS_DIR"):
        em.prepare_dir(link)


def test_writer_output_is_valid_prometheus_text_written_atomically(tmp_path):
    d = em.prepare_dir(tmp_path / "m")
    path = em.write_metrics_file(d, em.format_metrics(12, 34, 0.5, 7, 16), pid=4242)
    assert path.name == "lk_moe-4242.prom"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    values = {s.name: s.value for fam in text_string_to_metric_families(path.read_text()) for s in fam.samples}
    assert values == {"lvllm_moe_cpu_tokens_total": 12.0, "lvllm_moe_gpu_tokens_total": 34.0,
                      "lvllm_moe_cpu_seconds_total": 0.5, "lvllm_moe_calls_total": 7.0, "lvllm_moe_threads": 16.0}
    assert sorted(p.name for p in d.iterdir()) == ["lk_moe-4242.prom"]  # no temporary left behind
    em.remove_metrics_file(d, 4242)
    assert list(d.iterdir()) == []


class Worker:
    """One vLLM worker's engine counters, written with prometheus_client (independent of our writer)."""

    def __init__(self, directory: Path, pid: int, threads: int) -> None:
        self.path = directory / f"lk_moe-{pid}.prom"
        r = self.reg = CollectorRegistry()
        self.cpu_tok = Counter("lvllm_moe_cpu_tokens", "", registry=r)
        self.gpu_tok = Counter("lvllm_moe_gpu_tokens", "", registry=r)
        self.cpu_s = Counter("lvllm_moe_cpu_seconds", "", registry=r)
        self.calls = Counter("lvllm_moe_calls", "", registry=r)
        Gauge("lvllm_moe_threads", "", registry=r).set(threads)

    def write(self) -> None:
        write_to_textfile(str(self.path), self.reg)


def test_engine_figures_sum_workers_and_survive_one_leaving(tmp_path, fake):
    d = tmp_path / "metrics"
    d.mkdir(mode=0o700)
    rng = random.Random(5)
    workers = [Worker(d, 100 + i, threads=8) for i in range(2)]
    for w in workers:
        w.write()
    clock = Clock(50.0)
    poller = Poller(fake.url, rate_window_s=4.0, local=True, metrics_dirs=[d], system=False, clock=clock)
    frame = poller.poll()
    assert frame.engine is not None and frame.engine.workers == 2 and frame.engine.threads == 16
    steps = []  # per poll: (dt, cpu_tok, gpu_tok, cpu_s, calls) summed over workers
    for _ in range(6):
        inc = [0.0] * 4
        for w in workers:
            vals = (rng.randint(0, 4000), rng.randint(0, 4000), rng.uniform(0, 0.8), rng.randint(1, 200))
            for c, v in zip((w.cpu_tok, w.gpu_tok, w.cpu_s, w.calls), vals):
                c.inc(v)
            inc = [a + b for a, b in zip(inc, vals)]
            w.write()
        dt = rng.uniform(0.5, 1.5)
        clock.t += dt
        steps.append((dt, *inc))
        frame = poller.poll()
    # the rate window holds the polls of the last 4 s
    times = [50.0]
    for s in steps:
        times.append(times[-1] + s[0])
    i0 = next(i for i, t in enumerate(times) if t >= times[-1] - 4.0 - 1e-9)
    win = steps[i0:]
    span = times[-1] - times[i0]
    cpu_tok, gpu_tok, cpu_s, calls = (sum(s[k] for s in win) for k in range(1, 5))
    e = frame.engine
    assert close(e.cpu_tokens_per_s, cpu_tok / span) and close(e.gpu_tokens_per_s, gpu_tok / span)
    assert close(e.cpu_busy, cpu_s / span) and close(e.calls_per_s, calls / span)
    assert close(e.cpu_s_per_call, cpu_s / calls) and close(e.cpu_token_share, cpu_tok / (cpu_tok + gpu_tok))
    assert snapshot(frame)["moe"]["workers"] == 2

    # worker 1 exits (its file goes); worker 0 goes on: no negative or spiking rates
    workers[1].path.unlink()
    for _ in range(5):
        workers[0].cpu_tok.inc(1000)
        workers[0].calls.inc(10)
        workers[0].write()
        clock.t += 1.0
        frame = poller.poll()
    assert frame.engine.workers == 1 and frame.engine.threads == 8
    assert close(frame.engine.cpu_tokens_per_s, 1000.0) and close(frame.engine.calls_per_s, 10.0)


def test_engine_panel_states(tmp_path, fake):
    clock = Clock(50.0)
    missing = tmp_path / "nope"
    frame = Poller(fake.url, local=True, metrics_dirs=[missing], system=False, clock=clock).poll()
    assert frame.engine is None and frame.engine_note == "no CPU-expert figures (plugin not active)"
    assert snapshot(frame)["moe"] is None

    d = tmp_path / "m"
    d.mkdir()
    w = Worker(d, 7, threads=4)
    w.write()
    old = time.time() - 3600
    os.utime(w.path, (old, old))  # a worker that stopped writing an hour ago
    frame = Poller(fake.url, local=True, metrics_dirs=[d], system=False, clock=clock).poll()
    assert frame.engine is None and "stale" in frame.engine_note

    (d / "junk.prom").write_text("lvllm_moe_calls_total{ oops\nlvllm_moe_threads 3\n")
    (d / ".lk_moe-9.prom.9.tmp").write_text("lvllm_moe_threads 100\n")  # a writer's temporary: ignored
    frame = Poller(fake.url, local=True, metrics_dirs=[d], system=False, clock=clock).poll()
    assert frame.engine is not None and frame.engine.workers == 1 and frame.engine.threads == 3

    frame = Poller(fake.url, local=False, metrics_dirs=[d], system=False, clock=clock).poll()
    assert frame.engine is None and "on this machine" in frame.engine_note


def test_read_first_prefers_the_directory_with_figures(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    Worker(b, 1, threads=2).write()
    r = em.read_first([a, b], t=0.0)
    assert r.status == "ok" and r.directory == b and r.workers == 1
