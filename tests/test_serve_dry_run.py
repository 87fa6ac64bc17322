"""`lvllm serve --dry-run`: the exact argv and environment for every fixture machine and profile."""

import json
import os
import sys

import plan_machines as pm
import pytest
from cli_helpers import machine_file, run_cli, write_model_config

from lvllm_cli.plan import build_plan
from lvllm_cli.profiles import resolve
from lvllm_cli.serve import VLLM_MODULE, merge_args, read_overrides, split_options

TARGETS = ["demo", "qwen3-coder-30b", "qwen3-next", "qwen3-next:fp8", "qwen3-next:awq", "glm-4.5-air"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    for var in ("VLLM_PLUGINS", "CUDA_VISIBLE_DEVICES", "LVLLM_API_KEY", "LVLLM_METRICS_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("machine_name", list(pm.ALL))
@pytest.mark.parametrize("target_name", TARGETS)
def test_dry_run_argv_and_env(tmp_path, machine_name, target_name):
    mf = machine_file(tmp_path, machine_name)
    r = run_cli("serve", target_name, "--machine", mf, "--dry-run", "--json")
    plan = build_plan(pm.ALL[machine_name](), resolve(target_name))
    if not plan.has_gpu:
        assert r.exit_code == 1 and "no NVIDIA GPU found" in r.stderr
        return
    if not plan.fits:
        assert r.exit_code == 1 and "does not fit" in r.stderr
        assert "suggestion:" in r.stderr
        return
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["argv"] == [sys.executable, "-m", VLLM_MODULE, "serve", plan.model, *plan.vllm_args, "--host", "127.0.0.1", "--port", "8000"]
    metrics = os.path.join(os.environ["XDG_RUNTIME_DIR"], "lvllm", "port-8000")
    assert out["env"] == {**plan.env, "LVLLM_METRICS_DIR": metrics}
    assert out["url"] == "http://127.0.0.1:8000" and out["model_name"] == plan.model
    assert out["plan"]["tp"] == plan.tp and out["plan"]["gpu_layers"] == plan.gpu_layers
    # the human form prints the same command, ready to paste
    r2 = run_cli("serve", target_name, "--machine", mf, "--dry-run")
    assert r2.exit_code == 0
    assert f"LVLLM_GPU_LAYERS={plan.env['LVLLM_GPU_LAYERS']}" in r2.stdout
    assert f"-m {VLLM_MODULE} serve {plan.model}" in r2.stdout


def test_extra_vllm_args_pass_through_and_win(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--json", "--", "--max-model-len", "8k", "--tool-call-parser=qwen3_xml", "--enforce-eager")
    assert r.exit_code == 0, r.output
    argv = json.loads(r.stdout)["argv"]
    assert argv.count("--max-model-len") == 1 and argv[-4:] == ["--max-model-len", "8k", "--tool-call-parser=qwen3_xml", "--enforce-eager"]
    assert not any(a.startswith("--tool-call-parser") for a in argv[:-3])
    # the plan was made for the user's context (8k = 8000 tokens): more room for GPU layers than at 32768
    planned = json.loads(r.stdout)["plan"]
    assert planned["max_model_len"] == 8000
    default = build_plan(pm.desktop(), resolve("qwen3-next:awq"))
    assert len(planned["gpu_layers"]) > len(default.gpu_layers)
    # vLLM options without `--` pass through as well, in order
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--json", "--enforce-eager", "--tool-call-parser", "qwen3_xml")
    argv = json.loads(r.stdout)["argv"]
    assert argv[-3:] == ["--enforce-eager", "--tool-call-parser", "qwen3_xml"] and argv.count("--tool-call-parser") == 1


def test_tp_override_after_dashes_replans_the_cpu_sets(tmp_path):
    from dataclasses import replace

    from lvllm_cli.machine import GpuInfo

    m = pm.xeon_snc()
    gib = 1 << 30
    m = replace(m, gpus=[GpuInfo(index=0, numa_node=0, memory_total_bytes=48 * gib), GpuInfo(index=1, numa_node=2, memory_total_bytes=48 * gib)])
    mf = machine_file(tmp_path, "xeon_snc", m)
    r = run_cli("serve", "qwen3-next", "--machine", mf, "--dry-run", "--json", "--", "-tp", "2")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["plan"]["tp"] == 2 and out["plan"]["pp"] == 1
    assert "--tensor-parallel-size" not in out["argv"] and out["argv"][-2:] == ["-tp", "2"]
    assert out["env"]["LVLLM_RANK_NODES"] == "0-1|2-3"


def test_api_key_goes_to_the_environment_never_argv(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--json", "--api-key", "s3cret-token", "--host", "0.0.0.0")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert "s3cret-token" not in r.stdout and "s3cret-token" not in " ".join(out["argv"])
    assert out["env"]["VLLM_API_KEY"] == "***"
    assert "without --api-key" not in r.stderr
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--host", "0.0.0.0")
    assert "warning: binding 0.0.0.0 without --api-key" in r.stderr
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--host", "::1")
    assert "without --api-key" not in r.stderr
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--", "--host", "10.1.2.3")
    assert "warning: binding 10.1.2.3" in r.stderr
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--json", env={"LVLLM_API_KEY": "from-env"})
    assert json.loads(r.stdout)["env"]["VLLM_API_KEY"] == "***"


def test_user_plugin_filter_keeps_ours(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    r = run_cli("serve", "qwen3-next:awq", "--machine", mf, "--dry-run", "--json", env={"VLLM_PLUGINS": "gguf"})
    assert json.loads(r.stdout)["env"]["VLLM_PLUGINS"] == "gguf,lvllm_moe"


def test_demo_uses_the_generated_model_dir(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    r = run_cli("serve", "demo", "--machine", mf, "--dry-run", "--json")
    assert r.exit_code == 0 and "not generated yet" in r.stderr
    model_dir = write_model_config(tmp_path / "home" / "demo-qwen3-moe", num_hidden_layers=6)
    r = run_cli("serve", "demo", "--machine", mf, "--dry-run", "--json")
    assert r.exit_code == 0 and "not generated yet" not in r.stderr
    out = json.loads(r.stdout)
    assert out["argv"][4] == str(model_dir)
    assert out["env"]["LVLLM_GPU_LAYERS"] == "5" and out["env"]["LVLLM_MOE_CPU"] == "1"  # one GPU layer, the last
    assert "config.json" in out["plan"]["facts_source"]


def test_model_directory_without_profile(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    d = write_model_config(tmp_path / "Qwen3-30B-A3B", num_hidden_layers=48, hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_attention_heads=32, max_position_embeddings=40960)
    for opts in ([], ["--max-model-len", "4096"]):
        from lvllm_cli.plan import Request

        plan = build_plan(pm.desktop(), resolve(str(d)), Request(max_model_len=4096 if opts else None))
        r = run_cli("serve", d, "--machine", mf, "--dry-run", "--json", *opts, "--", "--load-format", "dummy")
        assert r.exit_code == (0 if plan.fits else 1), r.output
        if plan.fits:
            out = json.loads(r.stdout)
            assert out["argv"][4] == str(d) and out["argv"][-2:] == ["--load-format", "dummy"]
            assert out["argv"][out["argv"].index("--max-model-len") + 1] == str(plan.max_model_len)
    assert plan.fits  # at 4096 tokens the 30B model fits the 64 GiB desktop


def test_saved_plan_round_trip(tmp_path):
    mf = machine_file(tmp_path, "xeon_snc")
    saved = tmp_path / "plan.json"
    r = run_cli("tune", "glm-4.5-air", "--machine", mf, "--save", saved, "--json")
    assert r.exit_code == 0 and json.loads(saved.read_text()) == json.loads(r.stdout)
    direct = json.loads(run_cli("serve", "glm-4.5-air", "--machine", mf, "--dry-run", "--json").stdout)
    reused = json.loads(run_cli("serve", "--plan", saved, "--dry-run", "--json").stdout)
    assert reused["argv"] == direct["argv"] and reused["env"] == direct["env"]
    r = run_cli("serve", "--plan", saved, "--dry-run", "--max-model-len", "4096")
    assert r.exit_code == 2 and "--max-model-len plan(s) anew" in r.stderr
    r = run_cli("serve", "--plan", saved, "--dry-run", "--", "--tensor-parallel-size=2")
    assert r.exit_code == 0 and "re-run `lvllm tune`" in r.stderr
    # extras still win over a saved plan
    reused = json.loads(run_cli("serve", "--plan", saved, "--dry-run", "--json", "--port", "9001", "--", "--enforce-eager").stdout)
    assert reused["argv"][-5:] == ["--host", "127.0.0.1", "--port", "9001", "--enforce-eager"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not readable JSON"),
        ("[]", "expected a JSON object"),
        ('{"version": 1}', "missing 'model'"),
    ],
)
def test_bad_plan_files(tmp_path, content, message):
    f = tmp_path / "p.json"
    f.write_text(content)
    r = run_cli("serve", "--plan", f, "--dry-run")
    assert r.exit_code == 2 and message in r.stderr
    r = run_cli("serve", "--plan", tmp_path / "missing.json", "--dry-run")
    assert r.exit_code == 2 and "not found" in r.stderr


def test_bad_input_messages_and_exit_codes(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    r = run_cli("serve", "qwen4", "--machine", mf, "--dry-run")
    assert r.exit_code == 2 and "unknown profile 'qwen4'" in r.stderr and "qwen3-coder-30b" in r.stderr
    r = run_cli("serve", "./no/such/dir", "--machine", mf, "--dry-run")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    dense = write_model_config(tmp_path / "dense")
    cfg = json.loads((dense / "config.json").read_text())
    del cfg["num_experts"]
    (dense / "config.json").write_text(json.dumps(cfg))
    r = run_cli("serve", dense, "--machine", mf, "--dry-run")
    assert r.exit_code == 2 and "no MoE fields" in r.stderr
    r = run_cli("serve", "demo", "--machine", mf, "--json")
    assert r.exit_code == 2 and "--json only goes with --dry-run" in r.stderr
    r = run_cli("serve", "--machine", mf, "--dry-run")
    assert r.exit_code == 2 and "give a profile name" in r.stderr
    r = run_cli("serve", "demo", "--plan", mf, "--dry-run")
    assert r.exit_code == 2 and "not both" in r.stderr
    r = run_cli("serve", "demo", "--machine", tmp_path / "nope.json", "--dry-run")
    assert r.exit_code == 2 and "machine file" in r.stderr and "not found" in r.stderr
    r = run_cli("serve", "demo", "--machine", mf, "--dry-run", "--", "--max-model-len", "lots")
    assert r.exit_code == 2 and "--max-model-len 'lots'" in r.stderr
    r = run_cli("serve", "demo", "--machine", mf, "--dry-run", "--", "--model", "x")
    assert r.exit_code == 2 and "first argument" in r.stderr
    r = run_cli("serve", "demo", "--machine", mf, "--dry-run", "--gpu-layers", "many")
    assert r.exit_code == 2 and "--gpu-layers 'many'" in r.stderr


def test_vllm_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    write_model_config(tmp_path / "home" / "demo-qwen3-moe")
    r = run_cli("serve", "demo", "--machine", machine_file(tmp_path, "desktop"))
    assert r.exit_code == 1 and "vLLM is not installed" in r.stderr and "pip install 'lvllm[vllm]'" in r.stderr


def test_option_helpers():
    assert split_options(["--a", "1", "--b", "--c=2", "x", "-tp", "2", "--max_model_len", "5"]) == [
        ("a", ["1"]), ("b", []), ("c", ["2", "x"]), ("tensor-parallel-size", ["2"]), ("max-model-len", ["5"])
    ]  # fmt: skip
    assert merge_args(["--max-model-len", "100", "--port", "1"], ["--max_model_len=5"]) == ["--port", "1", "--max_model_len=5"]
    ov = read_overrides(["--max-model-len", "32K", "--kv-cache-dtype", "fp8_e4m3", "--gpu-memory-utilization", "0.5", "--served-model-name", "x"])
    assert ov.max_model_len == 32768 and ov.kv_cache_dtype_bytes == 1 and ov.gpu_memory_utilization == 0.5 and ov.served_model_name == "x"
    assert read_overrides(["--max-model-len", "auto"]).max_model_len is None
