"""The vLLM plugin's decisions and CPU side, without vLLM: env parsing, placement per rank,
loading as vLLM's loader does it, dummy weights, the runner and the metrics file."""

from __future__ import annotations

import pytest
import torch

from lvllm_cli.monitor import engine_metrics
from lvllm_cli.moe import plugin_core
from lvllm_cli.moe.hostcalls import InOrderExecutor
from lvllm_cli.moe.placement import Group
from moe_reference import as_f64, random_problem, reference_moe, rel_err


def test_enabled_only_with_exact_switch():
    assert plugin_core.enabled({"LVLLM_MOE_CPU": "1"})
    for v in ("", "0", "true", "yes"):
        assert not plugin_core.enabled({"LVLLM_MOE_CPU": v})
    assert not plugin_core.enabled({})


@pytest.mark.parametrize("name,index", [("model.layers.0.mlp.experts", 0), ("model.layers.47.mlp.experts", 47),
                                        ("language_model.model.layers.12.mlp.experts", 12)])
def test_layer_index(name, index):
    assert plugin_core.layer_index(name) == index


def test_layer_index_refuses_ambiguous_names():
    with pytest.raises(ValueError, match="cannot tell the decoder layer"):
        plugin_core.layer_index("model.mlp.experts")
    with pytest.raises(ValueError, match="cannot tell"):
        plugin_core.layer_index("model.layers.1.block.2.experts")


def test_gpu_layers():
    assert plugin_core.gpu_layers({"LVLLM_GPU_LAYERS": "0-3,46-47"}, 48) == {0, 1, 2, 3, 46, 47}
    assert plugin_core.gpu_layers({}, 48) == set()
    with pytest.raises(ValueError, match="LVLLM_GPU_LAYERS.*out of range"):
        plugin_core.gpu_layers({"LVLLM_GPU_LAYERS": "40-50"}, 48)
    with pytest.raises(ValueError, match="LVLLM_GPU_LAYERS"):
        plugin_core.gpu_layers({"LVLLM_GPU_LAYERS": "a-b"}, 48)


def test_placement_per_rank():
    env = {"LVLLM_RANK_CPUS": "0-3|4-7", "LVLLM_RANK_NODES": "0|1", "LVLLM_RANK_THREADS": "3|4"}
    p1 = plugin_core.placement_for_rank(env, 1, 2)
    assert p1 == plugin_core.Placement(threads=4, cpus=(4, 5, 6, 7), nodes=(1,))
    assert plugin_core.placement_for_rank({}, 0, 1) == plugin_core.Placement()
    with pytest.raises(ValueError, match="has 2 entries but vLLM runs 4 parallel ranks"):
        plugin_core.placement_for_rank(env, 0, 4)
    with pytest.raises(ValueError, match="rank 0"):
        plugin_core.placement_for_rank({"LVLLM_RANK_CPUS": "x|1"}, 0, 2)


def test_ranks_may_not_share_cores():
    plugin_core.check_rank_lists_disjoint({"LVLLM_RANK_CPUS": "0-3|4-7"})
    with pytest.raises(ValueError, match="CPU 3 to ranks 0 and 1"):
        plugin_core.check_rank_lists_disjoint({"LVLLM_RANK_CPUS": "0-3|3-7"})


@pytest.fixture()
def experts(tmp_path, monkeypatch):
    # Two unpinned workers split into two virtual nodes: the node split is exercised on any machine.
    monkeypatch.setattr("lvllm_cli.moe.layer.default_groups", lambda: [Group(-1, (-1,)), Group(-1, (-1,))])
    ex = plugin_core.CpuExperts({"LVLLM_METRICS_DIR": str(tmp_path)}, rank=0, world=1, max_tokens=32,
                                stream_ops=InOrderExecutor)
    yield ex
    ex._runner.ops.close() if ex._runner else None


def _load_like_vllm(layer, w13, w2, order):
    """What the plugin's weight_loader ends with: one expert part at a time, in checkpoint order."""
    I = layer.intermediate
    for e, part in order:
        src = {"gate": w13[e, :I], "up": w13[e, I:], "down": w2[e]}[part]
        layer.load_expert(e, part, src.clone())


