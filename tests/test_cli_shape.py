"""`lvllm shape`: full-size model directories without weights, and serving them with dummy weights."""

import json
import math

import pytest
from cli_helpers import machine_file, run_cli

from lvllm_cli.tiny_models import SHAPES


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("LVLLM_METRICS_DIR", raising=False)


def test_list_as_json_with_expert_bytes_from_the_config():
    r = run_cli("shape", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(SHAPES)
    for name, cfg in SHAPES.items():
        h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
        q = cfg.get("quantization_config", {})
        if not q:  # bf16: 2 bytes per weight
            per_expert = 3 * h * i * 2
        elif q["quant_method"] == "fp8":  # a byte per weight + an fp32 scale per 128x128 block
            per_expert = 3 * h * i + 4 * (2 * math.ceil(i / 128) * math.ceil(h / 128) + math.ceil(h / 128) * math.ceil(i / 128))
        else:  # int4 group 32: half a byte per weight + a 16-bit scale per group
            g = q["config_groups"]["group_0"]["weights"]["group_size"]
            per_expert = 3 * h * i // 2 + 2 * 3 * h * i // g
        # every layer is MoE in these shapes
        assert rows[name]["expert_bytes"] == cfg["num_hidden_layers"] * cfg["num_experts"] * per_expert, name
        assert rows[name]["experts"] == cfg["num_experts"] and rows[name]["layers"] == cfg["num_hidden_layers"]
    r = run_cli("shape")
    assert r.exit_code == 0 and all(name in r.stdout for name in SHAPES)


def test_write_then_serve_with_dummy_weights(tmp_path):
    target = tmp_path / "shapes" / "q30"
    r = run_cli("shape", "qwen3-30b-a3b", target)
    assert r.exit_code == 0, r.output
    assert f"lvllm serve {target} -- --load-format dummy" in r.stdout
    cfg = json.loads((target / "config.json").read_text())
    assert {k: cfg[k] for k in SHAPES["qwen3-30b-a3b"]} == SHAPES["qwen3-30b-a3b"]
    vocab = json.loads((target / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == cfg["vocab_size"] and sorted(vocab.values()) == list(range(cfg["vocab_size"]))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    r = run_cli("serve", target, "--machine", machine_file(tmp_path, "desktop"), "--dry-run", "--json", "--", "--load-format", "dummy")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["argv"][4] == str(target) and out["argv"][-2:] == ["--load-format", "dummy"]
    assert out["plan"]["moe_layers"] == list(range(cfg["num_hidden_layers"]))


def test_errors(tmp_path):
    r = run_cli("shape", "qwen3-31b", tmp_path / "x")
    assert r.exit_code == 2 and "unknown shape 'qwen3-31b'" in r.stderr and "qwen3-30b-a3b" in r.stderr
    r = run_cli("shape", "qwen3-30b-a3b")
    assert r.exit_code == 2 and "give the directory" in r.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    r = run_cli("shape", "qwen3-30b-a3b", full)
    assert r.exit_code == 2 and "not an empty directory" in r.stderr
    assert [p.name for p in full.iterdir()] == ["mine.txt"]
    blocker = tmp_path / "afile"
    blocker.write_text("")
    r = run_cli("shape", "qwen3-30b-a3b", blocker / "sub")  # its parent is a file: cannot be created
    assert r.exit_code == 1 and "cannot write" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full"]  # nothing half-written
