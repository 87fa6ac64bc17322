"""Which CPUs the engine's workers use, grouped by NUMA node.

Plain functions from (topology, settings) to groups, so every rule is
testable on any machine.  Settings come from API arguments or from the
environment the launcher sets:

  LK_THREADS=N          workers in total (default: one per physical core, minus LK_RESERVE)
  LK_RESERVE=N          cores left free for the threads that submit and wait (default 1): a
                        worker sharing its core with a spinning waiter stalls every barrier
  LK_CPUS=0-15,32-47    exactly these CPUs, one worker each (overrides the rest)
  LK_NODES=0,1          only the CPUs of these NUMA nodes
  LK_VIRTUAL_NODES=N    split the chosen CPUs into N groups as if they were
                        nodes (tests and benchmarks of the node split)
  LK_SMT=1              also use SMT siblings
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from lvllm_cli.machine import LogicalCpu
from lvllm_cli.ranges import parse_cpulist


@dataclass(frozen=True)
class Group:
    numa_node: int  # node whose memory holds this group's weights; -1: no binding
    cpus: tuple[int, ...]  # one worker per entry; -1: not pinned


@dataclass(frozen=True)
class Settings:
    threads: int | None = None
    cpus: tuple[int, ...] | None = None
    nodes: tuple[int, ...] | None = None
    virtual_nodes: int | None = None
    smt: bool = False
    reserve: int = 1


def settings_from_env(env: Mapping[str, str]) -> Settings:
    def _int(name: str) -> int | None:
        raw = env.get(name, "").strip()
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a whole number") from None
        if value < 1:
            raise ValueError(f"{name}={raw!r} must be at least 1")
        return value

    def _list(name: str) -> tuple[int, ...] | None:
        raw = env.get(name, "").strip()
        if not raw:
            return None
        try:
            return tuple(parse_cpulist(raw))
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r}: {exc}") from None

    reserve_raw = env.get("LK_RESERVE", "").strip()
    if reserve_raw and not (reserve_raw.isdigit()):
        raise ValueError(f"LK_RESERVE={reserve_raw!r} is not a whole number of cores")
    return Settings(
        reserve=int(reserve_raw) if reserve_raw else 1,
        threads=_int("LK_THREADS"),
        cpus=_list("LK_CPUS"),
        nodes=_list("LK_NODES"),
        virtual_nodes=_int("LK_VIRTUAL_NODES"),
        smt=env.get("LK_SMT", "0").strip() in ("1", "true", "yes"),
    )


def _physical(cpus: Sequence[LogicalCpu]) -> list[LogicalCpu]:
    seen: set[tuple[int, int]] = set()
    out = []
    for c in sorted(cpus, key=lambda c: c.id):
        key = (c.package_id, c.core_id)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _spread(by_node: dict[int, list[int]], threads: int) -> dict[int, list[int]]:
    """Take `threads` CPUs, as evenly as possible over the nodes (equal bytes per worker needs equal workers per node)."""
    nodes = sorted(by_node)
    taken: dict[int, list[int]] = {n: [] for n in nodes}
    i = 0
    while sum(len(v) for v in taken.values()) < threads:
        progressed = False
        for n in nodes:
            if len(taken[n]) < len(by_node[n]) and sum(len(v) for v in taken.values()) < threads:
                taken[n].append(by_node[n][len(taken[n])])
                progressed = True
        i += 1
        if not progressed:
            break
    return {n: v for n, v in taken.items() if v}


def plan_groups(topology: Sequence[LogicalCpu], allowed: set[int], s: Settings) -> list[Group]:
    node_of = {c.id: c.node for c in topology}
    if s.cpus is not None:
        unknown = [c for c in s.cpus if c not in node_of]
        if unknown:
            raise ValueError(f"LK_CPUS names CPUs this machine does not have online: {unknown}")
        by_node: dict[int, list[int]] = {}
        for c in s.cpus:
            by_node.setdefault(node_of[c], []).append(c)
    else:
        pool = [c for c in topology if c.id in allowed]
        if s.nodes is not None:
            missing = sorted(set(s.nodes) - {c.node for c in topology})
            if missing:
                raise ValueError(f"LK_NODES names NUMA nodes without CPUs here: {missing}")
            pool = [c for c in pool if c.node in s.nodes]
        if not s.smt:
            pool = _physical(pool)
        if not pool:
            raise ValueError("no usable CPUs: the CPU affinity and LK_NODES leave none")
        by_node = {}
        for c in sorted(pool, key=lambda c: (c.node, c.id)):
            by_node.setdefault(c.node, []).append(c.id)
        if s.threads is None and s.reserve > 0:
            # Leave the reserve on the first node (where the submitting thread usually runs); never go below one worker.
            first = min(by_node)
            keep = max(1, len(by_node[first]) - s.reserve) if len(by_node) == 1 else max(0, len(by_node[first]) - s.reserve)
            by_node[first] = by_node[first][:keep]
            by_node = {n: v for n, v in by_node.items() if v}
        if s.threads is not None:
            available = sum(len(v) for v in by_node.values())
            if s.threads <= available:
                by_node = _spread(by_node, s.threads)
            else:
                # More workers than cores: the extra ones run unpinned (slow, but tests on small boxes need it).
                extra = s.threads - available
                first = min(by_node)
                by_node[first] = by_node[first] + [-1] * extra

    if s.virtual_nodes is None:
        return [Group(n, tuple(cpus)) for n, cpus in sorted(by_node.items())]

    flat = [(n, c) for n in sorted(by_node) for c in by_node[n]]
    v = s.virtual_nodes
    if v > len(flat):
        raise ValueError(f"LK_VIRTUAL_NODES={v} needs at least {v} workers, but only {len(flat)} are planned")
    groups = []
    for g in range(v):
        part = flat[len(flat) * g // v : len(flat) * (g + 1) // v]
        nodes = {n for n, _ in part}
        groups.append(Group(nodes.pop() if len(nodes) == 1 else -1, tuple(c for _, c in part)))
    return groups


def local_topology(sysroot: str = "/") -> list[LogicalCpu]:
    from lvllm_cli.probe import probe

    return probe(sysroot=sysroot, use_nvml=False).cpu.online


def default_groups(env: Mapping[str, str] | None = None) -> list[Group]:
    env = os.environ if env is None else env
    return plan_groups(local_topology(), set(os.sched_getaffinity(0)), settings_from_env(env))
