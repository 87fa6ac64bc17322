"""The Textual dashboard driven headless by Pilot against real HTTP servers (in-process, and a
stand-in server child process for `serve --monitor`)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from lvllm_cli.monitor.app import SERVER_EXITED, SERVER_KEPT, SERVER_STOPPED, ConfirmStop, MonitorApp, run_attached
from lvllm_cli.monitor.poller import Poller
from lvllm_cli.monitor.server import PopenServer
from monitor_fakes import TTFT_BUCKETS, Clock, FakeVllm, ref_quantile, screen_text


def _ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def _tok(x: float) -> str:
    return f"{x:,.1f} tok/s"


def test_dashboard_numbers_keys_and_resize(fake):
    async def main():
        clock = Clock(100.0)
        poller = Poller(fake.url, local=False, clock=clock, rate_window_s=5.0, latency_window_s=30.0)
        app = MonitorApp(poller=poller, interval=3600)
        async with app.run_test(size=(150, 45)) as pilot:
            await pilot.pause()
            await app.poll_now()
            ttft = {"qwen": [0.12, 0.13, 0.3, 0.35, 0.6], "glm": [0.02, 0.03, 0.05]}
            fake.prompt.labels("qwen", "0").inc(12_000)
            fake.prompt.labels("glm", "1").inc(3_000)
            fake.generation.labels("qwen", "0").inc(900)
            fake.generation.labels("glm", "1").inc(300)
            fake.running.labels("qwen", "0").set(5)
            fake.running.labels("glm", "1").set(2)
            fake.kv.labels("qwen", "0").set(0.5)
            fake.kv.labels("glm", "1").set(0.25)
            for model, engine in (("qwen", "0"), ("glm", "1")):
                for x in ttft[model]:
                    fake.ttft.labels(model, engine).observe(x)
            clock.t += 2.0
            await app.poll_now()
            await pilot.pause()
            text = screen_text(app)
            assert "● up" in text and "model: all (2)" in text and "engine: all (2)" in text
            assert _tok(15_000 / 2) in text and _tok(1_200 / 2) in text
            assert "37.5 %" in text  # mean KV usage of the two engines
            everything = ttft["qwen"] + ttft["glm"]
            for q in (0.5, 0.9, 0.99):
                assert _ms(ref_quantile(everything, TTFT_BUCKETS, q)) in text

            await pilot.press("m")  # models are offered in order: glm, qwen, then all again
            text = screen_text(app)
            assert "model: glm" in text and _tok(3_000 / 2) in text
            assert _ms(ref_quantile(ttft["glm"], TTFT_BUCKETS, 0.5)) in text
            await pilot.press("m")
            text = screen_text(app)
            assert "model: qwen" in text and _tok(12_000 / 2) in text
            assert _ms(ref_quantile(ttft["qwen"], TTFT_BUCKETS, 0.9)) in text
            await pilot.press("m")
            assert "model: all (2)" in screen_text(app)
            await pilot.press("e")
            text = screen_text(app)
            assert "engine: 0" in text and _tok(12_000 / 2) in text

            await pilot.press("w")
            assert "Latency, last 60 s" in screen_text(app)

            await pilot.press("p")
            assert "paused" in screen_text(app)
            before = fake.scrapes
            await app.poll_now()
            assert fake.scrapes == before  # paused: no polling
            await pilot.press("p")

            await pilot.resize_terminal(80, 60)
            await pilot.pause()
            assert app.screen.has_class("narrow")
            text = screen_text(app)
            assert "prefill" in text and "Latency" in text and "CPU experts" in text
            await pilot.resize_terminal(150, 45)
            await pilot.pause()
            assert not app.screen.has_class("narrow")

    asyncio.run(main())


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_dashboard_waits_for_server_sees_it_go_and_come_back():
    async def main():
        port = _free_port()
        fake = FakeVllm()
        clock = Clock(100.0)
        app = MonitorApp(poller=Poller(f"http://127.0.0.1:{port}", local=False, clock=clock), interval=3600)
        async with app.run_test(size=(150, 40)) as pilot:
            await app.poll_now()
            await pilot.pause()
            text = screen_text(app)
            assert "waiting for the server" in text and "connection refused" in text
            fake.prompt.labels("m", "0").inc(100)
            fake.start(port)
            try:
                await app.poll_now()
                clock.t += 1
                fake.prompt.labels("m", "0").inc(400)
                await app.poll_now()
                await pilot.pause()
                text = screen_text(app)
                assert "● up" in text and _tok(400.0) in text
                fake.stop()
                clock.t += 1
                await app.poll_now()
                await pilot.pause()
                text = screen_text(app)
                assert "○ down" in text and "last seen" in text and _tok(400.0) not in text
                fake.reset()
                fake.prompt.labels("m", "0").inc(50)
                fake.start(port)
                clock.t += 1
                await app.poll_now()
                await pilot.pause()
                text = screen_text(app)
                # back: over the last 5 s the rate counts 400 + 50 tokens (the restart counted from zero)
                assert "● up" in text and _tok(450 / 3) in text
            finally:
                fake.stop()

    asyncio.run(main())


STANDIN = r"""
import sys, time, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from prometheus_client import CollectorRegistry, Counter, generate_latest
reg = CollectorRegistry()
gen = Counter("vllm:generation_tokens", "g", ["model_name", "engine"], registry=reg)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        gen.labels("standin", "0").inc(100)
        body = generate_latest(reg)
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        print("GET /metrics 200", flush=True)
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(f"INFO listening on {srv.server_address[1]}", flush=True)
exit_after = float(sys.argv[1]) if len(sys.argv) > 1 else None
if exit_after is not None:
    threading.Timer(exit_after, lambda: (print("fatal: engine died", flush=True), __import__("os")._exit(3))).start()
