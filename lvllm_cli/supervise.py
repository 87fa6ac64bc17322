"""Run the vLLM server as a supervised child: logs, readiness, clean shutdown of the whole process group.

- The child starts in its own session (start_new_session=True), so it and every
  process it spawns (engine core, one worker per GPU) share one process group
  that we can signal as a unit, and a terminal Ctrl-C reaches only us.
- On Linux the child also gets PR_SET_PDEATHSIG=SIGTERM: if lvllm itself is
  killed with SIGKILL, the server is told to stop instead of holding VRAM.
- Output is passed through as it comes (progress bars keep working) and the
  last `keep_lines` lines are kept for the error report.
- Readiness: GET /health returns 200 (polled, proxies bypassed).
- SIGINT/SIGTERM/SIGHUP to lvllm are forwarded to the group; whatever is still
  alive after `grace` seconds gets SIGTERM, then SIGKILL (`stop_group`, the
  one stop sequence of lvllm: the monitor's PopenServer uses it too).  A
  second Ctrl-C kills at once.
- When the server dies on its own, the rest of its group is stopped too and
  the caller gets the last log lines and a hint.
- With `log_path`, everything the server prints is also appended to that
  file (0600): `lvllm serve --monitor` shows it in the dashboard's log pane,
  and it outlives the in-memory tail for a post-mortem.

The Supervisor is also a `lvllm_cli.monitor.server.ServerHandle` (pid,
log_path, is_running, exit_code, stop), so the dashboard can be attached to it.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _pdeathsig_preexec() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:  # runs in the child between fork and exec: no Python-level work
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


# ---- process groups -----------------------------------------------------------------------


def leads_group(proc: subprocess.Popen) -> bool:
    """Whether `proc` leads its own process group (started with start_new_session=True)."""
    try:
        return os.getpgid(proc.pid) == proc.pid
    except (ProcessLookupError, PermissionError, OSError):
        return False


def signal_group(proc: subprocess.Popen, sig: int, group: bool | None = None) -> None:
    """Signal the whole group `proc` leads (API server, engine core, workers), else `proc` alone."""
    if group is None:
        group = leads_group(proc)
    try:
        if group:
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(proc: subprocess.Popen, group: bool = True) -> bool:
    """Any process of the group left (the leader is reaped first, so its zombie does not count)."""
    proc.poll()
    if not group:
        return proc.returncode is None
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(
    proc: subprocess.Popen,
    sig: int = signal.SIGINT,
    timeout: float = 20.0,
    *,
    already_signalled: bool = False,
    kill_wait: float = 5.0,
) -> int | None:
    """Stop a server and everything it started; its exit code.  Safe to call twice.

    `sig` (SIGINT: vLLM's clean shutdown, as Ctrl-C) to the group, wait up to
    `timeout` seconds for *all* of it to exit (workers may outlive the API
    server), then SIGTERM (vLLM's workers ignore SIGINT but honour SIGTERM)
    for up to min(timeout, 5) seconds, then SIGKILL: nothing is left holding
    GPU memory.
    """
    # A leader that already exited (reaped or not) may have left workers in its group.
    group = leads_group(proc) or (proc.poll() is not None and _group_exists(proc.pid))

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while group_alive(proc, group):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    sequence = [(sig, timeout)]
    if sig not in (signal.SIGTERM, signal.SIGKILL):
        sequence.append((signal.SIGTERM, min(timeout, kill_wait)))
    if sig != signal.SIGKILL:
        sequence.append((signal.SIGKILL, kill_wait))
    for i, (step, budget) in enumerate(sequence):
        if i > 0 or not already_signalled:
            signal_group(proc, step, group)
        if wait(budget):
            break
    try:
        return proc.wait(timeout=kill_wait)
    except subprocess.TimeoutExpired:  # unkillable (D state): report it running rather than hang
        return None


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError, OSError):
        return False
    return True


@dataclass
class Outcome:
    status: str  # ready | died | timeout | stopped
    returncode: int | None = None


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None,
        health_url: str,
        *,
        keep_lines: int = 200,
        echo: Callable[[bytes], None] | None = None,
        poll_interval: float = 0.5,
        log_path: str | os.PathLike | None = None,
        grace: float = 20.0,
    ):
        self.argv = argv
        self.env = env
        self.health_url = health_url
        self.echo = echo
        self.poll_interval = poll_interval
        self.grace = grace
        self._log_path = Path(log_path) if log_path is not None else None
        self._log_file = None
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._lock = threading.Lock()
        self._partial = b""
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.started_at: float | None = None
        self.stop_requested = False  # stop() was called: the exit that follows is not a crash
        # Called (in the main thread, from the signal handler) when SIGINT/SIGTERM/SIGHUP asks
        # lvllm to stop: `serve --monitor` uses it to close the dashboard.
        self.on_stop_request: Callable[[], None] | None = None

    # ---- process ------------------------------------------------------------------

    def start(self) -> None:
        if self._log_path is not None:
            self._log_file = open_log(self._log_path)
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),
            close_fds=True,
        )
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="lvllm-log-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            if self._log_file is not None:
                try:
                    self._log_file.write(chunk)
                    self._log_file.flush()
                except OSError:  # a full disk must not stop the server or the log collection
                    self._log_file = None
            if self.echo is not None:
                try:
                    self.echo(chunk)
                except Exception:  # a closed terminal must not stop the log collection
                    self.echo = None
            self._collect(chunk)
        self._collect(b"\n")
        if self._log_file is not None:
            self._log_file.close()

    def _collect(self, chunk: bytes) -> None:
        data = self._partial + chunk
        parts = re.split(rb"\r\n|\r|\n", data)
        self._partial = parts.pop()
        with self._lock:
            for p in parts:
                line = _ANSI.sub("", p.decode("utf-8", "replace")).rstrip()
                if line:
                    self._lines.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    # ServerHandle (lvllm_cli.monitor.server) -----------------------------------------

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return self.poll()

    def group_alive(self) -> bool:
        return self.proc is not None and group_alive(self.proc)

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            signal_group(self.proc, sig, group=True)

    def stop(self, timeout: float | None = None, *, sig: int = signal.SIGINT, already_signalled: bool = False) -> int | None:
        """Stop the server's whole group (see stop_group); `timeout` defaults to the grace period."""
        if self.proc is None:
            return None
        self.stop_requested = True
        rc = stop_group(self.proc, sig, self.grace if timeout is None else timeout, already_signalled=already_signalled)
        if self._reader is not None:
            self._reader.join(timeout=2)
        return rc

    # ---- readiness -------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            with self._opener.open(self.health_url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float, should_stop: Callable[[], bool] = lambda: False) -> Outcome:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                return Outcome("died", rc)
            if should_stop():
                return Outcome("stopped")
            if self.healthy():
                return Outcome("ready")
            if time.monotonic() >= deadline:
                return Outcome("timeout")
            time.sleep(self.poll_interval)

    # ---- the whole foreground life --------------------------------------------------

    def run(
        self,
        *,
        ready_timeout: float,
        grace: float,
        say: Callable[[str], None],
        on_ready: Callable[[Supervisor], None] | None = None,
    ) -> int:
        """Start, wait for /health, stay until the server exits or we are told to stop; the exit code for lvllm.

        `on_ready` runs in the main thread once /health answers and may block (the
        dashboard does); if it called `stop()`, the server's exit counts as a requested stop.
        """
        self.grace = grace
        requested: list[int] = []
        forwarded: list[bool] = []

        def forward_sig() -> int:
            return signal.SIGINT if requested and requested[0] == signal.SIGINT else signal.SIGTERM

        def handler(signum, frame):  # noqa: ARG001
            if requested:  # second request: no more patience
                self.signal_group(signal.SIGKILL)
                return
            requested.append(signum)
            if self.proc is not None:
                self.signal_group(forward_sig())
                forwarded.append(True)
            if self.on_stop_request is not None:
                try:
                    self.on_stop_request()
                except Exception:  # noqa: BLE001 - the stop itself must go on
                    pass

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.start()
            say(f"started vLLM (pid {self.pid}); waiting for {self.health_url}")
            if self._log_path is not None:
                say(f"log: {self._log_path}")
            out = self.wait_ready(ready_timeout, should_stop=lambda: bool(requested))
            if out.status == "ready":
                assert self.started_at is not None
                say(f"ready after {time.monotonic() - self.started_at:.0f} s")
                if on_ready is not None:
                    on_ready(self)
                while self.proc.poll() is None and not requested and not self.stop_requested:
                    time.sleep(0.2)
                stopped = requested or self.stop_requested
                out = Outcome("stopped") if stopped else Outcome("died", self.proc.poll())
            if out.status == "stopped":
                if self.group_alive():
                    say(f"stopping vLLM (process group {self.pid}), up to {grace:.0f} s before SIGKILL")
                self.stop(grace, sig=forward_sig() if requested else signal.SIGINT, already_signalled=bool(forwarded))
                say("stopped")
                return 0
            if out.status == "timeout":
                say(f"vLLM did not answer {self.health_url} within {ready_timeout:.0f} s: stopping it")
                self.stop(grace)
                self._report(None, say, "it never became ready: raise --ready-timeout if loading is just slow")
                return 1
            # died on its own: take the rest of its group down too (workers holding VRAM)
            self.stop(min(grace, 5.0))
            self._report(out.returncode, say, hint_for(self.lines(), out.returncode))
            return exit_code_for(out.returncode)
        finally:
            if self.proc is not None and self.group_alive():
                self.stop(grace)
            for s, h in old.items():
                signal.signal(s, h)

    def _report(self, rc: int | None, say: Callable[[str], None], hint: str) -> None:
        what = "vLLM exited" if rc is None else f"vLLM exited with {describe_returncode(rc)}"
        tail = self.lines()[-30:]
        say(f"{what}. Last {len(tail)} log lines:")
        for line in tail:
            say(f"  | {line}")
        if self._log_path is not None:
            say(f"whole log: {self._log_path}")
        say(f"hint: {hint}")


def open_log(path: Path):
    """The server's log file, private to the user (prompts can end up in vLLM's log); truncated."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    return os.fdopen(fd, "wb")


def describe_returncode(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"code {rc}"


def exit_code_for(rc: int | None) -> int:
    if rc is None or rc == 0:
        return 1  # the server is not supposed to stop by itself
    return 128 - rc if rc < 0 else rc


_HINTS: list[tuple[str, str]] = [
    (r"CUDA out of memory|OutOfMemoryError|No available memory for the cache blocks|KV cache (memory|is) (is )?(not enough|insufficient)|larger than the available KV cache",
     "the GPU ran out of memory: lower --max-model-len, --max-num-seqs or --gpu-layers (`lvllm tune` shows the budget)"),
    (r"Address already in use|address already in use",
     "the port is taken: pick another with --port, or stop the other server"),
    (r"No module named '?vllm'?",
     "vLLM is not installed in this environment: pip install 'lvllm[vllm]'"),
    (r"Cannot allocate memory|MemoryError|std::bad_alloc",
     "the host ran out of RAM: `lvllm tune` shows what the CPU experts need; try a quantized variant or more GPU layers"),
    (r"No CUDA GPUs are available|no CUDA-capable device|CUDA driver version is insufficient|NVIDIA driver",
     "vLLM cannot use the GPU: check `nvidia-smi` and `lvllm doctor`"),
    (r"is not divisible by|not divisible by",
     "the model does not split across the GPUs this way: try `lvllm serve ... -- --pipeline-parallel-size N --tensor-parallel-size 1`"),
    (r"gated repo|401 Client Error|Repository Not Found|RepositoryNotFoundError|LocalEntryNotFoundError",
     "the model could not be downloaded: check the name, run `huggingface-cli login` or set HF_TOKEN"),
    (r"Illegal instruction",
     "a CPU instruction is missing on this machine: run `lvllm doctor`"),
]


def hint_for(lines: list[str], returncode: int | None) -> str:
    text = "\n".join(lines[-200:])
    for pattern, hint in _HINTS:
        if re.search(pattern, text):
            return hint
    if returncode == -signal.SIGKILL:
        return "vLLM was killed (SIGKILL), most often by the kernel's out-of-memory killer: check `dmesg`; `lvllm tune` shows the RAM the plan needs"
    if returncode == -signal.SIGILL:
        return "a CPU instruction is missing on this machine: run `lvllm doctor`"
    return "read the log lines above; `lvllm doctor` checks the machine and the Python stack"
