"""`lvllm serve --monitor` for real: lvllm in a pseudo-terminal, the stand-in vLLM (tests/fake_vllm.py)
as the server, keys typed into the terminal, the screen read back.

What must hold: the dashboard opens once the server is ready and shows its log; quitting asks
whether to stop the server; "y" stops the whole server and lvllm exits 0; "n" leaves it running
under lvllm's supervision (Ctrl-C then stops it); a stop signal to lvllm closes the dashboard too.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import machine_file, run_cli, write_model_config
from serve_helpers import alive, fake_vllm, free_port  # noqa: F401 (fake_vllm is a fixture)

# Escape sequences Textual writes: CSI (cursor, colours, modes), OSC, DCS/APC strings, charset picks.
_ESCAPES = re.compile(rb"\x1b\[[0-9;?<>=$ ]*[A-Za-z~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[PX^_].*?\x1b\\|\x1b[()][A-Z0-9]|\x1b[=>78]", re.S)


class PtyLvllm:
    """`python -m lvllm_cli ARGS` with a pseudo-terminal as stdin, stdout and stderr."""

    def __init__(self, args: list, env: dict, cwd: Path, size=(40, 140)):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "lvllm_cli", *map(str, args)], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, env=env, start_new_session=True)
        os.close(slave)
        self.master = master
        self._buf = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once every holder of the terminal's other end is gone
                break
            if not data:
                break
            with self._lock:
                self._buf.extend(data)

    def text(self) -> str:
        with self._lock:
            raw = bytes(self._buf)
        return _ESCAPES.sub(b"", raw).decode("utf-8", "replace")

    def until(self, needle: str, timeout: float = 60.0, after: int = 0) -> int:
        """Wait for `needle` past position `after` of the text; its position."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = self.text().find(needle, after)
            if pos >= 0:
                return pos
            if self.proc.poll() is not None:
                time.sleep(0.3)
                pos = self.text().find(needle, after)
                if pos >= 0:
                    return pos
                break
            time.sleep(0.05)
        self.close()
        raise AssertionError(f"{needle!r} never appeared (exit {self.proc.poll()}); screen text:\n{self.text()[-4000:]}")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"lvllm did not exit; screen text:\n{self.text()[-4000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:
            os.close(self.master)
        except OSError:
            pass


@pytest.fixture
def served(tmp_path, fake_vllm):
    """Start `lvllm serve MODEL --monitor` for the desktop fixture machine; yield (run, record, port)."""
    runs: list[PtyLvllm] = []

    def start(*extra):
        model = write_model_config(tmp_path / "Qwen3-30B-A3B", num_hidden_layers=8)
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(fake_vllm), LVLLM_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hf"),
                   FAKE_RECORD=str(tmp_path / "record.json"), FAKE_HEALTH_DELAY="0.5", TERM="xterm-256color",
                   XDG_RUNTIME_DIR=str(tmp_path / "run"))
        for var in ("VLLM_PLUGINS", "CUDA_VISIBLE_DEVICES", "LVLLM_API_KEY", "LVLLM_METRICS_DIR"):
            env.pop(var, None)
        run = PtyLvllm(["serve", model, "--machine", machine_file(tmp_path, "desktop"), "--port", port, "--monitor", *extra],
                       env, tmp_path)
        runs.append(run)
        run.until("Server log")  # the dashboard is up, with the log pane
        record = json.loads((tmp_path / "record.json").read_text())
        return run, record, port

    yield start
    for run in runs:
        run.close()


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_dashboard_shows_the_server_and_y_stops_it(served, tmp_path):
    run, record, port = served()
    run.until("fake vllm: serving on")  # the server's log, in the pane
    run.until("tok/s")  # figures from its /metrics
    run.until("7 (1 proc)")  # the CPU-expert threads its worker publishes (LK_THREADS of the desktop plan)
    assert alive(record["pid"])
    mark = len(run.text())
    run.type("q")
    run.until("Stop the server too?", after=mark)
    run.type("y")
    assert run.wait() == 0
    assert "lvllm: stopped" in run.text()[mark:]
    assert _gone(record["pid"])
    log = tmp_path / "home" / "logs" / f"server-{port}.log"
    assert "fake vllm: serving on" in log.read_text() and (log.stat().st_mode & 0o777) == 0o600


def test_escape_goes_back_and_n_leaves_the_server_to_the_supervisor(served):
    run, record, _ = served()
    mark = len(run.text())
    run.type("q")
    run.until("Stop the server too?", after=mark)
    run.type("\x1b")  # escape: back to the dashboard
    time.sleep(0.5)
    assert run.proc.poll() is None and alive(record["pid"])
    mark = len(run.text())
    run.type("q")
    run.until("Stop the server too?", after=mark)
    run.type("n")
    run.until("the server keeps running", after=mark)
    time.sleep(0.5)
    assert run.proc.poll() is None and alive(record["pid"])  # lvllm still supervises it
    run.proc.send_signal(signal.SIGINT)  # Ctrl-C, as from the terminal
    assert run.wait() == 0
    assert "lvllm: stopped" in run.text()[mark:]
    assert _gone(record["pid"])


def test_sigterm_to_lvllm_closes_the_dashboard_and_stops_the_server(served):
    run, record, _ = served()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == 0
    assert "lvllm: stopped" in run.text()
    assert _gone(record["pid"])


def test_monitor_without_a_terminal_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    model = write_model_config(tmp_path / "m")
    r = run_cli("serve", model, "--machine", machine_file(tmp_path, "desktop"), "--monitor")
    assert r.exit_code == 2 and "--monitor needs a terminal" in r.stderr
    assert not (tmp_path / "home").exists()  # nothing was started or written
