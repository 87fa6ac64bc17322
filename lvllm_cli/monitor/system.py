"""This machine's side of the picture: CPU per NUMA node, vLLM's share of it, RAM, GPUs.

Only meaningful when the server runs here; the poller asks for it only then.
CPU figures come from /proc/stat deltas (indexed by real CPU id, so offline
CPUs cannot shift the node mapping); vLLM's share from its processes' CPU
times; GPUs from NVML when the driver is there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def _nodes(sysroot: str | os.PathLike):
    """The NUMA nodes as the probe reads them (one reader of the kernel's node files for doctor,
    tune and the monitor); [] when sysfs has no node directory."""
    from lvllm_cli.probe.numa import read_numa
    from lvllm_cli.probe.sysfs import SysReader

    return read_numa(SysReader(str(sysroot)))


def numa_cpus(sysroot: str | os.PathLike = "/", cpus: Sequence[int] | None = None) -> dict[int, list[int]]:
    """NUMA node -> its CPU ids from sysfs; one node 0 with all `cpus` when sysfs has no node info."""
    nodes = {n.id: n.cpus for n in _nodes(sysroot) if n.cpus}
    if not nodes:
        nodes = {0: list(cpus) if cpus is not None else list(range(os.cpu_count() or 1))}
    return dict(sorted(nodes.items()))


def node_meminfo(sysroot: str | os.PathLike = "/") -> dict[int, tuple[int, int]]:
    """NUMA node -> (total bytes, free bytes) from sysfs; empty when unavailable."""
    return {n.id: (n.mem_total_bytes, n.mem_free_bytes) for n in sorted(_nodes(sysroot), key=lambda n: n.id) if n.mem_total_bytes}


def read_proc_stat(sysroot: str | os.PathLike = "/") -> dict[int, tuple[int, int]]:
    """CPU id -> (busy jiffies, total jiffies) from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    try:
        text = (Path(sysroot) / "proc/stat").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        parts = line.split()
        try:
            cpu = int(parts[0][3:])
            # user nice system idle iowait irq softirq steal (guest time is already inside user)
            vals = [int(x) for x in parts[1:9]]
        except (ValueError, IndexError):
            continue
        vals += [0] * (8 - len(vals))
        total = sum(vals)
        idle = vals[3] + vals[4]
        out[cpu] = (total - idle, total)
    return out


def node_utilisation(prev: Mapping[int, tuple[int, int]], cur: Mapping[int, tuple[int, int]],
                     nodes: Mapping[int, Sequence[int]]) -> dict[int, float | None]:
    """Busy fraction (0..1) of each node between two /proc/stat readings; None when no time passed."""
    out: dict[int, float | None] = {}
    for node, cpus in nodes.items():
        busy = total = 0
        for c in cpus:
            if c in prev and c in cur:
                db = cur[c][0] - prev[c][0]
                dt = cur[c][1] - prev[c][1]
                if dt > 0 and db >= 0:
                    busy += db
                    total += dt
        out[node] = busy / total if total > 0 else None
    return out


@dataclass
class GpuSample:
    index: int
    name: str
    util: float | None = None  # 0..1
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


