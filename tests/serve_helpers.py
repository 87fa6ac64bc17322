"""Driving a real `lvllm serve` against the stand-in vLLM package (tests/fake_vllm.py)."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_fake_vllm(root: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes `python -m vllm.entrypoints.cli.main` the stand-in."""
    cli = root / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", cli):
        (d / "__init__.py").write_text("")
    shutil.copy(HERE / "fake_vllm.py", cli / "main.py")
    meta = root / "vllm-0.26.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0\n")
    return root


@pytest.fixture
def fake_vllm(tmp_path) -> Path:
    return make_fake_vllm(tmp_path / "pkgs")


class Lvllm:
    """`python -m lvllm_cli ...` in a subprocess, its merged output read by a thread (no blocking readline)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, needle: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if needle in line:
                return line
        self.proc.kill()
        raise AssertionError(f"{needle!r} never appeared; output:\n{''.join(self.seen)}")

    def finish(self, timeout: float = 60) -> str:
        self.proc.wait(timeout=timeout)
        while True:
            line = self.lines.get(timeout=10)
            if line is None:
                return "".join(self.seen)
            self.seen.append(line)


def start_lvllm(tmp_path, fake_vllm, args, **env_extra) -> Lvllm:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(fake_vllm),
        LVLLM_HOME=str(tmp_path / "home"),
        XDG_RUNTIME_DIR=str(tmp_path / "run"),
        HF_HUB_CACHE=str(tmp_path / "hf"),
        FAKE_RECORD=str(tmp_path / "record.json"),
        FAKE_HEALTH_DELAY="0.8",
        COLUMNS="200",
    )
    for var in ("VLLM_PLUGINS", "CUDA_VISIBLE_DEVICES", "LVLLM_API_KEY", "LVLLM_METRICS_DIR"):
        env.pop(var, None)
    env.update({k: str(v) for k, v in env_extra.items()})
    # cwd outside the repo: `-m lvllm_cli` must import the installed package
    proc = subprocess.Popen([sys.executable, "-m", "lvllm_cli", *map(str, args)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Lvllm(proc)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
