"""A stand-in for `vllm serve` in supervisor tests: a real HTTP server in a real process.

    python fake_vllm.py serve MODEL --port N [--host H] [...other vLLM options ignored]

Behaviour is steered by environment variables so the same script works both
when called directly and when lvllm runs it as `python -m vllm.entrypoints.cli.main`:

FAKE_HEALTH_DELAY   seconds before /health answers 200 (503 before)      default 0.5
FAKE_CRASH_AFTER    exit with code 3 this many seconds after start      (unset: never)
FAKE_IGNORE_TERM    "1": ignore SIGTERM and SIGINT (tests the SIGKILL escalation)
FAKE_GRANDCHILD     path: spawn a sleeping grandchild and write its pid there
FAKE_RECORD         path: write {"argv": ..., "env": ...} there at start

/metrics publishes a vLLM-like counter (generated tokens, +50 per scrape). With
LVLLM_METRICS_DIR set it also does what the plugin does in each worker: writes
lk_moe-<pid>.prom there twice a second (threads = LK_THREADS).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time


def main(argv: list[str]) -> int:
    port, host = 8000, "127.0.0.1"
    for i, a in enumerate(argv):
        if a == "--port":
            port = int(argv[i + 1])
        elif a.startswith("--port="):
            port = int(a.split("=", 1)[1])
        elif a == "--host":
            host = argv[i + 1]
    record = os.environ.get("FAKE_RECORD")
    if record:
        with open(record + ".tmp", "w") as f:
            json.dump({"argv": argv, "env": dict(os.environ), "pid": os.getpid(), "pgid": os.getpgid(0)}, f)
        os.replace(record + ".tmp", record)
    grandchild_file = os.environ.get("FAKE_GRANDCHILD")
    if grandchild_file:
        gc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(grandchild_file + ".tmp", "w") as f:
            f.write(str(gc.pid))
        os.replace(grandchild_file + ".tmp", grandchild_file)
    if os.environ.get("FAKE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    start = time.monotonic()
    delay = float(os.environ.get("FAKE_HEALTH_DELAY", "0.5"))

    scrapes = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ready = time.monotonic() - start >= delay
            if ready and self.path == "/metrics":
                scrapes[0] += 1
                body = (
                    "# TYPE vllm:generation_tokens counter\n"
                    f'vllm:generation_tokens_total{{model_name="fake",engine="0"}} {50.0 * scrapes[0]}\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200 if ready and self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"INFO fake vllm: loading model {argv[1] if len(argv) > 1 else '?'}", flush=True)
    for i in range(3):
        print(f"Loading safetensors checkpoint shards: {i + 1}/3\r", end="", flush=True)
        time.sleep(0.05)
    print(flush=True)
    print(f"INFO fake vllm: serving on http://{host}:{port}", flush=True)
    if os.environ.get("LVLLM_METRICS_DIR"):
        threading.Thread(target=publish_engine_figures, daemon=True).start()
    crash = os.environ.get("FAKE_CRASH_AFTER")
    try:
        while True:
            time.sleep(0.05)
            if crash is not None and time.monotonic() - start >= float(crash):
                print("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
                return 3
    except KeyboardInterrupt:
        print("INFO fake vllm: shutting down", flush=True)
        return 0


def publish_engine_figures() -> None:
    from lvllm_cli.monitor import engine_metrics as em

    directory = em.prepare_dir(em.metrics_dir())
    threads = float(os.environ.get("LK_THREADS") or 1)
    calls = 0
    while True:
        calls += 10
        em.write_metrics_file(directory, em.format_metrics(calls * 4, calls, calls * 0.001, calls, threads))
        time.sleep(0.5)


def _on_term(signum, frame):
    raise KeyboardInterrupt  # stop like vLLM does on SIGTERM: through the same shutdown path as Ctrl-C


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_term)
    sys.exit(main(sys.argv[1:]))
