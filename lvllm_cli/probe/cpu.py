"""CPU facts: vendor/model, the ISA flags lvllm cares about, topology, L3."""

from __future__ import annotations

from lvllm_cli.machine import CpuInfo, LogicalCpu
from lvllm_cli.probe import formats
from lvllm_cli.probe.sysfs import SysReader

# The flags that decide which kernels can run (and a few that explain why not),
# in a fixed order so that reports and captures compare cleanly.
RELEVANT_FLAGS = (
    "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)

CPU_DIR = "/sys/devices/system/cpu"


def read_cpu(r: SysReader, node_of: dict[int, int]) -> CpuInfo:
    info = CpuInfo()
    blocks = r.parse("/proc/cpuinfo", formats.cpuinfo, default=[]) or []
    if blocks:
        first = blocks[0]
        info.vendor = first.get("vendor_id") or first.get("CPU implementer", "")
        info.model = first.get("model name") or first.get("Model") or first.get("Processor", "")
        # Intersection over all processors: a flag missing on any CPU is not usable.
        flag_sets = [set(b.get("flags", b.get("Features", "")).split()) for b in blocks]
        common = set.intersection(*flag_sets) if flag_sets else set()
        info.flags = [f for f in RELEVANT_FLAGS if f in common]

    online = r.parse(f"{CPU_DIR}/online", formats.cpulist, default=None)
    if online is None:
        # Fall back to what cpuinfo lists so the rest of the report still means something.
        online = [int(b["processor"]) for b in blocks if b.get("processor", "").isdigit()]
    for cpu in online:
        topo = f"{CPU_DIR}/cpu{cpu}/topology"
        core = r.parse(f"{topo}/core_id", formats.integer, default=cpu)
        pkg = r.parse(f"{topo}/physical_package_id", formats.integer, default=0)
        sib = r.parse(f"{topo}/thread_siblings_list", formats.cpulist, default=None) or [cpu]
        info.online.append(LogicalCpu(id=cpu, core_id=core, package_id=pkg, node=node_of.get(cpu, 0), siblings=sib))

    info.logical_cpus = len(info.online)
    info.sockets = max(1, len({c.package_id for c in info.online}))
    info.physical_cores = len({(c.package_id, c.core_id) for c in info.online})
    if info.physical_cores:
        info.threads_per_core = max(1, round(info.logical_cpus / info.physical_cores))
    info.l3_bytes = _l3_bytes(r, [c.id for c in info.online])
    info.governors = _governors(r, [c.id for c in info.online])
    return info


def _governors(r: SysReader, cpus: list[int]) -> dict[str, int]:
    """cpufreq governor -> CPU count.  VMs and firmware-managed boxes expose no cpufreq: {}."""
    out: dict[str, int] = {}
    for cpu in cpus:
        text = r.text(f"{CPU_DIR}/cpu{cpu}/cpufreq/scaling_governor", required=False)
        if text is not None and text.strip():
            gov = text.strip()
            out[gov] = out.get(gov, 0) + 1
    return out


def _l3_bytes(r: SysReader, cpus: list[int]) -> int:
    """Sum of distinct L3 caches; each is counted once through its shared_cpu_list."""
    covered: set[int] = set()
    total = 0
    for cpu in cpus:
        if cpu in covered:
            continue
        base = f"{CPU_DIR}/cpu{cpu}/cache"
        for index in r.listdir(base, r"index\d+"):
            level = r.parse(f"{base}/{index}/level", formats.integer, required=False)
            if level != 3:
                continue
            size = r.parse(f"{base}/{index}/size", formats.cache_size, default=0)
            shared = r.parse(f"{base}/{index}/shared_cpu_list", formats.cpulist, default=None) or [cpu]
            total += size
            covered.update(shared)
            covered.add(cpu)
            break
    return total