def test_layer_loads_runs_and_matches_reference(experts):
    E, H, I, k = 8, 64, 48, 2
    x, w13, w2, ids, tw = random_problem(40, k, E, H, I, seed=21)
    layer = experts.new_layer("model.layers.3.mlp.experts", E, H, I, "bfloat16")
    order = [(e, p) for p in ("down", "up", "gate") for e in reversed(range(E))]  # shards in any order
    _load_like_vllm(layer, w13, w2, order)
    experts.finish_layer("model.layers.3.mlp.experts", dummy=False, seed=0)
    experts.prepare("model.layers.3.mlp.experts", k, torch.bfloat16)
    out = experts.run("model.layers.3.mlp.experts", x, ids, tw)  # 40 tokens > staging 32: chunked
    experts._runner.ops.synchronize()
    ref = reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())
    assert rel_err(as_f64(out), ref) <= 1e-2


def test_missing_experts_are_named(experts):
    E, H, I = 4, 32, 32
    _, w13, w2, _, _ = random_problem(1, 1, E, H, I, seed=2)
    layer = experts.new_layer("model.layers.0.mlp.experts", E, H, I, "bfloat16")
    _load_like_vllm(layer, w13, w2, [(e, p) for e in range(E) for p in ("gate", "up", "down") if (e, p) != (2, "up")])
    with pytest.raises(RuntimeError, match=r"1 incomplete, e\.g\. expert 2 lacks up"):
        experts.finish_layer("model.layers.0.mlp.experts", dummy=False, seed=0)


def test_dummy_load_fills_and_is_reproducible(experts):
    E, H, I = 4, 64, 32
    x, _, _, ids, tw = random_problem(6, 2, E, H, I, seed=5)
    outs = []
    for name in ("model.layers.1.mlp.experts", "model.layers.1.mlp.experts"):
        layer = experts.new_layer(name, E, H, I, "bfloat16")
        experts.finish_layer(name, dummy=True, seed=plugin_core.dummy_seed(name))
        assert layer.complete
        outs.append(layer.forward(x, ids, tw))
    assert torch.equal(outs[0], outs[1])
    assert 0 < outs[0].abs().max().item() < 1e-3  # U(-1e-3, 1e-3) weights, as vLLM's dummy loader


def test_metrics_file_is_read_back_by_the_monitor(experts, tmp_path):
    E, H, I, k = 4, 32, 32, 2
    x, w13, w2, ids, tw = random_problem(5, k, E, H, I, seed=8)
    layer = experts.new_layer("model.layers.2.mlp.experts", E, H, I, "bfloat16")
    experts.finish_layer("model.layers.2.mlp.experts", dummy=True, seed=1)
    experts.gpu_layer_count = 3
    for _ in range(4):
        layer.forward(x, ids, tw)
    exporter = experts.start_metrics(tmp_path, period_s=60)
    exporter.write_once()
    files = list(tmp_path.glob("lk_moe-*.prom"))
    assert len(files) == 1
    text = files[0].read_text()
    read = engine_metrics.read_dir(tmp_path, 0.0)
    assert read.status == "ok" and read.workers == 1
    st = experts.engine.stats()
    assert st["calls"] >= 4
    # GPU tokens are derived: CPU tokens per CPU layer x GPU layers (1 CPU layer here, 3 GPU layers).
    values = {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}
    assert values["lvllm_moe_cpu_tokens_total"] == st["tokens"]
    assert values["lvllm_moe_gpu_tokens_total"] == 3 * st["tokens"]
    assert values["lvllm_moe_threads"] == experts.engine.threads
    assert values["lvllm_moe_calls_total"] == st["calls"]
    assert values["lvllm_moe_cpu_seconds_total"] == pytest.approx(st["busy_ns"] / 1e9)
    exporter.stop()
    assert not list(tmp_path.glob("lk_moe-*.prom"))


def test_metrics_directory_we_may_not_use_costs_only_the_figures(experts, tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert experts.start_metrics(not_a_dir) is None
    assert "not published" in caplog.text
