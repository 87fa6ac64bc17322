"""Qwen3-30B-A3B shapes (--load-format dummy): decode tokens/s of vLLM + lvllm vs stock vLLM's CPU offload.

    python scripts/gpu_perf_30b.py OUTDIR [variants...]
      variants: lvllm_graphs lvllm_eager stock_offload stock_offload_concurrent lvllm_int4 lvllm_fp8
                lvllm_int4_bf16act
                (default: the first three; int4/fp8 serve the qwen3-30b-a3b-int4 /
                 -fp8 shapes: compressed-tensors int4 group 32, fp8 128x128 blocks)

In the same run it measures the CPU read bandwidth with the engine's own
threads and reports the decode roofline: bandwidth / routed-expert bytes per token.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_plugin_e2e import vllm_run  # noqa: E402

H, I, E, K, LAYERS = 2048, 768, 128, 8, 48
EXPERT_BYTES_PER_TOKEN = LAYERS * K * 3 * H * I * 2
# What lk_moe streams per weight: int4 nibbles + an fp16 scale per 32; fp8 bytes + an fp16 scale per 128.
STREAMED_BYTES_PER_WEIGHT = {"qwen3-30b-a3b": 2.0, "qwen3-30b-a3b-int4": 0.5 + 2 / 32, "qwen3-30b-a3b-fp8": 1.0 + 2 / 128}


def gib_loaded(log: Path) -> float | None:
    m = re.findall(r"Model loading took ([0-9.]+) GiB", log.read_text())
    return float(m[-1]) if m else None


def main() -> None:
    from lvllm_cli import _lk_moe as lk
    from lvllm_cli.moe import get_engine, timing
    from lvllm_cli.tiny_models import write_model_shape

    out = Path(sys.argv[1])
    variants = sys.argv[2:] or ["lvllm_graphs", "lvllm_eager", "stock_offload"]
    work = Path(os.environ.get("LVLLM_E2E_WORK", "/tmp/lvllm-e2e"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for shape in STREAMED_BYTES_PER_WEIGHT:
        models[shape] = work / shape
        if not models[shape].exists():
            write_model_shape(shape, models[shape])
    threads = int(os.environ.get("LK_THREADS", "15"))
    bw = lk.read_bandwidth(get_engine(threads=threads), 8 << 30, 5)
    report = {"bandwidth_gbps": round(bw, 1), "threads": threads,
              "stream_sync": os.environ.get("LVLLM_STREAM_SYNC", "hostfn"),
              "expert_bytes_per_token": EXPERT_BYTES_PER_TOKEN,
              "roofline_tokens_per_s": round(bw * 1e9 / EXPERT_BYTES_PER_TOKEN, 2)}
    print("bandwidth", report, flush=True)
    cpu = {"LVLLM_MOE_CPU": "1", "LK_THREADS": str(threads)}
    base = "qwen3-30b-a3b"
    runs = {
        "lvllm_graphs": (base, cpu, ["--load-format", "dummy", "--bench", "--max-tokens", "64"]),
        "lvllm_eager": (base, cpu, ["--load-format", "dummy", "--bench", "--eager", "--max-tokens", "64"]),
        # What a user tries first: stock vLLM with the experts offloaded to (pinned, UVA) CPU memory.
        # Batch 1 only: every step streams the offloaded experts over PCIe (seconds per step).
        "stock_offload": (base, {}, ["--load-format", "dummy", "--bench", "--max-tokens", "16", "--concurrency", "1",
                                     "--extra-json", json.dumps({"cpu_offload_gb": 58, "cpu_offload_params": ["experts"]})]),
        # The same at 4 and 16 concurrent requests (more experts per step, still over PCIe).
        "stock_offload_concurrent": (base, {}, ["--load-format", "dummy", "--bench", "--max-tokens", "16",
                                                "--concurrency", "4,16", "--extra-json",
                                                json.dumps({"cpu_offload_gb": 58, "cpu_offload_params": ["experts"]})]),
        "lvllm_int4": (f"{base}-int4", cpu, ["--load-format", "dummy", "--bench", "--max-tokens", "64"]),
        "lvllm_fp8": (f"{base}-fp8", cpu, ["--load-format", "dummy", "--bench", "--max-tokens", "64"]),
        # The int4 kernel before int8 activations, for the same-run comparison.
        "lvllm_int4_bf16act": (f"{base}-int4", {**cpu, "LVLLM_INT4_ACTIVATIONS": "bf16"},
                               ["--load-format", "dummy", "--bench", "--max-tokens", "64"]),
    }
    for name in variants:
        shape, env, args = runs[name]
        log = logs / f"30b-{name}.log"
        if env:  # where batch-1 time goes (lvllm_cli/moe/timing.py)
            env = {**env, "LVLLM_TIMING_FILE": str(logs / f"30b-{name}-timing.json")}
        r = vllm_run(models[shape], logs / f"30b-{name}.json", log, env, [*args, "--gpu-util", "0.85"])
        if "error" in r:
            report[name] = {"error": r["error"]}
            print(name, "FAILED", r["log_tail"][-2500:], flush=True)
            continue
        report[name] = {"load_s": r["load_s"], "gpu_weights_gib": gib_loaded(log), "bench": r["bench"]}
        if r["bench"][0]["concurrency"] != 1:
            print(name, json.dumps(report[name]), flush=True)
            continue
        b1 = r["bench"][0]["tokens_per_s"]
        streamed = EXPERT_BYTES_PER_TOKEN * STREAMED_BYTES_PER_WEIGHT[shape] / 2
        report[name]["roofline_tokens_per_s"] = round(bw * 1e9 / streamed, 2)
        report[name]["batch1_pct_of_roofline"] = round(100 * b1 / report[name]["roofline_tokens_per_s"], 1)
        t = r.get("timing_batch1")
        if t and t.get("before") and t.get("after"):
            h0, h1 = t["before"]["hostfn"], t["after"]["hostfn"]
            breakdown = {"measured": round(1e3 / b1, 2),
                         "doorbell_worker": h1["doorbell_worker"] - h0["doorbell_worker"],
                         "doorbell_backstop": h1["doorbell_backstop"] - h0["doorbell_backstop"]}
            try:
                breakdown.update(timing.per_token_ms(t["before"], t["after"], LAYERS))
            except ValueError as exc:  # LVLLM_STREAM_SYNC=memops: no host-function timing
                breakdown["host_functions"] = str(exc)
            report[name]["batch1_ms_per_token"] = breakdown
        print(name, json.dumps(report[name]), flush=True)
    if "lvllm_graphs" in report and "stock_offload" in report and "bench" in report.get("stock_offload", {}):
        a = report["lvllm_graphs"]["bench"][0]["tokens_per_s"]
        b = report["stock_offload"]["bench"][0]["tokens_per_s"]
        report["batch1_vs_stock_offload"] = round(a / b, 2)
    for q in ("lvllm_int4", "lvllm_fp8", "lvllm_int4_bf16act"):
        if "bench" in report.get(q, {}) and "bench" in report.get("lvllm_graphs", {}):
            report[f"{q}_vs_bf16_batch1"] = round(report[q]["bench"][0]["tokens_per_s"]
                                                  / report["lvllm_graphs"]["bench"][0]["tokens_per_s"], 2)
    if "bench" in report.get("lvllm_int4", {}) and "bench" in report.get("lvllm_int4_bf16act", {}):
        report["int4_int8act_vs_bf16act_batch1"] = round(report["lvllm_int4"]["bench"][0]["tokens_per_s"]
                                                         / report["lvllm_int4_bf16act"]["bench"][0]["tokens_per_s"], 2)
    (out / f"perf30b-{'-'.join(variants)}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
