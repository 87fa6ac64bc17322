"""`lvllm tune --measure`: which thread counts are timed and which one is kept."""

import json

import plan_machines as pm
import pytest
from cli_helpers import machine_file, run_cli

from lvllm_cli import measure
from lvllm_cli.plan import build_plan
from lvllm_cli.profiles import resolve
from lvllm_cli.ranges import parse_rank_lists


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def test_thread_candidates():
    assert measure.thread_candidates(7, 1) == [7, 5, 3, 1]
    assert measure.thread_candidates(95, 4) == [92, 68, 44, 20]  # multiples of the node count
    assert measure.thread_candidates(1, 1) == [1]
    assert measure.thread_candidates(3, 4) == [3]
    for n in range(1, 60):
        for nodes in (1, 2, 4):
            c = measure.thread_candidates(n, nodes)
            assert c == sorted(set(c), reverse=True) and all(1 <= k <= n for k in c)


def test_pick_cpus_spreads_over_nodes():
    plan = build_plan(pm.epyc_nps4(), resolve("qwen3-next"))
    w = plan.workers[0]
    node_of = {c.id: c.node for c in pm.epyc_nps4().cpu.online}
    picked = measure.pick_cpus(w, 20, node_of)
    assert len(picked) == 20 and set(picked) <= set(w.cpus)
    per_node = {n: sum(1 for c in picked if node_of[c] == n) for n in w.numa_nodes}
    assert set(per_node.values()) == {5}


class Curve:
    """A stand-in benchmark: a decode cost curve with its optimum at `best` threads, recording its calls."""

    def __init__(self, best):
        self.best = best
        self.calls = []

    def __call__(self, hidden, inter, experts, topk, threads, cpus, seconds):
        self.calls.append((hidden, inter, experts, topk, threads, list(cpus), seconds))
        return 1000.0 / min(threads, self.best) + 3.0 * max(0, threads - self.best)


def test_measure_keeps_the_fastest_and_rewrites_the_cpu_env():
    m = pm.xeon_snc()
    t = resolve("glm-4.5-air")
    plan = build_plan(m, t)
    node_of = {c.id: c.node for c in m.cpu.online}
    bench = Curve(best=14)
    out = measure.measure_threads(plan, t.facts, node_of, bench, seconds=0.5)
    tried = [c[4] for c in bench.calls]
    assert tried == measure.thread_candidates(27, 2)
    # every call: the model's per-rank shapes, the CPUs it names, the requested duration
    for hidden, inter, experts, topk, threads, cpus, seconds in bench.calls:
        assert (hidden, inter, experts, topk, seconds) == (4096, 1408, 128, 8, 0.5) and len(cpus) == threads
    timings = {r["threads"]: r["us_per_layer"] for r in out.measurements}
    best = min(timings, key=timings.get)
    assert [w.threads for w in out.workers] == [best, best]
    assert parse_rank_lists(out.env["LVLLM_RANK_CPUS"], 2) == [w.cpus for w in out.workers]
    assert out.env["LVLLM_RANK_THREADS"] == f"{best}|{best}"
    assert any("measured:" in r for r in out.reasons)
    assert out.gpu_layers == plan.gpu_layers and out.vllm_args == plan.vllm_args


def test_measure_uses_the_tp_slice_and_skips_without_cpu_layers():
    m = pm.epyc_nps4()
    t = resolve("qwen3-coder-30b")
    plan = build_plan(m, t)
    assert not plan.cpu_layers
    bench = Curve(best=8)
    assert measure.measure_threads(plan, t.facts, {}, bench) is plan and bench.calls == []


def test_cli_measure_refuses_a_saved_machine(tmp_path):
    r = run_cli("tune", "qwen3-next:awq", "--machine", machine_file(tmp_path, "desktop"), "--measure", "--json")
    assert r.exit_code == 0
    assert "--measure skipped" in r.stderr and "times this machine's CPUs" in r.stderr
    assert json.loads(r.stdout)["measurements"] == []


def test_cli_measure_without_engine_module_says_so(tmp_path, monkeypatch):
    from fixtures.sysfs import make_desktop

    monkeypatch.setattr(measure, "load_bench", lambda: None)
    r = run_cli("tune", "qwen3-next:awq", "--measure", "--json", env={"LVLLM_SYSROOT": str(make_desktop(tmp_path / "root"))})
    assert r.exit_code == 0, r.output
    assert "--measure skipped" in r.stderr and "lvllm_cli.moe.bench" in r.stderr
    assert json.loads(r.stdout)["measurements"] == []


def test_cli_measure_with_a_benchmark(tmp_path, monkeypatch):
    bench = Curve(best=3)
    monkeypatch.setattr(measure, "load_bench", lambda: bench)
    from fixtures.sysfs import make_desktop

    root = make_desktop(tmp_path / "root")
    r = run_cli("tune", "qwen3-next:awq", "--measure", "--measure-seconds", "0.2", "--json", env={"LVLLM_SYSROOT": str(root)})
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [x["threads"] for x in out["measurements"]] == [7, 5, 3, 1]
    assert out["workers"][0]["threads"] == 3 and out["env"]["LK_THREADS"] == "3" and out["env"]["LK_CPUS"] == "1-3"
