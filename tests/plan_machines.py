"""The four fixture machines of the doctor issue, as `Machine` values for the planner tests.

(The doctor's sysfs fixture generators will later produce the same machines
through `probe()`; these builders state the facts directly.)

CPU numbering follows Linux on real boxes: first every core's first thread,
socket by socket, then all the SMT siblings in the same order.
"""

from __future__ import annotations

from lvllm_cli.machine import CpuInfo, GpuInfo, LogicalCpu, Machine, MemoryInfo, NumaNode

GiB = 1 << 30


def _machine(
    *,
    sockets: int,
    cores_per_socket: int,
    smt: bool,
    nodes_per_socket: int,
    distances: list[list[int]],
    ram_bytes: int,
    flags: list[str],
    gpus: list[tuple[int, int]],  # (numa node, memory bytes)
    model: str,
    available_fraction: float = 0.94,
) -> Machine:
    physical = sockets * cores_per_socket
    tpc = 2 if smt else 1
    cores_per_node = cores_per_socket // nodes_per_socket
    online: list[LogicalCpu] = []
    for t in range(tpc):
        for p in range(physical):
            sock, core = divmod(p, cores_per_socket)
            node = sock * nodes_per_socket + core // cores_per_node
            cpu_id = t * physical + p
            siblings = [p + k * physical for k in range(tpc)]
            online.append(LogicalCpu(id=cpu_id, core_id=core, package_id=sock, node=node, siblings=siblings))
    n_nodes = sockets * nodes_per_socket
    numa = []
    for n in range(n_nodes):
        numa.append(
            NumaNode(
                id=n,
                cpus=sorted(c.id for c in online if c.node == n),
                mem_total_bytes=ram_bytes // n_nodes,
                mem_free_bytes=int(ram_bytes // n_nodes * available_fraction),
                distances=distances[n],
            )
        )
    gpu_list = [
        GpuInfo(
            index=i,
            name=f"NVIDIA test GPU {mem // GiB}GB",
            pci_bus_id=f"0000:{0x17 + 0x20 * i:02x}:00.0",
            numa_node=node,
            memory_total_bytes=mem,
            memory_free_bytes=mem - 512 * (1 << 20),
            compute_capability="8.9",
            source="nvml",
        )
        for i, (node, mem) in enumerate(gpus)
    ]
    return Machine(
        cpu=CpuInfo(
            vendor="GenuineIntel" if "Xeon" in model or "Core" in model else "AuthenticAMD",
            model=model,
            flags=flags,
            sockets=sockets,
            physical_cores=physical,
            logical_cpus=physical * tpc,
            threads_per_core=tpc,
            online=online,
        ),
        numa=numa,
        memory=MemoryInfo(total_bytes=ram_bytes, available_bytes=int(ram_bytes * available_fraction)),
        gpus=gpu_list,
    )


def desktop() -> Machine:
    """1 socket, 8 cores / 16 threads, 1 node, 64 GiB, one 24 GiB GPU; AVX2 + FMA + F16C, no AVX-512."""
    return _machine(
        sockets=1,
        cores_per_socket=8,
        smt=True,
        nodes_per_socket=1,
        distances=[[10]],
        ram_bytes=64 * GiB,
        flags=["avx", "avx2", "fma", "f16c"],
        gpus=[(0, 24 * GiB)],
        model="Intel(R) Core(TM) i7 desktop",
    )


def xeon_snc() -> Machine:
    """2 sockets x 28 cores, SMT, SNC2 (4 nodes), AMX, 512 GiB, two 48 GiB GPUs on nodes 0 and 2."""
    d = [[10, 12, 21, 21], [12, 10, 21, 21], [21, 21, 10, 12], [21, 21, 12, 10]]
    return _machine(
        sockets=2,
        cores_per_socket=28,
        smt=True,
        nodes_per_socket=2,
        distances=d,
        ram_bytes=512 * GiB,
        flags=["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"],
        gpus=[(0, 48 * GiB), (2, 48 * GiB)],
        model="Intel(R) Xeon(R) Platinum 8480+",
    )


def epyc_nps4() -> Machine:
    """2 sockets x 96 cores, SMT, NPS4 (8 nodes), AVX-512 BF16 without AMX, 1.5 TiB, two 96 GiB GPUs on nodes 1 and 5."""
    d = [[10 if a == b else (12 if a // 4 == b // 4 else 32) for b in range(8)] for a in range(8)]
    return _machine(
        sockets=2,
        cores_per_socket=96,
        smt=True,
        nodes_per_socket=4,
        distances=d,
        ram_bytes=1536 * GiB,
        flags=["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"],
        gpus=[(1, 96 * GiB), (5, 96 * GiB)],
        model="AMD EPYC 9654 96-Core Processor",
    )


def avx2_vm() -> Machine:
    """4 vCPUs (no SMT), 1 node, 16 GiB, no GPU; AVX2 + FMA only."""
    return _machine(
        sockets=1,
        cores_per_socket=4,
        smt=False,
        nodes_per_socket=1,
        distances=[[10]],
        ram_bytes=16 * GiB,
        flags=["avx", "avx2", "fma", "f16c"],
        gpus=[],
        model="AMD EPYC-Milan Processor (VM)",
    )


ALL = {"desktop": desktop, "xeon_snc": xeon_snc, "epyc_nps4": epyc_nps4, "avx2_vm": avx2_vm}
