"""What the dashboard attached to a server needs: a handle on the server (its log, state, stop).

The dashboard needs three things from a server it did not start itself: its
log (a file it tails, so nothing blocks and a restarted monitor can pick the
log up again), whether it still runs, and a way to stop it. `ServerHandle` is
that interface. `lvllm serve --monitor` hands it its Supervisor
(lvllm_cli/supervise.py); `PopenServer` implements it for a plain `subprocess.Popen`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class ServerHandle(Protocol):
    @property
    def pid(self) -> int | None:
        """The server's main process (its descendants count as the server's CPU use)."""

    @property
    def log_path(self) -> Path | None:
        """A file the server's stdout+stderr go to; the dashboard tails it."""

    def is_running(self) -> bool: ...

    def exit_code(self) -> int | None:
        """None while running."""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server and everything it started; return its exit code. Safe to call twice."""


class PopenServer:
    """ServerHandle over a Popen started with `start_new_session=True` (so the whole
    process group — API server, engine core, workers — can be signalled at once)."""

    def __init__(self, proc: subprocess.Popen, log_path: str | os.PathLike | None = None) -> None:
        self.proc = proc
        self._log_path = Path(log_path) if log_path is not None else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (vLLM's clean shutdown, as Ctrl-C) to the whole group, then SIGTERM, then SIGKILL.

        The sequence is lvllm's one stop implementation, `lvllm_cli.supervise.stop_group`.
        """
        from lvllm_cli.supervise import stop_group

        return stop_group(self.proc, signal.SIGINT, timeout)


class LogTail:
    """Incremental reader of a growing log file: new complete lines on each call.

    Starts near the end of an existing file (the last `backlog` bytes), copes
    with the file not existing yet, being truncated or replaced, and with
    undecodable bytes. Never raises.
    """

    def __init__(self, path: str | os.PathLike, backlog: int = 64 * 1024, max_read: int = 1 << 20) -> None:
        self.path = Path(path)
        self.backlog = backlog
        self.max_read = max_read
        self._pos: int | None = None
        self._ino: int | None = None
        self._partial = b""

    def read_new(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if self._pos is None or st.st_ino != self._ino or st.st_size < self._pos:
                    # first look, file replaced, or truncated: start over (near the end on the first look)
                    first = self._pos is None
                    self._pos = max(0, st.st_size - self.backlog) if first else 0
                    self._ino = st.st_ino
                    self._partial = b""
                    skip_partial = first and self._pos > 0
                else:
                    skip_partial = False
                f.seek(self._pos)
                data = f.read(self.max_read)
        except OSError:
            return []
        self._pos += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if skip_partial and lines:
            lines = lines[1:]  # we started mid-line
        if len(self._partial) > self.max_read:  # a "line" that never ends: show it anyway
            lines.append(self._partial)
            self._partial = b""
        return [ln.rstrip(b"\r").decode("utf-8", errors="replace") for ln in lines]
