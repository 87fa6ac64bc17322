"""The server handle `lvllm serve --monitor` passes in: log tailing and stopping a real process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lvllm_cli.monitor.server import LogTail, PopenServer, ServerHandle


def test_log_tail_follows_appends_partial_lines_truncation_and_replacement(tmp_path):
    log = tmp_path / "server.log"
    tail = LogTail(log, backlog=20)
    assert tail.read_new() == []  # not there yet
    log.write_bytes(b"x" * 50 + b"\nold line\nnew")
    assert tail.read_new() == ["old line"]  # starts near the end, skips the cut-off line, holds "new"
    with open(log, "ab") as f:
        f.write(b" one\r\nbad \xff byte\n")
    assert tail.read_new() == ["new one", "bad \ufffd byte"]
    assert tail.read_new() == []
    log.write_bytes(b"after truncate\n")  # same inode, shorter
    assert tail.read_new() == ["after truncate"]
    log2 = tmp_path / "rotated"
    log2.write_bytes(b"fresh file\n")
    os.replace(log2, log)  # a new inode under the same name
    assert tail.read_new() == ["fresh file"]


def test_log_tail_endless_line_is_still_shown(tmp_path):
    log = tmp_path / "l"
    log.write_bytes(b"")
    tail = LogTail(log, max_read=100)
    tail.read_new()
    log.write_bytes(b"y" * 250)
    got = []
    for _ in range(5):
        got += tail.read_new()
    assert got and all(set(g) == {"y"} for g in got)


SERVER = r"""
import os, signal, subprocess, sys, time
# a parent that starts a worker in its own process group, like vLLM's API server and engine core
child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"])
print("worker", child.pid, flush=True)
if len(sys.argv) > 1 and sys.argv[1] == "ignore-int":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    time.sleep(0.1)
"""


def _start(tmp_path, *args):
    log = tmp_path / "log"
    f = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, *args], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    f.close()
    deadline = time.time() + 10
    while b"worker" not in log.read_bytes():
        assert time.time() < deadline, "stand-in server did not start"
        time.sleep(0.05)
    worker = int(log.read_text().split()[1])
    return PopenServer(proc, log), worker


@pytest.mark.parametrize("mode", ["", "ignore-int"])
def test_stop_takes_the_whole_group_down(tmp_path, mode):
    handle, worker = _start(tmp_path, *([mode] if mode else []))
    assert isinstance(handle, ServerHandle)
    assert handle.is_running() and handle.exit_code() is None and handle.log_path == tmp_path / "log"
    code = handle.stop(timeout=0.5)
    assert code is not None and not handle.is_running()
    if mode:
        assert code == -signal.SIGTERM  # SIGINT ignored, SIGTERM did it
    else:
        assert code != 0
    deadline = time.time() + 5
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "worker outlived the server"
        time.sleep(0.05)
    assert handle.stop() == code  # twice is harmless
