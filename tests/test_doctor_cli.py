"""`lvllm doctor` as a user runs it: a real subprocess, on this machine and on generated trees."""

import json
import os
import subprocess
import sys

import psutil
import pytest

from fixtures.sysfs import AVX2_VM, DESKTOP, EPYC_NPS4, FLAGS_SSE_ONLY, replace, write_tree


def lvllm(*args, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "LVLLM_SYSROOT"}
    env.update(env_extra or {})
    env["COLUMNS"] = "200"
    # cwd away from the source tree: `-m` puts the cwd on sys.path
    return subprocess.run([sys.executable, "-m", "lvllm_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


def test_json_on_this_machine(tmp_path):
    p = lvllm("doctor", "--json", cwd=tmp_path)
    assert "Traceback" not in p.stderr
    doc = json.loads(p.stdout)
    statuses = [f["status"] for f in doc["findings"]]
    assert p.returncode == (1 if "fail" in statuses else 0)
    assert doc["verdict"] == ("fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok")
    cpu = doc["cpu"]
    # against independent views of the same machine
    assert cpu["logical_cpus"] == psutil.cpu_count(logical=True)
    assert cpu["physical_cores"] == psutil.cpu_count(logical=False)
    assert isinstance(cpu["model"], str) and cpu["model"]
    assert isinstance(cpu["flags"], list) and cpu["sockets"] >= 1
    assert doc["memory"]["total_bytes"] == psutil.virtual_memory().total
    node_cpus = sorted(c for n in doc["numa"]["nodes"] for c in n["cpus"])
    assert node_cpus == sorted(c["id"] for c in cpu["online"])
    assert set(os.sched_getaffinity(0)) <= set(node_cpus)
    for node in doc["numa"]["nodes"]:
        assert {"id", "cpus", "mem_total_bytes"} <= set(node)
    assert isinstance(doc["gpus"], list)
    for g in doc["gpus"]:
        assert {"name", "pci_bus_id", "numa_node", "memory_total_bytes"} <= set(g)
    for f in doc["findings"]:
        assert set(f) == {"check", "status", "evidence", "fix"}
    # the engine's own answer, asked independently
    from lvllm_cli import _lk_moe

    assert doc["kernel_variant"] == _lk_moe.best_isa()
    checks = {f["check"] for f in doc["findings"]}
    assert {"cpu isa", "engine", "numa", "memory", "gpus", "torch", "vllm", "libnuma", "libstdc++", "open files",
            "/dev/shm", "cpu governor", "transparent hugepages"} <= checks
    engine = next(f for f in doc["findings"] if f["check"] == "engine")
    assert engine["status"] == "ok"


def test_table_on_this_machine(tmp_path):
    p = lvllm("doctor", cwd=tmp_path)
    assert "Traceback" not in p.stderr
    for word in ("check", "status", "evidence", "fix", "cpu isa", "libstdc++"):
        assert word in p.stdout
    assert p.returncode in (0, 1)


def test_sysroot_fixture_json(tmp_path):
    root = write_tree(tmp_path / "epyc", EPYC_NPS4)
    p = lvllm("doctor", "--json", "--sysroot", root, cwd=tmp_path)
    doc = json.loads(p.stdout)
    assert p.returncode == 0
    assert doc["sysroot"] == root and doc["python"] is None
    assert (doc["cpu"]["sockets"], doc["cpu"]["physical_cores"], doc["cpu"]["logical_cpus"]) == (2, 192, 384)
    assert [n["id"] for n in doc["numa"]["nodes"]] == list(range(8))
    assert [g["numa_node"] for g in doc["gpus"]] == [1, 5]
    assert doc["kernel_variant"] == "avx512_bf16"


def test_sysroot_from_environment_variable(tmp_path):
    root = write_tree(tmp_path / "vm", AVX2_VM)
    p = lvllm("doctor", "--json", cwd=tmp_path, env_extra={"LVLLM_SYSROOT": root})
    doc = json.loads(p.stdout)
    assert doc["cpu"]["model"] == AVX2_VM.model and doc["cpu"]["logical_cpus"] == 4


def test_table_prints_evidence_verbatim(tmp_path):
    from fixtures.sysfs import XEON_SNC

    root = write_tree(tmp_path / "xeon", XEON_SNC)
    p = lvllm("doctor", "--sysroot", root, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    # ':ab:' is an emoji code and '[...]' looks like markup to rich: both must print as written
    assert "0000:ab:00.0" in p.stdout and "numa balancing" in p.stdout and "warn" in p.stdout


def test_fail_exits_1(tmp_path):
    root = write_tree(tmp_path / "old", replace(AVX2_VM, flags=FLAGS_SSE_ONLY))
    p = lvllm("doctor", "--sysroot", root, cwd=tmp_path)
    assert p.returncode == 1
    assert "fail" in p.stdout and "AVX2" in p.stdout


def test_capture_then_replay_archive(tmp_path):
    out = tmp_path / "report.tar.gz"
    p = lvllm("doctor", "--capture", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert out.exists() and "kernel files" in p.stdout
    live = json.loads(lvllm("doctor", "--json", cwd=tmp_path).stdout)
    replay = json.loads(lvllm("doctor", "--json", "--sysroot", str(out), cwd=tmp_path).stdout)
    for key in ("model", "flags", "sockets", "physical_cores", "logical_cpus", "l3_bytes", "online"):
        assert replay["cpu"][key] == live["cpu"][key]
    assert [(n["id"], n["cpus"]) for n in replay["numa"]["nodes"]] == [(n["id"], n["cpus"]) for n in live["numa"]["nodes"]]
    # MemTotal is read twice, moments apart: VMs with memory hot-plug or ballooning change it in between.
    for r, l in zip(replay["numa"]["nodes"], live["numa"]["nodes"]):
        assert r["mem_total_bytes"] == pytest.approx(l["mem_total_bytes"], rel=0.05)
    assert replay["memory"]["total_bytes"] == pytest.approx(live["memory"]["total_bytes"], rel=0.05)
    assert replay["kernel_variant"] in ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
    assert replay["python"] is None
    assert replay["sysroot"] == str(out)


def test_model_option(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 2048, "moe_intermediate_size": 768,
                                                   "num_experts": 64, "num_hidden_layers": 48}))
    root = write_tree(tmp_path / "desk", DESKTOP)  # 64 GiB: 27 GiB of experts fit
    doc = json.loads(lvllm("doctor", "--json", "--sysroot", root, "--model", str(model), cwd=tmp_path).stdout)
    fit = next(f for f in doc["findings"] if f["check"] == "model fits in RAM")
    assert fit["status"] == "ok" and doc["model"]["expert_bytes"] == 48 * 64 * 3 * 2048 * 768 * 2
    small = write_tree(tmp_path / "vm", AVX2_VM)  # 16 GiB: they do not
    p = lvllm("doctor", "--json", "--sysroot", small, "--model", str(model), cwd=tmp_path)
    fit = next(f for f in json.loads(p.stdout)["findings"] if f["check"] == "model fits in RAM")
    assert fit["status"] == "fail" and p.returncode == 1


@pytest.mark.parametrize("args,needle", [
    (["--sysroot", "/nonexistent/dir"], "--sysroot"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--capture", "/nonexistent/dir/x.tar.gz"], "--capture"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, args, needle):
    p = lvllm("doctor", *args, cwd=tmp_path)
    assert p.returncode == 2
    assert needle in p.stderr and "fix:" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_engine_import_failure_is_a_finding(tmp_path):
    # A real loader failure: a copy of the installed package whose engine file is not an ELF object.
    import shutil

    import lvllm_cli
    from lvllm_cli import _lk_moe

    pkg = tmp_path / "site" / "lvllm_cli"
    shutil.copytree(os.path.dirname(lvllm_cli.__file__), pkg)
    (pkg / os.path.basename(_lk_moe.__file__)).write_bytes(b"this is not a shared object")
    p = lvllm("doctor", "--json", cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path / "site")})
    assert "Traceback" not in p.stderr
    doc = json.loads(p.stdout)
    findings = {f["check"]: f for f in doc["findings"]}
    assert p.returncode == 1
    assert findings["engine"]["status"] == "fail"
    assert "ImportError" in findings["engine"]["evidence"] and "lvllm build" in findings["engine"]["fix"]
    assert doc["python"]["native"]["path"].startswith(str(pkg))
    # the variant falls back to the CPU flags
    assert "from the CPU flags" in findings["cpu isa"]["evidence"]


def test_help_is_instant_and_lists_doctor(tmp_path):
    p = lvllm("--help", cwd=tmp_path)
    assert p.returncode == 0 and "doctor" in p.stdout
    # heavy modules stay out of `lvllm --help`
    code = ("import sys; from lvllm_cli import cli; "
            "print(sorted(m for m in ('pynvml','rich.table','torch','lvllm_cli.probe','lvllm_cli.doctor') "
            "if m in sys.modules))")
    q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert q.stdout.strip() == "[]"


FAKE_NVML_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "fake_nvml")


def test_live_nvml_path_with_a_stand_in_library(tmp_path):
    # No GPU on CI: a stand-in nvidia-ml-py answers like a driver with one H100 would.
    fake = {"driver": "570.86.15", "cuda": 12080, "gpus": [
        {"name": "NVIDIA H100 80GB HBM3", "total": 80 << 30, "free": 79 << 30, "cc": [9, 0],
         "bus": "00000000:1B:00.0", "numa": None, "gen": 5, "gen_max": 5, "width": 8, "width_max": 16,
         "pstate": 0}]}
    p = lvllm("doctor", "--json", cwd=tmp_path,
              env_extra={"PYTHONPATH": FAKE_NVML_DIR, "FAKE_NVML": json.dumps(fake)})
    doc = json.loads(p.stdout)
    (g,) = doc["gpus"]
    assert (g["name"], g["pci_bus_id"], g["source"]) == ("NVIDIA H100 80GB HBM3", "0000:1b:00.0", "nvml")
    assert (g["memory_total_bytes"], g["compute_capability"], g["driver"], g["cuda_driver_version"]) == \
        (80 << 30, "9.0", "570.86.15", "12.8")
    assert g["numa_node"] is None  # not in NVML and not on this machine's PCI bus
    findings = {f["check"]: f for f in doc["findings"]}
    assert findings["gpus"]["status"] == "ok" and "driver 570.86.15, CUDA 12.8" in findings["gpus"]["evidence"]
    assert findings["gpu0 pcie"]["status"] == "warn" and "x8 of gen5 x16" in findings["gpu0 pcie"]["evidence"]
    # this machine's torch is a CPU build: with a GPU present that is a failure
    import importlib.metadata

    try:
        cuda_torch = "+cpu" not in importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        cuda_torch = None
    if cuda_torch is False:
        assert findings["torch"]["status"] == "fail" and p.returncode == 1


def test_nvml_error_is_reported(tmp_path):
    p = lvllm("doctor", "--json", cwd=tmp_path,
              env_extra={"PYTHONPATH": FAKE_NVML_DIR, "FAKE_NVML": json.dumps({"error": "Driver Not Loaded"})})
    doc = json.loads(p.stdout)
    assert doc["nvml_error"] == "NVML: Driver Not Loaded"
    gpus = next(f for f in doc["findings"] if f["check"] == "gpus")
    assert "Driver Not Loaded" in gpus["evidence"]


def test_lk_isa_cap_is_reported(tmp_path):
    from lvllm_cli import _lk_moe

    if _lk_moe.best_isa() in ("scalar", "avx2"):
        pytest.skip("this CPU has nothing above avx2 to cap")
    doc = json.loads(lvllm("doctor", "--json", cwd=tmp_path, env_extra={"LK_ISA": "avx2"}).stdout)
    isa = next(f for f in doc["findings"] if f["check"] == "cpu isa")
    assert doc["kernel_variant"] == "avx2"
    assert isa["status"] == "warn" and "LK_ISA=avx2" in isa["evidence"] and isa["fix"] == "unset LK_ISA"
