"""`lvllm tune --measure`: which thread counts are timed and which one is kept."""

import json

import plan_machines as pm
import pytest
from cli_helpers import machine_file, run_cli, write_model_config

from lvllm_cli import measure
from lvllm_cli.plan import Request, build_plan
from lvllm_cli.profiles import resolve
from lvllm_cli.ranges import parse_rank_lists

GiB = 1 << 30


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
    monkeypatch.setattr(measure, "load_format_bench", lambda: None)
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


# ---- the experts format ------------------------------------------------------------------------


class FormatStub:
    """A stand-in format benchmark: fixed µs per layer per engine dtype, recording its calls."""

    def __init__(self, speeds):
        self.speeds = speeds  # dtype -> (decode_us, prefill_us)
        self.calls = []

    def __call__(self, hidden, inter, experts, topk, dtype, group, threads, cpus, seconds, prefill_tokens):
        self.calls.append((hidden, inter, experts, topk, dtype, group, threads, list(cpus), seconds, prefill_tokens))
        d, p = self.speeds[dtype]
        return {"dtype": dtype, "group": group, "decode_us": d, "prefill_us": p, "layers": 2}


@pytest.mark.parametrize(
    "speeds, widen",
    [
        # P=4 (default): int4 4/128 x 20000 + 100 = 725, bf16 4/128 x 2000 + 300 = 362.5: half the time
        ({"int4": (100.0, 20000.0), "bfloat16": (300.0, 2000.0)}, True),
        # int4 4/128 x 10000 + 100 = 412.5, bf16 4/128 x 8000 + 400 = 650
        ({"int4": (100.0, 10000.0), "bfloat16": (400.0, 8000.0)}, False),
    ],
)
def test_measured_format_speeds_decide_and_replan(speeds, widen):
    m, t = pm.epyc_nps4(), resolve("glm-4.5-air:awq")  # int4 group 32; bf16 fits its 768 GiB
    req = Request()
    plan = build_plan(m, t, req)
    assert plan.experts_format["speed_matters"] and not plan.experts_format["widen"]
    bench = FormatStub(speeds)
    out = measure.measure_plan(m, t, req, plan, threads_bench=None, format_bench=bench, seconds=0.5)
    w0 = plan.workers[0]
    assert bench.calls == [
        (4096, 1408, 128, 8, "int4", 32, w0.threads, w0.cpus, 0.25, 128),
        (4096, 1408, 128, 8, "bfloat16", 0, w0.threads, w0.cpus, 0.25, 128),
    ]
    ef = out.experts_format
    assert ef["widen"] is widen and out.env["LVLLM_EXPERTS_BF16"] == ("1" if widen else "0")
    assert ef["speeds"] == {"quantized": dict(zip(("decode_us", "prefill_us"), speeds["int4"])),
                            "bf16": dict(zip(("decode_us", "prefill_us"), speeds["bfloat16"]))}
    assert ef["speeds_source"].startswith("measured on this machine") and len(ef["measurements"]) == 2
    per_layer = 128 * 3 * 4096 * 1408 * 2 if widen else t.facts.expert_bytes_per_layer()
    assert out.ram_needed_bytes == len(out.cpu_layers) * per_layer + 4 * GiB + 3 * GiB * len(out.workers)


def test_format_measurement_skipped_when_speed_cannot_change_the_choice():
    bench = FormatStub({})
    for m, name, req in ((pm.xeon_snc(), "glm-4.5-air", Request(experts_format="quantized")),  # explicit request
                         (pm.desktop(), "qwen3-next:awq", Request()),  # bf16 does not fit 64 GiB
                         (pm.xeon_snc(), "qwen3-next", Request())):  # bf16 checkpoint
        t = resolve(name)
        plan = build_plan(m, t, req)
        lines = []
        assert measure.measure_plan(m, t, req, plan, threads_bench=None, format_bench=bench, report=lines.append) is plan
        assert lines[0].startswith("experts format not measured: ") and plan.experts_format["reason"] in lines[0]
    assert bench.calls == []


def test_a_failing_format_benchmark_keeps_the_known_ratios_and_the_thread_sweep_runs():
    m, t = pm.epyc_nps4(), resolve("glm-4.5-air:awq")
    plan = build_plan(m, t)

    def broken(*args):
        raise MemoryError("one layer needs 4.1 GiB but only 2.0 GiB of RAM is free")

    lines, threads = [], Curve(best=20)
    out = measure.measure_plan(m, t, Request(), plan, threads_bench=threads, format_bench=broken, seconds=0.1, report=lines.append)
    assert any(x.startswith("experts format not measured: MemoryError: one layer needs") for x in lines)
    assert out.experts_format == plan.experts_format and "docs/PERFORMANCE.md" in out.experts_format["speeds_source"]
    assert threads.calls and out.measurements


def test_cli_measure_times_the_formats_with_the_real_engine(tmp_path, monkeypatch):
    """tune --measure on this machine, the real engine at tiny fp8 shapes (the thread sweep is left out: its
    4 GiB working set takes long); the choice follows the measured numbers by the stated rule."""
    monkeypatch.setattr(measure, "load_bench", lambda: None)
    monkeypatch.delenv("LVLLM_EXPERTS_BF16", raising=False)
    d = write_model_config(tmp_path / "m", quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    r = run_cli("tune", d, "--measure", "--measure-seconds", "0.2", "--json", "--gpu-layers", "0", "--prompt-ratio", "6")
    assert r.exit_code == 0, r.output
    assert "thread count not measured" in r.stderr
    ef = json.loads(r.stdout)["experts_format"]
    rows = {x["format"]: x for x in ef["measurements"]}
    assert (rows["quantized"]["dtype"], rows["quantized"]["group"]) == ("fp8", 128)
    assert (rows["bf16"]["dtype"], rows["bf16"]["group"]) == ("bfloat16", 0)
    assert all(x["decode_us"] > 0 and x["prefill_us"] > 0 and x["layers"] >= 2 and x["prefill_tokens"] == 128 for x in rows.values())
    assert rows["quantized"]["layer_bytes"] == 16 * (3 * 512 * 256 + 3 * 512 * 256 // 128 * 2)  # fp8 codes + fp16 scales per 128
    assert rows["bf16"]["layer_bytes"] == 16 * 3 * 512 * 256 * 2
    cost = {k: 6 / 128 * x["prefill_us"] + x["decode_us"] for k, x in rows.items()}
    assert ef["speeds_source"].startswith("measured on this machine")
    assert ef["widen"] is (cost["bf16"] <= 0.9 * cost["quantized"])
    assert json.loads(r.stdout)["env"]["LVLLM_EXPERTS_BF16"] == ("1" if ef["widen"] else "0")
    assert len(ef["measurements"]) == 2 and "fp8 group 128: decode" in r.stderr and "bfloat16: decode" in r.stderr
