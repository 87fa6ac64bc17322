"""The CPU-expert engine's own figures: one small Prometheus text file per vLLM worker.

vLLM runs the model in worker processes that have no HTTP endpoint of their
own, and its /metrics only knows vLLM's metrics. So the plugin writes, in
each worker, `<dir>/lk_moe-<pid>.prom` (rewritten atomically about once a
second, also when idle) and the monitor sums the files of a local server.

Both sides import this module, so the directory rule and the names live in
one place:

counters  lvllm_moe_cpu_tokens_total   tokens through CPU-resident expert layers (per layer call)
          lvllm_moe_gpu_tokens_total   tokens through GPU-resident expert layers (per layer call)
          lvllm_moe_cpu_seconds_total  wall time the CPU engine spent computing
          lvllm_moe_calls_total        CPU engine calls (one per CPU layer per step)
gauge     lvllm_moe_threads            threads of the CPU engine
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lvllm_cli.atomic import write_atomically
from lvllm_cli.monitor import stats
from lvllm_cli.monitor.metrics import Scrape, parse_exposition

ENV_DIR = "LVLLM_METRICS_DIR"
PREFIX = "lvllm_moe_"
CPU_TOKENS = ("lvllm_moe_cpu_tokens_total",)
GPU_TOKENS = ("lvllm_moe_gpu_tokens_total",)
CPU_SECONDS = ("lvllm_moe_cpu_seconds_total",)
CALLS = ("lvllm_moe_calls_total",)
THREADS = ("lvllm_moe_threads",)

STALE_S = 15.0  # a file not rewritten for this long belongs to a worker that is gone
MAX_FILE_BYTES = 1 << 20


def metrics_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the plugin writes and the monitor reads: $LVLLM_METRICS_DIR, else
    $XDG_RUNTIME_DIR/lvllm, else /tmp/lvllm-<uid>.

    `lvllm serve` sets LVLLM_METRICS_DIR for vLLM explicitly, because a server
    started from a service or over ssh may not share the desktop's XDG_RUNTIME_DIR.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_DIR):
        return Path(env[ENV_DIR])
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lvllm"
    return Path("/tmp") / f"lvllm-{os.getuid()}"


def server_metrics_dir(port: int, environ: Mapping[str, str] | None = None) -> Path:
    """The directory `lvllm serve` gives the plugin of the server on `port`: $LVLLM_METRICS_DIR
    as set, else `port-<port>` under the default directory, so that two servers on one machine
    keep their figures apart and `lvllm monitor URL` finds them from the URL alone."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DIR):
        return Path(env[ENV_DIR])
    return metrics_dir(env) / f"port-{int(port)}"


def candidate_dirs(environ: Mapping[str, str] | None = None, port: int | None = None) -> list[Path]:
    """Directories the monitor looks in: the explicit one alone, else (for a local server on
    `port`) the per-server directories `lvllm serve` uses, then the defaults themselves (a
    plugin in a vLLM started without lvllm serve writes there)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DIR):
        return [Path(env[ENV_DIR])]
    bases = [metrics_dir(env)]
    fallback = Path("/tmp") / f"lvllm-{os.getuid()}"
    if fallback not in bases:
        bases.append(fallback)
    per_server = [b / f"port-{int(port)}" for b in bases] if port else []
    return per_server + bases


def remove_dead_workers(directory: Path) -> int:
    """Delete the files of workers whose process is gone (a server killed hard on this port
    before): pid-named files of live processes are left alone. The number removed."""
    removed = 0
    try:
        entries = list(Path(directory).glob("lk_moe-*.prom"))
    except OSError:
        return 0
    for path in entries:
        pid = path.stem.removeprefix("lk_moe-")
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_dir(path: Path) -> Path:
    """Create the directory private to this user (0700) and refuse one that is not ours.

    /tmp is shared: another user could create /tmp/lvllm-<uid> first and read
    or forge our figures. Raises PermissionError saying what to do.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a plain directory; remove it or set {ENV_DIR} to a directory of yours")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to you; remove it or set {ENV_DIR} to a directory of yours")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def file_path(directory: Path, pid: int | None = None) -> Path:
    return Path(directory) / f"lk_moe-{os.getpid() if pid is None else pid}.prom"


