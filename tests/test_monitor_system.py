"""CPU per NUMA node (from generated sysfs/procfs trees), vLLM's CPU share (a real busy child),
process recognition, NVML absence."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from lvllm_cli.monitor import system


def _fixture_tree(root, nodes: dict[int, list[int]], mem: dict[int, tuple[int, int]]):
    for n, cpus in nodes.items():
        d = root / f"sys/devices/system/node/node{n}"
        d.mkdir(parents=True)
        # write as ranges where possible, like the kernel
        parts, run = [], [cpus[0]]
        for c in cpus[1:]:
            if c == run[-1] + 1:
                run.append(c)
            else:
                parts.append(run)
                run = [c]
        parts.append(run)
        (d / "cpulist").write_text(",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts) + "\n")
        total, free = mem[n]
        (d / "meminfo").write_text(f"Node {n} MemTotal:  {total} kB\nNode {n} MemFree:   {free} kB\nNode {n} MemUsed: {total - free} kB\n")
    (root / "sys/devices/system/node/online").write_text("0-1\n")  # not a node directory


def _proc_stat(root, per_cpu: dict[int, list[int]]):
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for c, vals in sorted(per_cpu.items()):
        lines.append(f"cpu{c} " + " ".join(map(str, vals)))
    lines += ["intr 1 2 3", "ctxt 99"]
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/stat").write_text("\n".join(lines) + "\n")


def test_node_utilisation_from_generated_trees(tmp_path):
    rng = random.Random(11)
    # two nodes, interleaved CPU ids and one CPU offline (3): ids, not positions, must map to nodes
    nodes = {0: [0, 2, 4, 6], 1: [1, 5, 7]}
    _fixture_tree(tmp_path, nodes, {0: (64 << 20, 16 << 20), 1: (64 << 20, 60 << 20)})
    assert system.numa_cpus(tmp_path) == nodes
    assert system.node_meminfo(tmp_path) == {0: ((64 << 20) * 1024, (16 << 20) * 1024), 1: ((64 << 20) * 1024, (60 << 20) * 1024)}
    cpus = [0, 1, 2, 4, 5, 6, 7]
    before = {c: [rng.randint(0, 10**6) for _ in range(10)] for c in cpus}
    deltas = {c: [rng.randint(0, 1000) for _ in range(10)] for c in cpus}
    after = {c: [a + d for a, d in zip(before[c], deltas[c])] for c in cpus}
    _proc_stat(tmp_path, before)
    prev = system.read_proc_stat(tmp_path)
    _proc_stat(tmp_path, after)
    cur = system.read_proc_stat(tmp_path)
    got = system.node_utilisation(prev, cur, nodes)
    for n, ids in nodes.items():
        # busy = user nice system irq softirq steal; idle = idle + iowait; guest is inside user
        busy = sum(sum(deltas[c][i] for i in (0, 1, 2, 5, 6, 7)) for c in ids if c in deltas)
        total = busy + sum(deltas[c][3] + deltas[c][4] for c in ids if c in deltas)
        assert got[n] == pytest.approx(busy / total)
    assert system.node_utilisation(cur, cur, nodes) == {0: None, 1: None}


def test_unreadable_node_files_are_left_out(tmp_path):
    _fixture_tree(tmp_path, {0: [0, 1], 1: [2, 3]}, {0: (1 << 20, 1 << 19), 1: (1 << 20, 1 << 18)})
    (tmp_path / "sys/devices/system/node/node1/cpulist").write_text("2-x\n")
    (tmp_path / "sys/devices/system/node/node0/meminfo").write_text("garbage\n")
    assert system.numa_cpus(tmp_path) == {0: [0, 1]}
    assert system.node_meminfo(tmp_path) == {1: ((1 << 20) * 1024, (1 << 18) * 1024)}


def test_no_numa_info_means_one_node(tmp_path):
    assert system.numa_cpus(tmp_path, cpus=[0, 1, 2]) == {0: [0, 1, 2]}
    assert system.node_meminfo(tmp_path) == {}
    assert system.read_proc_stat(tmp_path) == {}


@pytest.mark.parametrize("name,cmdline,expected", [
    ("vllm", ["/usr/bin/python3", "/venv/bin/vllm", "serve", "m"], True),
    ("python3", ["/usr/bin/python3", "/venv/bin/vllm", "serve"], True),
    ("VLLM::EngineCor", ["VLLM::EngineCore"], True),
    ("python", ["python", "-m", "vllm.entrypoints.openai.api_server"], True),
    ("lvllm", ["/venv/bin/lvllm", "monitor"], False),
    ("python3", ["python3", "my_vllm_notes.py"], False),
    ("bash", [], False),
])
def test_is_vllm_process(name, cmdline, expected):
    assert system.is_vllm_process(name, cmdline) is expected


def test_vllm_share_counts_the_server_tree():
    # A stand-in server whose child burns CPU: the share must be clearly above zero.
    code = "import subprocess,sys; p=subprocess.Popen([sys.executable,'-c','import time\\nt=time.time()\\nwhile time.time()-t<20: pass']); p.wait()"
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        sampler = system.SystemSampler(server_pid=server.pid, gpus=False)
        time.sleep(0.3)
        sampler._procs = None  # the child may not have existed at the first look
        sampler.sample_processes()
        time.sleep(0.6)
        fig = sampler.sample()
        ncpu = sum(len(c) for c in sampler.nodes.values())
        assert fig.vllm_processes == 2
        assert fig.vllm_cpu_share is not None and fig.vllm_cpu_share > 0.1 / ncpu
        assert 0 <= fig.cpu_util <= 1 and fig.ram_total_bytes > fig.ram_used_bytes > 0
    finally:
        for p in system.find_vllm_processes(server.pid):
            try:
                p.kill()
            except Exception:
                pass
        server.wait(5)


def test_gpu_reader_without_driver_is_quiet():
    reader = system.GpuReader()
    gpus = reader.read()
    assert isinstance(gpus, list)
    if not gpus:
        assert reader.note or os.path.exists("/dev/nvidiactl")
    reader.close()


def test_server_found_by_its_listening_port(tmp_path):
    code = ("import socket,subprocess,sys,time\n"
            "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1)\n"
            "c=subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)'])\n"
            "print(s.getsockname()[1], flush=True); time.sleep(30)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        sampler = system.SystemSampler(port=port, gpus=False)
        assert sampler.sample().vllm_processes == 2  # the listener and its child
    finally:
        for p in system.find_vllm_processes(server.pid):
            p.kill()
        server.wait(5)
