"""`lvllm tune` and `lvllm profiles` on the command line: table, JSON, exit codes, errors."""

import json

import plan_machines as pm
import pytest
from cli_helpers import machine_file, run_cli, write_model_config

from lvllm_cli.plan import build_plan
from lvllm_cli.profiles import resolve


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize("machine_name", list(pm.ALL))
def test_tune_json_is_the_plan(tmp_path, machine_name):
    r = run_cli("tune", "qwen3-next:awq", "--machine", machine_file(tmp_path, machine_name), "--json")
    plan = build_plan(pm.ALL[machine_name](), resolve("qwen3-next:awq"))
    assert r.exit_code == (0 if plan.fits else 1)
    out = json.loads(r.stdout)
    assert out == json.loads(json.dumps(plan.to_dict()))
    assert out["version"] == 1


def test_tune_table_explains_every_choice(tmp_path):
    r = run_cli("tune", "qwen3-next", "--machine", machine_file(tmp_path, "xeon_snc"), env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for needle in ("TP=1 x PP=2", "sockets", "gpu-layers", "host RAM", "max-model-len", "OMP_NUM_THREADS", "LVLLM_GPU_LAYERS=", "LVLLM_RANK_CPUS=1-27|29-55", "the plan fits this machine"):
        assert needle in r.stdout, needle


def test_tune_no_fit_exit_code_and_suggestion(tmp_path):
    r = run_cli("tune", "qwen3-next", "--machine", machine_file(tmp_path, "desktop"), env={"COLUMNS": "250"})
    assert r.exit_code == 1
    assert "does NOT fit" in r.stdout and "use qwen3-next:awq" in r.stdout


def test_tune_no_gpu_prints_plan_with_warning(tmp_path):
    r = run_cli("tune", "demo", "--machine", machine_file(tmp_path, "avx2_vm"), env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "no NVIDIA GPU found" in r.stdout


def test_tune_options_reach_the_planner(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    out = json.loads(run_cli("tune", "qwen3-next:awq", "--machine", mf, "--json", "--max-model-len", "16K", "--max-num-seqs", "2", "--gpu-layers", "5", "--smt").stdout)
    assert out["max_model_len"] == 16384 and out["max_num_seqs"] == 2 and out["gpu_layers"] == [43, 44, 45, 46, 47]
    assert out["workers"][0]["threads"] == 14


def test_tune_save_writes_whole_file(tmp_path):
    target = tmp_path / "sub" / "plan.json"
    r = run_cli("tune", "demo", "--machine", machine_file(tmp_path, "desktop"), "--save", target)
    assert r.exit_code == 2 and "cannot write" in r.stderr and not target.exists()
    target = tmp_path / "plan.json"
    r = run_cli("tune", "demo", "--machine", machine_file(tmp_path, "desktop"), "--save", target)
    assert r.exit_code == 0 and json.loads(target.read_text())["name"] == "demo"
    assert "lvllm serve --plan" in r.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".plan")] == []


def test_tune_errors(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    r = run_cli("tune", "mixtral", "--machine", mf)
    assert r.exit_code == 2 and "unknown profile 'mixtral'" in r.stderr and "Known profiles: demo, glm-4.5-air, qwen3-coder-30b, qwen3-next" in r.stderr
    r = run_cli("tune", "qwen3-next", "--variant", "int8", "--machine", mf)
    assert r.exit_code == 2 and "no variant 'int8'" in r.stderr
    r = run_cli("tune", "demo", "--machine", mf, "--max-model-len", "0")
    assert r.exit_code == 2 and "must be a positive number" in r.stderr
    r = run_cli("tune", "demo", "--machine", mf, "--gpu-memory-utilization", "1.5")
    assert r.exit_code == 2 and "must be in (0, 1]" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cpu": {"flags": [], "bogus": 1}}))
    r = run_cli("tune", "demo", "--machine", bad)
    assert r.exit_code == 2 and "unknown key(s) bogus" in r.stderr
    prof = tmp_path / "mine.yaml"
    prof.write_text("name: mine\nmodel: x/y\nsettings:\n  max_model_len: -5\n")
    r = run_cli("tune", prof, "--machine", mf)
    assert r.exit_code == 2 and "mine.yaml:4: settings.max_model_len: expected a positive integer, got -5" in r.stderr


def test_tune_without_probe_module_asks_for_machine_file():
    import importlib.util

    if importlib.util.find_spec("lvllm_cli.probe") is not None:
        # The doctor's probe is merged: tune probes this machine (which may or may not fit the demo).
        r = run_cli("tune", "demo", "--json")
        assert r.exit_code in (0, 1) and json.loads(r.stdout)["name"] == "demo"
    else:
        r = run_cli("tune", "demo")
        assert r.exit_code == 1 and "--machine FILE" in r.stderr


def test_tune_model_dir(tmp_path):
    d = write_model_config(tmp_path / "m")
    r = run_cli("tune", d, "--machine", machine_file(tmp_path, "desktop"), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["model"] == str(d.resolve())


def test_profiles_command():
    r = run_cli("profiles", "--json")
    assert r.exit_code == 0
    profs = {p["name"]: p for p in json.loads(r.stdout)}
    assert profs["qwen3-next"]["variants"]["fp8"]["model"] == "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8"
    assert profs["demo"]["generated"] is True
    r = run_cli("profiles", env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "glm-4.5-air" in r.stdout and "zai-org/GLM-4.5-Air-FP8" in r.stdout