class GpuReader:
    """NVML, initialised once; returns [] forever when there is no driver."""

    def __init__(self) -> None:
        self._nvml = None
        self.note = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no driver, no library, no GPU: all mean "no GPU figures"
            self.note = f"no GPU figures (NVML: {type(exc).__name__})"

    def read(self) -> list[GpuSample]:
        nv = self._nvml
        if nv is None:
            return []
        out = []
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception:
            return []
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                s = GpuSample(i, name.decode() if isinstance(name, bytes) else str(name))
            except Exception:
                continue
            for attr, fn in (("util", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                             ("mem", lambda: nv.nvmlDeviceGetMemoryInfo(h)),
                             ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
                             ("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)):
                try:
                    val = fn()
                except Exception:
                    continue
                if attr == "mem":
                    s.mem_used_bytes, s.mem_total_bytes = int(val.used), int(val.total)
                else:
                    setattr(s, attr, val)
            out.append(s)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def is_vllm_process(name: str, cmdline: Sequence[str]) -> bool:
    """Looks like a vLLM process: `vllm serve`, `python -m vllm.entrypoints...`, or one of the
    processes vLLM retitles "VLLM::EngineCore", "VLLM::Worker_TP0" ... (not `lvllm` itself)."""
    if name.lower() == "vllm" or name.startswith("VLLM"):
        return True
    for arg in cmdline[:3]:
        base = os.path.basename(arg)
        if base == "vllm" or base.startswith("VLLM::") or arg.startswith("vllm.entrypoints"):
            return True
    return False


def listening_pid(port: int) -> int | None:
    """The pid of our own process listening on this TCP port, if the kernel tells us."""
    import psutil

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    except (psutil.Error, OSError):
        pass
    return None


def find_vllm_processes(root_pid: int | None = None) -> list:
    """The server's processes: `root_pid` and all its descendants (vLLM's engine core and
    workers are children of the API server); without it, every process that looks like vLLM.
    Never ourselves (a monitor started from the server's process would count itself)."""
    import psutil

    me = os.getpid()
    if root_pid is not None:
        try:
            p = psutil.Process(root_pid)
            return [q for q in [p, *p.children(recursive=True)] if q.pid != me]
        except psutil.Error:
            pass
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.pid != me and is_vllm_process(p.info.get("name") or "", p.info.get("cmdline") or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


@dataclass
class SystemFigures:
    node_util: dict[int, float | None] = field(default_factory=dict)  # NUMA node -> busy fraction
    node_mem: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (total, free) bytes
    cpu_util: float | None = None  # whole machine, 0..1
    vllm_cpu_share: float | None = None  # of the whole machine's CPU time, 0..1
    vllm_processes: int = 0
    ram_total_bytes: int = 0
    ram_used_bytes: int = 0
    gpus: list[GpuSample] = field(default_factory=list)
    gpu_note: str = ""


class SystemSampler:
    """Keeps the previous readings so each call returns figures for the time since the last one."""

    PROCESS_REFRESH_S = 5.0

    def __init__(self, server_pid: int | None = None, port: int | None = None, sysroot: str = "/", gpus: bool = True) -> None:
        self.server_pid = server_pid
        self.port = port
        self.sysroot = sysroot
        self.nodes = numa_cpus(sysroot)
        self._prev_stat = read_proc_stat(sysroot)
        self._proc_times: dict[int, float] = {}
        self._procs: list | None = None
        self._listener: int | None = None
        self._procs_at = 0.0
        self._prev_wall: float | None = None
        self._gpu = GpuReader() if gpus else None
        self.sample_processes()  # prime per-process times

    def sample_processes(self) -> tuple[float | None, int]:
        """Share of all CPUs that vLLM's processes used since the previous call."""
        import time

        import psutil

        now = time.monotonic()
        # Finding the processes walks all of /proc; the set changes rarely, so refresh it every few seconds.
        if self._procs is None or now - self._procs_at > self.PROCESS_REFRESH_S:
            root = self.server_pid
            if root is None and self.port:
                # who listens on the URL's port: asked again only when that process is gone
                if self._listener is None or not psutil.pid_exists(self._listener):
                    self._listener = listening_pid(self.port)
                root = self._listener
            self._procs = find_vllm_processes(root)
            self._procs_at = now
        procs = self._procs
        times: dict[int, float] = {}
        used = 0.0
        for p in procs:
            try:
                ct = p.cpu_times()
                t = ct.user + ct.system
            except psutil.Error:
                continue
            times[p.pid] = t
            if p.pid in self._proc_times and t >= self._proc_times[p.pid]:
                used += t - self._proc_times[p.pid]
        share = None
        if self._prev_wall is not None and now > self._prev_wall:
            ncpu = sum(len(c) for c in self.nodes.values()) or (os.cpu_count() or 1)
            share = min(1.0, used / ((now - self._prev_wall) * ncpu)) if times else 0.0
        self._proc_times = times
        self._prev_wall = now
        return share, len(times)

    def sample(self) -> SystemFigures:
        import psutil

        fig = SystemFigures()
        cur = read_proc_stat(self.sysroot)
        fig.node_util = node_utilisation(self._prev_stat, cur, self.nodes)
        whole = node_utilisation(self._prev_stat, cur, {0: sorted(cur)})
        fig.cpu_util = whole[0]
        self._prev_stat = cur
        fig.node_mem = node_meminfo(self.sysroot)
        fig.vllm_cpu_share, fig.vllm_processes = self.sample_processes()
        vm = psutil.virtual_memory()
        fig.ram_total_bytes, fig.ram_used_bytes = int(vm.total), int(vm.total - vm.available)
        if self._gpu is not None:
            fig.gpus = self._gpu.read()
            fig.gpu_note = self._gpu.note
        return fig

    def close(self) -> None:
        if self._gpu is not None:
            self._gpu.close()
