"""Regenerate docs/monitor.svg: the dashboard against the test suite's fake vLLM server.

    python scripts/monitor_screenshot.py [out.svg]

The numbers are synthetic but shaped like Qwen3-Coder-30B-A3B on one H100 +
a 2-node Xeon under a coding-agent load; the CPU and GPU panels are fed fixed
figures (this script must run on machines without that hardware).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from monitor_fakes import FakeVllm  # noqa: E402

from lvllm_cli.monitor import engine_metrics  # noqa: E402
from lvllm_cli.monitor.app import MonitorApp  # noqa: E402
from lvllm_cli.monitor.poller import Poller  # noqa: E402
from lvllm_cli.monitor.system import GpuSample, SystemFigures  # noqa: E402

MODEL = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
GiB = 2**30

LOG = """\
INFO 05-09 07:41:02 [api_server.py:1880] vLLM API server version 0.26.0
INFO 05-09 07:41:02 [utils.py:326] non-default args: {'model': 'Qwen/Qwen3-Coder-30B-A3B-Instruct', 'max_model_len': 65536}
INFO 05-09 07:41:09 [lvllm_plugin] routed experts of 48 layers: 40 on the CPU (2 NUMA nodes, 2x28 threads), 8 on the GPU
INFO 05-09 07:41:57 [gpu_model_runner.py:2368] Model loading took 11.84 GiB and 47.9 seconds
INFO 05-09 07:42:20 [kv_cache_utils.py:1087] GPU KV cache size: 412,560 tokens
INFO 05-09 07:42:41 [core.py:199] init engine (profile, create kv cache, warmup model) took 43.6 seconds
INFO 05-09 07:42:42 [launcher.py:44] Route: /v1/chat/completions, Methods: POST
INFO:     Started server process [48211]
INFO:     Application startup complete.
INFO:     127.0.0.1:51804 - "POST /v1/chat/completions HTTP/1.1" 200 OK
INFO 05-09 07:44:13 [loggers.py:123] Engine 000: Avg prompt throughput: 6121.4 tokens/s, Avg generation throughput: 213.6 tokens/s, Running: 8 reqs, Waiting: 1 reqs, GPU KV cache usage: 31.2%
"""


class Handle:
    """A ServerHandle for a server that is not really there (only its log)."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self.pid = None

    def is_running(self) -> bool:
        return True

    def exit_code(self):
        return None

    def stop(self, timeout: float = 30.0):
        return 0


class FixedSystem:
    def sample(self) -> SystemFigures:
        return SystemFigures(
            node_util={0: 0.83, 1: 0.79}, node_mem={0: (256 * GiB, 121 * GiB), 1: (256 * GiB, 119 * GiB)},
            cpu_util=0.81, vllm_cpu_share=0.78, vllm_processes=4, ram_total_bytes=512 * GiB, ram_used_bytes=274 * GiB,
            gpus=[GpuSample(0, "NVIDIA H100 80GB HBM3", 0.62, int(71.2 * GiB), int(79.6 * GiB), 312.0, 700.0)],
        )

    def close(self) -> None:
        pass


async def main(out: Path) -> None:
    rng = random.Random(2)
    try:
        fake = FakeVllm().start(8000)  # the default URL, so the picture shows what users will see
    except OSError:
        fake = FakeVllm().start()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "server.log").write_text(LOG)
    mdir = tmp / "metrics"
    mdir.mkdir(mode=0o700)
    clock_t = [0.0]
    poller = Poller(fake.url, local=True, metrics_dirs=[mdir], system=False, clock=lambda: clock_t[0])
    poller._system = FixedSystem()
    labels = (MODEL, "0")
    moe = dict(cpu_tok=0.0, gpu_tok=0.0, cpu_s=0.0, calls=0.0)
    app = MonitorApp(poller=poller, interval=3600, server=Handle(tmp / "server.log"))
    try:
        async with app.run_test(size=(140, 40)) as pilot:
            for step in range(90):
                burst = 1.0 + 0.8 * math.sin(step / 6.0)
                prompt = max(0, int(rng.gauss(6000 * burst, 1500)))
                gen = max(0, int(rng.gauss(215, 20)))
                fake.prompt.labels(*labels).inc(prompt)
                fake.generation.labels(*labels).inc(gen)
                fake.running.labels(*labels).set(8)
                fake.waiting.labels(*labels).set(1 if step % 7 else 2)
                fake.kv.labels(*labels).set(0.31 + 0.02 * math.sin(step / 5.0))
                for _ in range(rng.randint(0, 2)):
                    fake.ttft.labels(*labels).observe(rng.lognormvariate(math.log(0.9), 0.5))
                    fake.e2e.labels(*labels).observe(rng.lognormvariate(math.log(9.0), 0.6))
                    fake.success.labels(*labels, "stop").inc()
                for _ in range(gen // 10):
                    fake.itl.labels(*labels).observe(rng.lognormvariate(math.log(0.036), 0.25))
                tokens = (prompt + gen) * 48  # per layer call, 48 MoE layers
                moe["cpu_tok"] += tokens * 40 / 48
                moe["gpu_tok"] += tokens * 8 / 48
                moe["calls"] += 40 * (gen / 8 + 2)
                moe["cpu_s"] += 0.74
                engine_metrics.write_metrics_file(
                    mdir, engine_metrics.format_metrics(moe["cpu_tok"], moe["gpu_tok"], moe["cpu_s"], moe["calls"], 56), pid=48233)
                clock_t[0] += 1.0
                await app.poll_now()
            await pilot.pause(0.5)
            app.pump_log()
            await pilot.pause(0.2)
            app.save_screenshot(filename=out.name, path=str(out.parent))
    finally:
        fake.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "monitor.svg"
    target.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(target))
