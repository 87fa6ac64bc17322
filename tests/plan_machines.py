"""The four fixture machines of the doctor issue, for the planner tests.

`desktop()`, `xeon_snc()`, `epyc_nps4()`, `avx2_vm()` (and `ALL`) return what
`lvllm_cli.probe.probe()` reads from the /proc and /sys trees that
tests/fixtures/sysfs.py generates in the kernel's own formats: the plan tests
stand on machines read from kernel files, exactly as on a user's box.

`HAND` states the same machines directly as dataclasses: the facts the
planner uses, written from the fixtures' descriptions (MachineSpec) without
the probe. tests/test_plan_machines.py checks that the probe finds exactly
these facts and that both give the same plans.

CPU numbering follows Linux on real boxes: first every core's first thread,
socket by socket, then all the SMT siblings in the same order.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile

from fixtures import sysfs

from lvllm_cli.machine import CpuInfo, GpuInfo, LogicalCpu, Machine, MemoryInfo, NumaNode

GiB = 1 << 30
MiB = 1 << 20

# ---- probed from generated kernel files --------------------------------------------------------

_probed: dict[str, Machine] = {}
_scratch: list[str] = []


def probed(name: str) -> Machine:
    """probe(sysroot=<generated tree of `name`>), a fresh copy per call (tests change machines).

    Each tree is written and probed once per test process."""
    if name not in _probed:
        from lvllm_cli.probe import probe

        if not _scratch:
            _scratch.append(tempfile.mkdtemp(prefix="lvllm-fixture-machines-"))
            atexit.register(shutil.rmtree, _scratch[0], True)
        root = sysfs.MACHINES[name][1](f"{_scratch[0]}/{name}")
        _probed[name] = probe(sysroot=root)
    return copy.deepcopy(_probed[name])


def desktop() -> Machine:
    """i7-10700K: 1 socket, 8 cores / 16 threads, no NUMA directory, 64 GiB; RTX 4090 24 GiB reporting no node."""
    return probed("desktop")


def xeon_snc() -> Machine:
    """2 x 28-core Xeon, SMT, SNC2 (4 nodes of 128 GiB), AMX; H100 80 GiB on nodes 0 and 2."""
    return probed("xeon_snc")


def epyc_nps4() -> Machine:
    """2 x 96-core EPYC 9654, SMT, NPS4 (8 nodes of 96 GiB), AVX512-BF16 without AMX; RTX 6000 Ada 48 GiB on nodes 1 and 5."""
    return probed("epyc_nps4")


def avx2_vm() -> Machine:
    """4 vCPUs, no SMT, one node, 16 GiB, AVX2 only, no GPU."""
    return probed("avx2_vm")


ALL = {"desktop": desktop, "xeon_snc": xeon_snc, "epyc_nps4": epyc_nps4, "avx2_vm": avx2_vm}


# ---- the same machines, stated by hand -----------------------------------------------------------


def _available(total_bytes: int) -> int:
    """The fixtures' /proc/meminfo: MemAvailable = MemFree (90 %) + 5 % of MemTotal, in whole kB."""
    kib = total_bytes // 1024
    return (kib * 9 // 10 + kib // 20) * 1024


def _machine(
    *,
    vendor: str,
    sockets: int,
    cores_per_socket: int,
    smt: bool,
    nodes_per_socket: int,
    node_ram: int,
    remote_distance: int,
    flags: list[str],
    gpus: list[tuple[int | None, int]],  # (numa node or None when the kernel says -1, memory bytes)
    model: str,
    core_id_stride: int = 1,
) -> Machine:
    physical = sockets * cores_per_socket
    tpc = 2 if smt else 1
    cores_per_node = cores_per_socket // nodes_per_socket
    online: list[LogicalCpu] = []
    for t in range(tpc):
        for p in range(physical):
            sock, core = divmod(p, cores_per_socket)
            node = sock * nodes_per_socket + core // cores_per_node
            siblings = [p + k * physical for k in range(tpc)]
            online.append(LogicalCpu(id=t * physical + p, core_id=core * core_id_stride, package_id=sock, node=node, siblings=siblings))
    online.sort(key=lambda c: c.id)
    n_nodes = sockets * nodes_per_socket
    total = node_ram * n_nodes
    numa = []
    for n in range(n_nodes):
        same = lambda a, b: a // nodes_per_socket == b // nodes_per_socket  # noqa: E731
        numa.append(NumaNode(
            id=n,
            cpus=sorted(c.id for c in online if c.node == n),
            mem_total_bytes=node_ram,
            # one node without a node directory: the machine's MemAvailable; else the node's MemFree (90 %)
            mem_free_bytes=_available(total) if n_nodes == 1 else node_ram // 1024 * 9 // 10 * 1024,
            distances=[10 if m == n else (12 if same(m, n) else remote_distance) for m in range(n_nodes)],
        ))  # fmt: skip
    gpu_list = [
        GpuInfo(index=i, name=f"NVIDIA test GPU {mem // GiB}GB", numa_node=node, memory_total_bytes=mem,
                memory_free_bytes=mem - 512 * MiB, source="nvml")
        for i, (node, mem) in enumerate(gpus)
    ]
    return Machine(
        cpu=CpuInfo(vendor=vendor, model=model, flags=flags, sockets=sockets, physical_cores=physical,
                    logical_cpus=physical * tpc, threads_per_core=tpc, online=online),
        numa=numa,
        memory=MemoryInfo(total_bytes=total, available_bytes=_available(total)),
        gpus=gpu_list,
    )


AVX2 = ["avx", "avx2", "fma", "f16c"]


def hand_desktop() -> Machine:
    return _machine(vendor="GenuineIntel", sockets=1, cores_per_socket=8, smt=True, nodes_per_socket=1, node_ram=64 * GiB,
                    remote_distance=0, flags=AVX2, gpus=[(None, 24 * GiB)], model="desktop")


def hand_xeon_snc() -> Machine:
    flags = AVX2 + ["avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8"]
    return _machine(vendor="GenuineIntel", sockets=2, cores_per_socket=28, smt=True, nodes_per_socket=2, node_ram=128 * GiB,
                    remote_distance=21, flags=flags, gpus=[(0, 80 * GiB), (2, 80 * GiB)], model="xeon", core_id_stride=2)


def hand_epyc_nps4() -> Machine:
    flags = AVX2 + ["avx512f", "avx512bw", "avx512vl", "avx512_bf16"]
    return _machine(vendor="AuthenticAMD", sockets=2, cores_per_socket=96, smt=True, nodes_per_socket=4, node_ram=96 * GiB,
                    remote_distance=32, flags=flags, gpus=[(1, 48 * GiB), (5, 48 * GiB)], model="epyc")


def hand_avx2_vm() -> Machine:
    return _machine(vendor="GenuineIntel", sockets=1, cores_per_socket=4, smt=False, nodes_per_socket=1, node_ram=16 * GiB,
                    remote_distance=0, flags=AVX2, gpus=[], model="vm")


HAND = {"desktop": hand_desktop, "xeon_snc": hand_xeon_snc, "epyc_nps4": hand_epyc_nps4, "avx2_vm": hand_avx2_vm}
