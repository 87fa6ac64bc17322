"""NUMA nodes: their CPUs, memory and distances.  No node directory means one node."""

from __future__ import annotations

from lvllm_cli.machine import NumaNode
from lvllm_cli.probe import formats
from lvllm_cli.probe.sysfs import SysReader

NODE_DIR = "/sys/devices/system/node"


def read_numa(r: SysReader) -> list[NumaNode]:
    """Nodes with CPUs or memory; [] when the kernel has no NUMA directory (caller fills one node)."""
    nodes: list[NumaNode] = []
    for name in r.listdir(NODE_DIR, r"node\d+"):
        base = f"{NODE_DIR}/{name}"
        node = NumaNode(id=int(name[4:]))
        node.cpus = r.parse(f"{base}/cpulist", formats.cpulist, default=[]) or []
        mem = r.parse(f"{base}/meminfo", formats.meminfo, default={}) or {}
        node.mem_total_bytes = mem.get("MemTotal", 0)
        node.mem_free_bytes = mem.get("MemFree", 0)
        node.distances = r.parse(f"{base}/distance", formats.distances, default=[]) or []
        nodes.append(node)
    return nodes


def single_node(cpus: list[int], mem_total: int, mem_free: int) -> NumaNode:
    return NumaNode(id=0, cpus=list(cpus), mem_total_bytes=mem_total, mem_free_bytes=mem_free, distances=[10])
