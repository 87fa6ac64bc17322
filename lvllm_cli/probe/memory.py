"""System memory, transparent hugepages, NUMA balancing, hugepages, /dev/shm."""

from __future__ import annotations

import os

from lvllm_cli.machine import MemoryInfo
from lvllm_cli.probe import formats
from lvllm_cli.probe.sysfs import SysReader

THP_DIR = "/sys/kernel/mm/transparent_hugepage"


def read_memory(r: SysReader, captured_shm: int | None) -> MemoryInfo:
    m = MemoryInfo()
    info = r.parse("/proc/meminfo", formats.meminfo, default={}) or {}
    m.total_bytes = info.get("MemTotal", 0)
    if "MemAvailable" in info:
        m.available_bytes = info["MemAvailable"]
    else:  # kernels before 3.14
        m.available_bytes = info.get("MemFree", 0) + info.get("Cached", 0)
    m.hugepages_total = info.get("HugePages_Total", 0)
    m.hugepages_free = info.get("HugePages_Free", 0)
    m.hugepage_size_bytes = info.get("Hugepagesize", 0)
    # THP and numa_balancing may legitimately be absent (kernel built without them).
    m.thp_enabled = r.parse(f"{THP_DIR}/enabled", formats.bracketed_choice, required=False, default="") or ""
    m.thp_defrag = r.parse(f"{THP_DIR}/defrag", formats.bracketed_choice, required=False, default="") or ""
    m.numa_balancing = r.parse("/proc/sys/kernel/numa_balancing", formats.integer, required=False)
    m.shm_bytes = _shm_bytes(r) if r.live else captured_shm
    return m


def _shm_bytes(r: SysReader) -> int | None:
    try:
        st = os.statvfs(r.real("/dev/shm"))
    except OSError:
        return None
    return st.f_blocks * st.f_frsize
