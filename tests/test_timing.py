"""The host functions' timing counters and the per-token breakdown built from them
(what scripts/gpu_perf_30b.py reports for batch-1 decode inside vLLM)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lvllm_cli.moe import native, plugin_core, timing
from lvllm_cli.moe.hostcalls import InOrderExecutor
from lvllm_cli.moe.placement import Group
from moe_reference import random_problem

LAYERS = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
GPU_WORK_S = 0.004


@pytest.fixture()
def experts(tmp_path, monkeypatch):
    monkeypatch.setattr("lvllm_cli.moe.layer.default_groups", lambda: [Group(-1, (-1,))])
    env = {"LVLLM_METRICS_DIR": str(tmp_path / "m"), "LVLLM_TIMING_FILE": str(tmp_path / "timing.json")}
    ex = plugin_core.CpuExperts(env, rank=0, world=1, max_tokens=16, stream_ops=InOrderExecutor)
    for name in LAYERS:
        ex.new_layer(name, 4, 64, 32, "bfloat16")
        ex.finish_layer(name, dummy=True, seed=plugin_core.dummy_seed(name))
        ex.prepare(name, 2, torch.bfloat16)
    yield ex
    ex._runner.ops.close()


def _decode_steps(ex, steps: int, tokens: int = 1):
    """`steps` forward passes of `tokens` tokens through both CPU layers, with sleeps standing in for GPU work."""
    x, _, _, ids, tw = random_problem(tokens, 2, 4, 64, 32, seed=3)
    ops = ex._runner.ops
    for _ in range(steps):
        for name in LAYERS:
            ops.enqueue(lambda: time.sleep(GPU_WORK_S))
            ex.run(name, x, ids, tw)
    ops.synchronize()


def _snap(ex, path):
    exporter = plugin_core.MetricsExporter(ex, None)
    exporter.write_once()
    return timing.read_snapshot(path)


def test_breakdown_accounts_for_the_stream_time(experts, tmp_path):
    path = tmp_path / "timing.json"
    _decode_steps(experts, 2)  # warm-up; its gaps and calls are not in the window
    t0 = time.perf_counter()  # the window's first gap starts at the warm-up's last wait: just before here
    before = _snap(experts, path)
    _decode_steps(experts, 5)
    wall_ms = (time.perf_counter() - t0) * 1e3
    _decode_steps(experts, 3, tokens=3)  # more than one token: not counted by the host-function timing
    after = _snap(experts, path)
    b = timing.per_token_ms(before, after, cpu_layers=len(LAYERS))
    assert b["calls"] == 10 and b["tokens"] == 5
    # every call waits behind a 4 ms "GPU" sleep: 2 layers x 4 ms per token at least
    assert b["gap_ms"] >= 2 * GPU_WORK_S * 1e3
    for f in ("submit_ms", "to_wait_ms", "wait_ms", "done_to_return_ms", "engine_ms", "wake_first_ms"):
        assert b[f] >= 0, f
    assert b["wake_last_ms"] >= b["wake_first_ms"]
    # the engine runs between submit starting and the wait returning, and the stream's time fits in the wall time
    assert b["engine_ms"] <= b["submit_ms"] + b["to_wait_ms"] + b["wait_ms"] + 0.05
    # (the window's first gap began at the warm-up's last wait, a scheduling delay before t0)
    assert b["stream_ms"] * 5 <= wall_ms + 20
    assert b["engine_calls"] == 16  # 10 one-token calls + 6 three-token calls


def test_snapshot_file_is_json_with_both_counters(experts, tmp_path):
    _decode_steps(experts, 1)
    _snap(experts, tmp_path / "timing.json")
    snap = json.loads((tmp_path / "timing.json").read_text())
    assert set(snap) == {"time", "engine", "hostfn"}
    assert snap["hostfn"]["calls"] >= 2 and "wake_first" in snap["engine"]["phase_ns"]


def test_reset_and_errors():
    lk = native.load()
    lk.reset_hostfn_times()
    assert all(v == 0 for v in lk.hostfn_times().values())
    empty = timing.snapshot({"calls": 0, "busy_ns": 0, "phase_ns": {"wake_first": 0, "wake_last": 0}}, lk.hostfn_times())
    with pytest.raises(ValueError, match="no one-token CPU layer calls"):
        timing.per_token_ms(empty, empty, 2)
    with pytest.raises(ValueError, match="cpu_layers must be positive"):
        timing.per_token_ms(empty, empty, 0)
    assert timing.read_snapshot("/nonexistent/timing.json") is None
