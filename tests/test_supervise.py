"""The supervisor with a real child process (tests/fake_vllm.py): start, /health wait, Ctrl-C, crash, escalation."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lvllm_cli.supervise import Supervisor, exit_code_for, hint_for

FAKE = str(Path(__file__).with_name("fake_vllm.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def fake_env(**kw) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def test_start_wait_ready_and_stop(tmp_path):
    port = free_port()
    chunks: list[bytes] = []
    sup = Supervisor([sys.executable, FAKE, "serve", "m", "--port", str(port)], fake_env(FAKE_HEALTH_DELAY=0.6, FAKE_GRANDCHILD=tmp_path / "gc"), f"http://127.0.0.1:{port}/health", echo=chunks.append, poll_interval=0.1)
    t0 = time.monotonic()
    sup.start()
    out = sup.wait_ready(20)
    assert out.status == "ready" and time.monotonic() - t0 >= 0.6
    assert wait_for(lambda: (tmp_path / "gc").exists())
    grandchild = int((tmp_path / "gc").read_text())
    assert os.getpgid(grandchild) == sup.pid  # the whole server lives in one process group
    rc = sup.stop(5, sig=signal.SIGTERM)
    assert rc == 0
    assert not pid_alive(sup.pid) and wait_for(lambda: not pid_alive(grandchild))
    lines = sup.lines()
    assert any("serving on" in line for line in lines)
    assert "Loading safetensors checkpoint shards: 3/3" in lines  # \r-separated progress splits into lines
    assert b"".join(chunks).count(b"\r") >= 3  # ...while the echo passes the bytes through untouched


def test_crash_before_ready_is_reported():
    port = free_port()
    sup = Supervisor([sys.executable, FAKE, "serve", "m", "--port", str(port)], fake_env(FAKE_HEALTH_DELAY=100, FAKE_CRASH_AFTER=0.3), f"http://127.0.0.1:{port}/health", poll_interval=0.1)
    sup.start()
    out = sup.wait_ready(20)
    assert out.status == "died" and out.returncode == 3
    sup.stop(1)
    assert "CUDA out of memory" in hint_for(sup.lines(), 3) or "GPU ran out of memory" in hint_for(sup.lines(), 3)


def test_timeout_when_never_healthy():
    port = free_port()
    sup = Supervisor([sys.executable, FAKE, "serve", "m", "--port", str(port)], fake_env(FAKE_HEALTH_DELAY=100), f"http://127.0.0.1:{port}/health", poll_interval=0.1)
    sup.start()
    assert sup.wait_ready(1.0).status == "timeout"
    sup.stop(5)
    assert not sup.group_alive()


def test_sigkill_escalation_when_the_group_ignores_sigterm(tmp_path):
    port = free_port()
    sup = Supervisor([sys.executable, FAKE, "serve", "m", "--port", str(port)], fake_env(FAKE_IGNORE_TERM=1, FAKE_GRANDCHILD=tmp_path / "gc"), f"http://127.0.0.1:{port}/health", poll_interval=0.1)
    sup.start()
    assert sup.wait_ready(20).status == "ready"
    grandchild = int((tmp_path / "gc").read_text())
    t0 = time.monotonic()
    rc = sup.stop(1.0, sig=signal.SIGTERM)
    took = time.monotonic() - t0
    assert rc == -signal.SIGKILL and 1.0 <= took < 8
    assert wait_for(lambda: not pid_alive(grandchild))


RUNNER = textwrap.dedent(
    """
    import sys
    from lvllm_cli.supervise import Supervisor
    port, fake, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sup = Supervisor([sys.executable, fake, "serve", "m", "--port", port], None, f"http://127.0.0.1:{port}/health", poll_interval=0.1)
    sup.env = __import__("os").environ.copy()
    def on_ready(s):
        print("READY", s.pid, flush=True)
    code = sup.run(ready_timeout=20, grace=grace, say=lambda m: print("SAY", m, flush=True), on_ready=on_ready)
    print("EXIT", code, flush=True)
    sys.exit(code)
    """
)


def run_supervisor(tmp_path, env_extra: dict, grace: float = 5.0) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = fake_env(**env_extra)
    return subprocess.Popen([sys.executable, str(script), str(free_port()), FAKE, str(grace)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def read_until(proc: subprocess.Popen, prefix: str, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    seen = []
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line; got:\n{''.join(seen)}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_whole_group(tmp_path, sig):
    proc = run_supervisor(tmp_path, {"FAKE_GRANDCHILD": tmp_path / "gc"})
    server_pid = int(read_until(proc, "READY").split()[1])
    grandchild = int((tmp_path / "gc").read_text())
    proc.send_signal(sig)
    rest = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, rest
    assert "SAY stopped" in rest and "EXIT 0" in rest
    assert not pid_alive(server_pid) and wait_for(lambda: not pid_alive(grandchild))


def test_second_ctrl_c_kills_at_once(tmp_path):
    proc = run_supervisor(tmp_path, {"FAKE_IGNORE_TERM": 1}, grace=60)
    server_pid = int(read_until(proc, "READY").split()[1])
    proc.send_signal(signal.SIGINT)
    read_until(proc, "SAY stopping")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 10 and proc.returncode == 0
    assert not pid_alive(server_pid)


def test_crash_after_ready_exits_nonzero_with_log_tail_and_hint(tmp_path):
    proc = run_supervisor(tmp_path, {"FAKE_CRASH_AFTER": 1.5, "FAKE_GRANDCHILD": tmp_path / "gc"})
    read_until(proc, "READY")
    grandchild = int((tmp_path / "gc").read_text())
    out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 3
    assert "vLLM exited with code 3" in out
    assert "| RuntimeError: CUDA out of memory" in out
    assert "hint: the GPU ran out of memory" in out
    assert wait_for(lambda: not pid_alive(grandchild))  # the crashed server's leftovers are cleaned up


def test_supervisor_killed_hard_still_stops_the_server(tmp_path):
    # PR_SET_PDEATHSIG: SIGKILL to lvllm must not leave vLLM holding the GPU.
    proc = run_supervisor(tmp_path, {})
    server_pid = int(read_until(proc, "READY").split()[1])
    proc.kill()
    proc.wait()
    assert wait_for(lambda: not pid_alive(server_pid), timeout=10)


def test_hints_and_exit_codes():
    assert "port is taken" in hint_for(["OSError: [Errno 98] Address already in use"], 1)
    assert "pip install" in hint_for(["ModuleNotFoundError: No module named 'vllm'"], 1)
    assert "out-of-memory killer" in hint_for(["loading"], -signal.SIGKILL)
    assert "huggingface-cli login" in hint_for(["huggingface_hub.errors.GatedRepoError: 401 Client Error"], 1)
    assert "lvllm doctor" in hint_for(["something odd"], 1)
    assert exit_code_for(3) == 3 and exit_code_for(-9) == 137 and exit_code_for(0) == 1 and exit_code_for(None) == 1


def test_log_file_and_server_handle(tmp_path):
    from lvllm_cli.monitor.server import ServerHandle

    port = free_port()
    log = tmp_path / "logs" / "server.log"
    sup = Supervisor([sys.executable, FAKE, "serve", "m", "--port", str(port)], fake_env(FAKE_HEALTH_DELAY=0.3), f"http://127.0.0.1:{port}/health", poll_interval=0.1, log_path=log)
    sup.start()
    try:
        assert isinstance(sup, ServerHandle) and sup.log_path == log
        assert sup.wait_ready(20).status == "ready"
        assert sup.is_running() and sup.exit_code() is None
        assert wait_for(lambda: b"serving on" in log.read_bytes())
        assert (log.stat().st_mode & 0o777) == 0o600
    finally:
        rc = sup.stop(5)  # the dashboard's "stop it": SIGINT to the group
    assert rc == 0 and not sup.is_running() and sup.exit_code() == 0 and sup.stop_requested
    text = log.read_bytes()
    assert b"Loading safetensors checkpoint shards: 3/3\r" in text and b"shutting down" in text  # the bytes as printed


IGNORES_INT = "import signal, sys, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(600)\n"


def test_stop_group_escalates_from_sigint_to_sigterm():
    from lvllm_cli.supervise import stop_group

    proc = subprocess.Popen([sys.executable, "-c", IGNORES_INT], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"up\n"
    t0 = time.monotonic()
    assert stop_group(proc, signal.SIGINT, timeout=0.5) == -signal.SIGTERM
    assert 0.5 <= time.monotonic() - t0 < 5
    assert stop_group(proc, signal.SIGINT, timeout=0.5) == -signal.SIGTERM  # twice is harmless


def test_stop_group_of_a_process_that_leads_no_group_signals_only_it():
    from lvllm_cli.supervise import stop_group

    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"up\n"
    assert os.getpgid(proc.pid) == os.getpgid(0)  # our own group: signalling it would hit pytest
    assert stop_group(proc, signal.SIGTERM, timeout=5) == -signal.SIGTERM


HOOKED = textwrap.dedent(
    """
    import sys, threading
    from lvllm_cli.supervise import Supervisor
    port, fake, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    sup = Supervisor([sys.executable, fake, "serve", "m", "--port", port], __import__("os").environ.copy(),
                     f"http://127.0.0.1:{port}/health", poll_interval=0.1)
    released = threading.Event()
    def on_ready(s):
        # stands in for the dashboard: blocks the main thread until told to leave
        if mode == "stop-from-ui":
            threading.Thread(target=lambda: (s.stop(), released.set())).start()
        else:
            s.on_stop_request = released.set
            print("READY", s.pid, flush=True)
        while not released.wait(0.05):
            pass
        print("UI CLOSED", s.is_running(), flush=True)
    code = sup.run(ready_timeout=20, grace=5, say=lambda m: print("SAY", m, flush=True), on_ready=on_ready)
    print("EXIT", code, flush=True)
    sys.exit(code)
    """
)


@pytest.mark.parametrize("mode", ["stop-from-ui", "signal"])
def test_stop_while_on_ready_blocks_is_a_clean_stop(tmp_path, mode):
    script = tmp_path / "hooked.py"
    script.write_text(HOOKED)
    proc = subprocess.Popen([sys.executable, str(script), str(free_port()), FAKE, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=fake_env(FAKE_HEALTH_DELAY=0.3))
    if mode == "signal":
        read_until(proc, "READY")
        proc.send_signal(signal.SIGTERM)  # the hook lets the blocking "dashboard" go
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "UI CLOSED" in out and "SAY stopped" in out and "vLLM exited" not in out
