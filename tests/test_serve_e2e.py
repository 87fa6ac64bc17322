"""`lvllm serve` for real, with a stand-in vLLM package (tests/fake_vllm.py) first on PYTHONPATH.

The stand-in is a real HTTP server in a real process; it records the argv and
environment it was started with, so these tests see exactly what vLLM would.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cli_helpers import machine_file, write_model_config
from serve_helpers import alive, fake_vllm, free_port, start_lvllm  # noqa: F401 (fake_vllm is a fixture)


def test_serve_model_dir_end_to_end(tmp_path, fake_vllm):
    model = write_model_config(tmp_path / "Qwen3-30B-A3B", num_hidden_layers=8)
    port = free_port()
    run = start_lvllm(tmp_path, fake_vllm, ["serve", model, "--machine", machine_file(tmp_path, "desktop"), "--port", port, "--api-key", "k3y", "--gpu-layers", "2", "--", "--load-format", "dummy"])
    curl = run.read_until("curl ")
    assert f"ready: http://127.0.0.1:{port}/v1" in "".join(run.seen)
    assert f"http://127.0.0.1:{port}/v1/completions" in curl and "Authorization: Bearer k3y" in curl and str(model) in curl
    rec = json.loads((tmp_path / "record.json").read_text())
    argv, env = rec["argv"], rec["env"]
    assert argv[:2] == ["serve", str(model)] and argv[-2:] == ["--load-format", "dummy"]
    assert argv[argv.index("--port") + 1] == str(port) and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "k3y" not in argv and env["VLLM_API_KEY"] == "k3y"
    assert env["LVLLM_MOE_CPU"] == "1" and env["LVLLM_GPU_LAYERS"] == "6-7" and env["LK_CPUS"] == "1-7" and env["LK_THREADS"] == "7" and env["OMP_NUM_THREADS"] == "1"
    assert env["LVLLM_EXPERTS_BF16"] == "0"  # a bf16 checkpoint: nothing to widen
    metrics = tmp_path / "run" / "lvllm" / f"port-{port}"  # $XDG_RUNTIME_DIR/lvllm/port-<port>
    assert env["LVLLM_METRICS_DIR"] == str(metrics)
    assert metrics.is_dir() and (metrics.stat().st_mode & 0o777) == 0o700
    assert rec["pgid"] == rec["pid"]  # its own process group
    run.proc.send_signal(signal.SIGINT)
    rest = run.finish()
    assert run.proc.returncode == 0, rest
    assert "lvllm: stopped" in rest and not alive(rec["pid"])
    log = tmp_path / "home" / "logs" / f"server-{port}.log"  # everything vLLM printed, kept after it exits
    assert f"log: {log}" in "".join(run.seen) and "fake vllm: serving on" in log.read_text() and "shutting down" in log.read_text()


def test_serve_demo_with_pregenerated_model(tmp_path, fake_vllm):
    demo = write_model_config(tmp_path / "home" / "demo-qwen3-moe", num_hidden_layers=4)
    port = free_port()
    run = start_lvllm(tmp_path, fake_vllm, ["serve", "demo", "--machine", machine_file(tmp_path, "desktop"), "--port", port])
    run.read_until("curl ")
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["argv"][1] == str(demo) and rec["env"]["LVLLM_GPU_LAYERS"] == "3" and rec["env"]["LVLLM_MOE_CPU"] == "1"
    run.proc.send_signal(signal.SIGTERM)
    run.finish()
    assert run.proc.returncode == 0 and not alive(rec["pid"])


def test_serve_widens_quantized_experts_per_the_plan(tmp_path, fake_vllm):
    """The plan's experts-format choice reaches vLLM's environment; --experts-format wins over the value the
    user exported (which alone would have been taken as the request)."""
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    model = write_model_config(tmp_path / "m", num_hidden_layers=4, quantization_config=fp8)
    run = start_lvllm(tmp_path, fake_vllm, ["serve", model, "--machine", machine_file(tmp_path, "desktop"), "--port", free_port(),
                                            "--gpu-layers", "0", "--prompt-ratio", "8", "--experts-format", "auto"],
                      LVLLM_EXPERTS_BF16="0")
    run.read_until("curl ")
    rec = json.loads((tmp_path / "record.json").read_text())
    # desktop: 64 GiB holds the widened experts easily; at 8 prompt tokens per generated token bf16 saves
    # 21 % of the engine time by the known fp8 ratios (8/128 x 11321.3 + 791.3 vs 8/128 x 23205.4 + 443.1)
    assert rec["env"]["LVLLM_EXPERTS_BF16"] == "1" and rec["env"]["LVLLM_GPU_LAYERS"] == ""
    run.proc.send_signal(signal.SIGINT)
    run.finish()
    assert run.proc.returncode == 0


def test_server_crash_gives_exit_code_log_tail_and_hint(tmp_path, fake_vllm):
    model = write_model_config(tmp_path / "m")
    run = start_lvllm(tmp_path, fake_vllm, ["serve", model, "--machine", machine_file(tmp_path, "desktop"), "--port", free_port()], FAKE_HEALTH_DELAY=100, FAKE_CRASH_AFTER=1.0)
    out = run.finish()
    assert run.proc.returncode == 3, out
    assert "vLLM exited with code 3" in out and "| RuntimeError: CUDA out of memory" in out
    assert "hint: the GPU ran out of memory" in out


def test_unsupported_vllm_version_warns(tmp_path, fake_vllm):
    (fake_vllm / "vllm-0.26.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.40.1\n")
    model = write_model_config(tmp_path / "m")
    run = start_lvllm(tmp_path, fake_vllm, ["serve", model, "--machine", machine_file(tmp_path, "desktop"), "--port", free_port()])
    run.read_until("curl ")
    assert "vLLM 0.40.1 is outside the supported range >=0.26,<0.34" in "".join(run.seen)
    run.proc.send_signal(signal.SIGINT)
    run.finish()
    assert run.proc.returncode == 0


def test_lvllm_monitor_finds_the_engine_figures_of_a_served_model(tmp_path, fake_vllm):
    """serve gives the plugin a directory the monitor finds from the URL alone; stale files of a
    dead server on the same port are cleared at start."""
    model = write_model_config(tmp_path / "m", num_hidden_layers=8)
    port = free_port()
    metrics = tmp_path / "run" / "lvllm" / f"port-{port}"
    metrics.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (metrics / f"lk_moe-{dead.pid}.prom").write_text("lvllm_moe_threads 99\n")
    run = start_lvllm(tmp_path, fake_vllm, ["serve", model, "--machine", machine_file(tmp_path, "desktop"), "--port", port])
    run.read_until("curl ")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    env.pop("LVLLM_METRICS_DIR", None)
    try:
        mon = subprocess.run([sys.executable, "-m", "lvllm_cli", "monitor", "--once", "--json", "--interval", "1.2", f"http://127.0.0.1:{port}"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    finally:
        run.proc.send_signal(signal.SIGINT)
        run.finish()
    assert mon.returncode == 0, mon.stderr
    snap = json.loads(mon.stdout)
    assert snap["moe"] is not None, snap["moe_note"]
    assert snap["moe"]["workers"] == 1 and snap["moe"]["threads"] == 7  # LK_THREADS of the desktop plan, not the dead 99
    assert snap["moe"]["calls_per_s"] > 0 and snap["generation_tokens_per_s"] > 0
    assert not (metrics / f"lk_moe-{dead.pid}.prom").exists()


def test_metrics_dir_of_another_user_is_refused_before_start(tmp_path, fake_vllm):
    model = write_model_config(tmp_path / "m")
    port = free_port()
    (tmp_path / "run" / "lvllm").mkdir(parents=True)
    (tmp_path / "run" / "lvllm" / f"port-{port}").symlink_to(tmp_path)  # not a plain directory of ours
    run = start_lvllm(tmp_path, fake_vllm, ["serve", model, "--machine", machine_file(tmp_path, "desktop"), "--port", port])
    out = run.finish()
    assert run.proc.returncode == 1 and "CPU-expert figures directory" in out and "LVLLM_METRICS_DIR" in out
    assert not (tmp_path / "record.json").exists()  # vLLM never started


def test_serve_demo_writes_the_demo_model_then_serves_it(tmp_path, fake_vllm):
    """The first `lvllm serve demo`: a real tiny Qwen3-MoE written by tiny_models (torch + transformers),
    planned from its own config.json."""
    port = free_port()
    run = start_lvllm(tmp_path, fake_vllm, ["serve", "demo", "--machine", machine_file(tmp_path, "desktop"), "--port", port])
    run.read_until("curl ", timeout=120)
    demo = tmp_path / "home" / "demo-qwen3-moe"
    cfg = json.loads((demo / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and (demo / "model.safetensors").stat().st_size > 0 and (demo / "tokenizer.json").is_file()
    assert [p.name for p in demo.parent.iterdir() if p.name.startswith(".demo")] == []  # no scratch left
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["argv"][1] == str(demo)
    assert rec["env"]["LVLLM_GPU_LAYERS"] == str(cfg["num_hidden_layers"] - 1) and rec["env"]["LVLLM_MOE_CPU"] == "1"
    run.proc.send_signal(signal.SIGINT)
    run.finish()
    assert run.proc.returncode == 0
