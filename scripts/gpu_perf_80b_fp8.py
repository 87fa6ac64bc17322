"""Qwen3-Next-80B-A3B with block-fp8 routed experts (--load-format dummy, experts on the CPU engine):
batch-1 decode tokens/s against the roofline measured in the same run.

    python scripts/gpu_perf_80b_fp8.py OUTDIR

Roofline = the engine threads' read bandwidth / the bytes lk_moe streams per token
(48 layers x 10 experts x 3 x 2048 x 512 fp8 weights + an fp16 scale per 128).
The GPU keeps attention, gated delta-net, shared experts and router in bf16.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_perf_30b import gib_loaded  # noqa: E402
from gpu_plugin_e2e import vllm_run  # noqa: E402

LAYERS, TOPK, H, I = 48, 10, 2048, 512
STREAMED_BYTES_PER_TOKEN = LAYERS * TOPK * 3 * H * I * (1 + 2 / 128)


def main() -> None:
    from lvllm_cli import _lk_moe as lk
    from lvllm_cli.moe import get_engine
    from lvllm_cli.tiny_models import write_model_shape

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("LVLLM_E2E_WORK", "/tmp/lvllm-e2e"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model = work / "qwen3-next-80b-a3b-fp8"
    if not model.exists():
        write_model_shape("qwen3-next-80b-a3b-fp8", model)
    threads = int(os.environ.get("LK_THREADS", "15"))
    bw = lk.read_bandwidth(get_engine(threads=threads), 8 << 30, 5)
    report = {"bandwidth_gbps": round(bw, 1), "threads": threads, "streamed_bytes_per_token": STREAMED_BYTES_PER_TOKEN,
              "roofline_tokens_per_s": round(bw * 1e9 / STREAMED_BYTES_PER_TOKEN, 2),
              "stream_sync": os.environ.get("LVLLM_STREAM_SYNC", "hostfn")}
    print("bandwidth", report, flush=True)
    env = {"LVLLM_MOE_CPU": "1", "LK_THREADS": str(threads)}
    args = ["--load-format", "dummy", "--bench", "--max-tokens", "48", "--concurrency", "1,4", "--gpu-util", "0.85",
            # the GPU host's kit has no FlashInfer: vLLM's Triton kernels for the gated delta-net
            "--extra-json", json.dumps({"additional_config": {"gdn_prefill_backend": "triton"}})]
    log = work / "logs" / "80b-fp8.log"
    r = vllm_run(model, work / "logs" / "80b-fp8.json", log, env, args)
    if "error" in r:
        report["error"] = r["error"]
        print("FAILED", r["log_tail"][-3000:], flush=True)
    else:
        b1 = r["bench"][0]["tokens_per_s"]
        report.update({"load_s": r["load_s"], "gpu_weights_gib": gib_loaded(log),
                       "bench": r["bench"], "batch1_pct_of_roofline": round(100 * b1 / report["roofline_tokens_per_s"], 1)})
    (out / "perf80b-fp8.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