srv.serve_forever()
"""


def _start_standin(tmp_path, *args):
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", STANDIN, *args], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 15
    while b"listening on" not in log.read_bytes():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.05)
    port = int(log.read_text().split("listening on ")[1].split()[0])
    return PopenServer(proc, log), f"http://127.0.0.1:{port}"


def _log_text(app) -> str:
    return "\n".join(line.text for line in app.query_one("#log").lines)


async def _until(pilot, cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline
        await pilot.pause(0.05)


@pytest.mark.parametrize("answer", ["keep", "stop"])
def test_attached_server_log_pane_and_quit_question(tmp_path, answer):
    handle, url = _start_standin(tmp_path)

    async def main():
        app = MonitorApp(url, server=handle, interval=0.2, poller=Poller(url, local=False, server_pid=handle.pid))
        async with app.run_test(size=(150, 45)) as pilot:
            await _until(pilot, lambda: "GET /metrics 200" in _log_text(app))
            assert "listening on" in _log_text(app)
            await _until(pilot, lambda: app.frame is not None and app.frame.up)
            await pilot.press("l")  # the log pane can be hidden and shown
            assert app.query_one("#log").has_class("hidden")
            await pilot.press("l")
            await pilot.press("q")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmStop)
            await pilot.press("escape")  # changed my mind
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmStop) and handle.is_running()
            await pilot.press("q")
            await pilot.pause()
            await pilot.press("n" if answer == "keep" else "y")
            await _until(pilot, lambda: app.return_value is not None)
        return app.return_value

    try:
        result = asyncio.run(main())
        if answer == "keep":
            assert result == SERVER_KEPT and handle.is_running()
        else:
            assert result == SERVER_STOPPED and not handle.is_running()
    finally:
        handle.stop(timeout=2)


def test_attached_server_that_dies(tmp_path):
    handle, url = _start_standin(tmp_path, "1.0")

    async def main():
        app = MonitorApp(url, server=handle, interval=0.2, poller=Poller(url, local=False))
        async with app.run_test(size=(150, 45)) as pilot:
            await _until(pilot, lambda: "exited with code 3" in screen_text(app))
            await _until(pilot, lambda: "fatal: engine died" in _log_text(app))
            await pilot.press("q")  # nothing to ask: it is gone
            await _until(pilot, lambda: app.return_value is not None)
        return app.return_value

    try:
        assert asyncio.run(main()) == SERVER_EXITED
    finally:
        handle.stop(timeout=2)


def test_no_figures_are_invented_for_an_idle_fresh_server(fake):
    async def main():
        clock = Clock(100.0)
        app = MonitorApp(poller=Poller(fake.url, local=False, clock=clock), interval=3600)
        async with app.run_test(size=(150, 40)) as pilot:
            await app.poll_now()
            clock.t += 1
            await app.poll_now()
            await pilot.pause()
            text = screen_text(app)
            assert "● up" in text and "no latency histograms yet" in text
            assert not any(ch.isdigit() for ch in text.split("prefill")[1].split("tok/s")[0])

    asyncio.run(main())


def test_run_attached_as_serve_calls_it(tmp_path):
    handle, url = _start_standin(tmp_path)

    async def user(pilot):
        await _until(pilot, lambda: pilot.app.frame is not None and pilot.app.frame.up)
        await pilot.press("q")
        await pilot.pause()
        await pilot.press("y")

    try:
        result = run_attached(url, handle.proc, handle.log_path, interval=0.2, headless=True, size=(120, 40), auto_pilot=user)
        assert result == SERVER_STOPPED and handle.proc.poll() is not None
    finally:
        handle.stop(timeout=2)
