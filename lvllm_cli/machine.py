"""What the machine is: plain data, built by `lvllm_cli.probe`, read by doctor, plan and serve.

Everything here is a dataclass of plain values so it can be written as JSON,
captured in a bug report and rebuilt from a fixture tree in tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LogicalCpu:
    id: int
    core_id: int  # physical core id within its package
    package_id: int  # socket
    node: int  # NUMA node
    siblings: list[int] = field(default_factory=list)  # SMT siblings incl. itself


@dataclass
class CpuInfo:
    vendor: str = ""
    model: str = ""
    flags: list[str] = field(default_factory=list)  # only the flags that matter to lvllm
    sockets: int = 1
    physical_cores: int = 0
    logical_cpus: int = 0
    threads_per_core: int = 1
    l3_bytes: int = 0  # total over all sockets
    governors: dict[str, int] = field(default_factory=dict)  # cpufreq governor -> online CPUs using it; {} when not exposed
    online: list[LogicalCpu] = field(default_factory=list)

    def has(self, flag: str) -> bool:
        return flag in self.flags


@dataclass
class NumaNode:
    id: int
    cpus: list[int] = field(default_factory=list)
    mem_total_bytes: int = 0
    mem_free_bytes: int = 0
    distances: list[int] = field(default_factory=list)


@dataclass
class MemoryInfo:
    total_bytes: int = 0
    available_bytes: int = 0
    thp_enabled: str = ""  # always / madvise / never ("" when unknown)
    thp_defrag: str = ""
    numa_balancing: int | None = None
    hugepages_total: int = 0
    hugepages_free: int = 0
    hugepage_size_bytes: int = 0
    shm_bytes: int | None = None  # size of /dev/shm


@dataclass
class GpuInfo:
    index: int
    name: str = ""
    pci_bus_id: str = ""  # domain:bus:device.function, lower case, e.g. 0000:17:00.0
    numa_node: int | None = None  # None when the kernel reports -1 / unknown
    memory_total_bytes: int = 0
    memory_free_bytes: int | None = None
    compute_capability: str | None = None  # e.g. "9.0"
    driver: str | None = None
    cuda_driver_version: str | None = None  # e.g. "13.0"
    pcie_gen_current: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_current: int | None = None
    pcie_width_max: int | None = None
    source: str = "sysfs"  # "nvml" or "sysfs"
    pstate: int | None = None  # NVML performance state: 0 = full speed, >= 8 idle (idle GPUs lower their PCIe link)


@dataclass
class Machine:
    cpu: CpuInfo = field(default_factory=CpuInfo)
    numa: list[NumaNode] = field(default_factory=list)
    memory: MemoryInfo = field(default_factory=MemoryInfo)
    gpus: list[GpuInfo] = field(default_factory=list)
    sysroot: str = "/"
    # Files that were missing or malformed, as (path, what went wrong); doctor turns them into findings.
    read_problems: list[tuple[str, str]] = field(default_factory=list)
    # Why NVML gave no GPU list (None when it answered); doctor tells "no driver" from "no GPU" with it.
    nvml_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def node_of_cpu(self, cpu: int) -> int:
        for node in self.numa:
            if cpu in node.cpus:
                return node.id
        return 0

    def physical_cpus(self, node: int | None = None) -> list[int]:
        """One logical CPU per physical core (the lowest-numbered sibling), optionally of one node."""
        seen: set[tuple[int, int]] = set()
        out: list[int] = []
        for c in sorted(self.cpu.online, key=lambda c: c.id):
            if node is not None and c.node != node:
                continue
            key = (c.package_id, c.core_id)
            if key in seen:
                continue
            seen.add(key)
            out.append(c.id)
        return out
