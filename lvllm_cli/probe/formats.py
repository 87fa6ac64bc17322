"""Parsers for the kernel's own text formats, exactly as /proc and /sys write them.

Pure functions on strings.  Each raises ValueError with a short reason on input
the kernel would never write; the caller records that as a read problem.
"""

from __future__ import annotations

import re

from lvllm_cli.ranges import parse_cpulist

# PCIe transfer rate (GT/s) per generation, as the kernel prints it in
# current_link_speed / max_link_speed ("16.0 GT/s PCIe", older kernels "8 GT/s").
_GTS_TO_GEN = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}


def cpulist(text: str) -> list[int]:
    """'0-3,8-11' -> [0, 1, 2, 3, 8, 9, 10, 11]; '' (an empty node) -> [].

    The one cpulist parser is lvllm_cli.ranges (the planner writes the same
    form into LK_CPUS); it raises ValueError, which SysReader records as a
    read problem. The kernel prints cpulist files with plain ranges only
    (bitmap_print_to_pagebuf), so no other syntax is accepted here.
    """
    return parse_cpulist(text)


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo or /sys/devices/system/node/nodeN/meminfo -> {key: bytes or count}.

    'MemTotal:  123 kB' -> 125952 (bytes); 'HugePages_Total:  0' -> 0 (a count).
    The per-node file prefixes every line with 'Node N '; that prefix is dropped.
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*(?:Node\s+\d+\s+)?([A-Za-z0-9_()]+):\s+(\d+)(?:\s+(kB))?\s*", line)
        if not m:
            raise ValueError(f"not a meminfo line: {line[:60]!r}")
        value = int(m.group(2))
        out[m.group(1)] = value * 1024 if m.group(3) else value
    if not out:
        raise ValueError("empty meminfo")
    return out


def bracketed_choice(text: str) -> str:
    """'always [madvise] never' -> 'madvise' (THP enabled/defrag and similar sysfs knobs)."""
    m = re.search(r"\[([^\]\s]+)\]", text)
    if not m:
        raise ValueError(f"no [selected] value in {text.strip()[:60]!r}")
    return m.group(1)


def integer(text: str) -> int:
    """A single decimal integer, as in numa_node ('-1'), numa_balancing, core_id."""
    s = text.strip()
    if not re.fullmatch(r"-?\d+", s):
        raise ValueError(f"not an integer: {s[:40]!r}")
    return int(s)


def hex_id(text: str) -> int:
    """'0x10de' -> 0x10de (PCI vendor, device and class files)."""
    s = text.strip()
    if not re.fullmatch(r"0x[0-9a-fA-F]+", s):
        raise ValueError(f"not a hex id: {s[:40]!r}")
    return int(s, 16)


def pcie_gen(text: str) -> int | None:
    """'16.0 GT/s PCIe' -> 4.  'Unknown' (link down or not PCIe) -> None."""
    s = text.strip()
    if s.lower().startswith("unknown"):
        return None
    m = re.match(r"(\d+(?:\.\d+)?)\s*GT/s", s)
    if not m:
        raise ValueError(f"not a PCIe link speed: {s[:40]!r}")
    gts = float(m.group(1))
    if gts not in _GTS_TO_GEN:
        raise ValueError(f"unknown PCIe rate {gts} GT/s")
    return _GTS_TO_GEN[gts]


def link_width(text: str) -> int | None:
    """'16' -> 16.  The kernel writes 0 or 255 when the link is down/unknown -> None."""
    w = integer(text)
    return None if w <= 0 or w == 255 else w


def cache_size(text: str) -> int:
    """sysfs cache size '32768K' -> 33554432 bytes."""
    m = re.fullmatch(r"(\d+)\s*([KMG]?B?)", text.strip(), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a cache size: {text.strip()[:40]!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def distances(text: str) -> list[int]:
    """node distance row '10 21 21 10' -> [10, 21, 21, 10]."""
    parts = text.split()
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a distance row: {text.strip()[:60]!r}")
    return [int(p) for p in parts]


def cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo -> one {field: value} dict per processor block."""
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        if ":" not in line:
            raise ValueError(f"not a cpuinfo line: {line[:60]!r}")
        key, _, value = line.partition(":")
        cur[key.strip()] = value.strip()
    if cur:
        blocks.append(cur)
    if not blocks:
        raise ValueError("empty cpuinfo")
    return blocks


def normalize_bus_id(bus_id: str) -> str:
    """NVML's '00000000:17:00.0' and sysfs's '0000:17:00.0' -> '0000:17:00.0' (lower case)."""
    m = re.fullmatch(r"(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])", bus_id.strip())
    if not m:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain = int(m.group(1) or "0", 16)
    return f"{domain:04x}:{int(m.group(2), 16):02x}:{int(m.group(3), 16):02x}.{m.group(4)}"
