"""`lvllm serve` for real, with a stand-in vLLM package (tests/fake_vllm.py) first on PYTHONPATH.

The stand-in is a real HTTP server in a real process; it records the argv and
environment it was started with, so these tests see exactly what vLLM would.
"""

import json
import signal
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
    assert env["LVLLM_METRICS_DIR"] == str(tmp_path / "home" / "metrics" / str(port))
    assert Path(env["LVLLM_METRICS_DIR"]).is_dir()
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