def format_metrics(cpu_tokens: float, gpu_tokens: float, cpu_seconds: float, calls: float, threads: float) -> str:
    """The exposition text of one worker (what the plugin writes; no prometheus_client needed)."""
    rows = [
        ("lvllm_moe_cpu_tokens_total", "counter", "Tokens through CPU-resident expert layers, per layer call.", cpu_tokens),
        ("lvllm_moe_gpu_tokens_total", "counter", "Tokens through GPU-resident expert layers, per layer call.", gpu_tokens),
        ("lvllm_moe_cpu_seconds_total", "counter", "Wall time the CPU expert engine spent.", cpu_seconds),
        ("lvllm_moe_calls_total", "counter", "CPU expert engine calls.", calls),
        ("lvllm_moe_threads", "gauge", "Threads of the CPU expert engine.", threads),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {float(value)!r}"]
    return "\n".join(out) + "\n"


def write_metrics_file(directory: Path, text: str, pid: int | None = None) -> Path:
    """Atomically replace this worker's file: readers see the old or the new text, never half
    (the temporary file is hidden and not *.prom, so readers skip it)."""
    return write_atomically(file_path(directory, pid), text, mode=0o600)


def remove_metrics_file(directory: Path, pid: int | None = None) -> None:
    try:
        os.unlink(file_path(directory, pid))
    except OSError:
        pass


@dataclass
class EngineRead:
    """What one look at the directory found. `scrape` labels each series with worker=<file stem>."""

    status: str  # "ok", "absent" (no dir / no files), "stale", "unsafe"
    note: str
    directory: Path | None = None
    scrape: Scrape | None = None
    workers: int = 0


NOT_ACTIVE = "no CPU-expert figures (plugin not active)"


def read_dir(directory: Path, t: float, now: float | None = None, stale_s: float = STALE_S) -> EngineRead:
    """Read and merge every fresh *.prom file of one directory. Never raises."""
    now = time.time() if now is None else now
    directory = Path(directory)
    try:
        st = os.lstat(directory)
    except OSError:
        return EngineRead("absent", NOT_ACTIVE, directory)
    if not stat.S_ISDIR(st.st_mode):
        return EngineRead("absent", NOT_ACTIVE, directory)
    if st.st_uid != os.getuid():
        return EngineRead("unsafe", f"ignored {directory}: it belongs to another user", directory)
    merged = Scrape(t=t)
    fresh = stale = 0
    newest_mtime = 0.0
    try:
        entries = sorted(p for p in directory.iterdir() if p.name.endswith(".prom") and not p.name.startswith("."))
    except OSError as exc:
        return EngineRead("absent", f"cannot list {directory}: {exc.strerror or exc}", directory)
    for path in entries:
        try:
            fst = os.lstat(path)
            if not stat.S_ISREG(fst.st_mode) or fst.st_uid != os.getuid() or fst.st_size > MAX_FILE_BYTES:
                continue
            newest_mtime = max(newest_mtime, fst.st_mtime)
            if now - fst.st_mtime > stale_s:
                stale += 1
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_FILE_BYTES)
        except OSError:
            continue  # vanished between listing and reading: the worker exited
        one = parse_exposition(text, t)
        worker = ("worker", path.stem)
        for name, series in one.series.items():
            if not name.startswith(PREFIX):
                continue
            dest = merged.series.setdefault(name, {})
            for labels, v in series.items():
                dest[tuple(sorted(labels + (worker,)))] = v
        merged.bad_lines += one.bad_lines
        fresh += 1
    if fresh:
        return EngineRead("ok", "", directory, merged, fresh)
    if stale:
        return EngineRead("stale", f"CPU-expert figures stale: no update for {now - newest_mtime:.0f} s (server stopped?)", directory)
    return EngineRead("absent", NOT_ACTIVE, directory)


def read_first(dirs: Sequence[Path], t: float, now: float | None = None) -> EngineRead:
    """The first directory that has figures; else the most telling non-result."""
    results = [read_dir(d, t, now) for d in dirs]
    for status in ("ok", "stale", "unsafe"):
        for r in results:
            if r.status == status:
                return r
    return results[0] if results else EngineRead("absent", NOT_ACTIVE)


@dataclass
class EngineFigures:
    workers: int = 0
    threads: float | None = None
    calls_per_s: float | None = None
    cpu_s_per_call: float | None = None  # CPU engine time per call: the CPU's share of a step, per layer
    cpu_busy: float | None = None  # CPU-engine seconds per wall second (may exceed 1 with several workers)
    cpu_tokens_per_s: float | None = None
    gpu_tokens_per_s: float | None = None
    cpu_token_share: float | None = None  # 0..1 of expert-layer tokens that went through the CPU


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def engine_figures(history: Sequence[Scrape], workers: int, rate_window_s: float) -> EngineFigures:
    fig = EngineFigures(workers=workers)
    if not history:
        return fig
    fig.threads = stats.gauge_sum(history[-1], THREADS, {})
    recent = stats.window(history, rate_window_s)
    if len(recent) < 2 or recent[-1].t <= recent[0].t:
        return fig
    dt = recent[-1].t - recent[0].t
    inc = {key: stats.increase(recent, names, {}) for key, names in
           (("cpu_tok", CPU_TOKENS), ("gpu_tok", GPU_TOKENS), ("cpu_s", CPU_SECONDS), ("calls", CALLS))}
    per_s = {k: (v / dt if v is not None else None) for k, v in inc.items()}
    fig.calls_per_s = per_s["calls"]
    fig.cpu_busy = per_s["cpu_s"]
    fig.cpu_tokens_per_s = per_s["cpu_tok"]
    fig.gpu_tokens_per_s = per_s["gpu_tok"]
    fig.cpu_s_per_call = _ratio(inc["cpu_s"], inc["calls"])
    both = None if inc["cpu_tok"] is None or inc["gpu_tok"] is None else inc["cpu_tok"] + inc["gpu_tok"]
    fig.cpu_token_share = _ratio(inc["cpu_tok"], both)
    return fig
