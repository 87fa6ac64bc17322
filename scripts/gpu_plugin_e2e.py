"""Stock vLLM vs vLLM + lvllm (routed experts on the CPU) on the same tiny random checkpoints.

    python scripts/gpu_plugin_e2e.py OUTDIR [arch ...]
        archs: lvllm_cli.tiny_models.TINY (default: all of them) and QUANTIZED
        (qwen3_moe_fp8, qwen3_moe_int4, qwen3_moe_gptq, qwen3_moe_awq: the same
        weights with quantized experts; stock vLLM then runs its fp8 / Marlin int4
        kernels, vLLM + lvllm lk_moe's)

For each architecture: stock vLLM generates greedy continuations of fixed
prompts (one at a time, then 16 at once) and scores them; vLLM + lvllm
(CUDA graphs on) scores the same sequences and generates its own.  Reports
the largest per-token logprob difference on the same tokens (teacher forced),
and how many greedy tokens agree.  qwen3_moe is also run with --enforce-eager
and with LVLLM_GPU_LAYERS=0 (layer 0's experts on the GPU, layer 1's on the CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def vllm_run(model: Path, out: Path, log: Path, env_extra: dict, args: list[str]) -> dict:
    env = {**os.environ, **env_extra}
    t = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {model.name} {env_extra or 'stock'} {args}", flush=True)
    with open(log, "w") as f:
        # Own process group: a timeout must also take vLLM's engine-core child (and its GPU memory) down.
        p = subprocess.Popen([sys.executable, str(HERE / "vllm_run.py"), str(model), str(out), *args],
                             env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=int(os.environ.get("LVLLM_RUN_TIMEOUT", "240")))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    if not out.exists():
        tail = log.read_text()[-3000:]
        return {"error": f"exit {rc} after {time.time() - t:.0f}s", "log_tail": tail}
    r = json.loads(out.read_text())
    if rc != 0:  # results complete; the process died at exit (seen: a Triton compile thread at shutdown)
        r["exit_code"] = rc
    return r


def compare(stock: dict, other: dict) -> dict:
    diffs = []
    for a, b in zip(stock["score"]["logprobs"], other["score"]["logprobs"]):
        diffs += [abs(x - y) for x, y in zip(a, b) if x is not None and y is not None]

    def agree(kind):
        same = total = 0
        prefix_diffs = []
        for s, o in zip(stock[kind], other[kind]):
            total += len(s["tokens"])
            for i, (ts, to) in enumerate(zip(s["tokens"], o["tokens"])):
                if ts != to:
                    break
                same += 1
                prefix_diffs.append(abs(s["logprobs"][i] - o["logprobs"][i]))
        return same, total, max(prefix_diffs) if prefix_diffs else 0.0

    s_same, s_total, s_max = agree("single")
    b_same, b_total, b_max = agree("batch")
    return {
        "scored_tokens": len(diffs),
        "max_abs_logprob_diff": round(max(diffs), 4) if diffs else None,
        "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 5) if diffs else None,
        "greedy_single_agree": f"{s_same}/{s_total}", "greedy_single_max_diff": round(s_max, 4),
        "greedy_batch16_agree": f"{b_same}/{b_total}", "greedy_batch16_max_diff": round(b_max, 4),
    }


def main() -> None:
    from lvllm_cli.tiny_models import TINY, write_tiny_model

    out = Path(sys.argv[1])
    archs = sys.argv[2:] or list(TINY)
    work = Path(os.environ.get("LVLLM_E2E_WORK", "/tmp/lvllm-e2e"))
    logs = work / "logs"  # many files: kept out of OUTDIR, which gets the summary
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {"LVLLM_MOE_CPU": "1", "LK_THREADS": os.environ.get("LK_THREADS", "8")}
    report = {}
    for arch in archs:
        model = work / arch
        if not model.exists():
            write_tiny_model(arch, model, seed=1)
        # The GPU host's vLLM kit has no FlashInfer: Qwen3-Next's linear attention then needs vLLM's Triton kernels.
        base = ["--extra-json", json.dumps({"additional_config": {"gdn_prefill_backend": "triton"}})] \
            if arch.startswith("qwen3_next") else []
        stock = vllm_run(model, logs / f"{arch}-stock.json", logs / f"{arch}-stock.log", {}, base)
        if "error" in stock:
            report[arch] = {"stock": stock}
            print(arch, "STOCK FAILED", stock["error"], stock["log_tail"][-1500:], flush=True)
            continue
        seqs = logs / f"{arch}-seqs.json"
        seqs.write_text(json.dumps(stock["score"]["sequences"]))
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        known = {
            "cpu_graphs": (cpu, []),
            "cpu_eager": (cpu, ["--eager"]),
            # int4 experts on bf16 activations (the default is int8 where the CPU has VNNI).
            "cpu_graphs_bf16act": ({**cpu, "LVLLM_INT4_ACTIVATIONS": "bf16"}, []),
            "cpu_layer1_gpu_layer0": ({**cpu, "LVLLM_GPU_LAYERS": "0"}, []),
            # The plugin installed but every layer's experts on the GPU (vLLM's kernels): isolates the CPU engine.
            "plugin_all_gpu": ({**cpu, "LVLLM_GPU_LAYERS": f"0-{layers - 1}"}, []),
            # Stock against itself: how much two identical runs differ (the noise floor of the comparison).
            "stock_again": ({}, []),
            "stock_eager": ({}, ["--eager"]),
        }
        chosen = os.environ.get("LVLLM_E2E_VARIANTS")
        names = chosen.split(",") if chosen else ["cpu_graphs"] + (["cpu_eager", "cpu_layer1_gpu_layer0"]
                                                                   if arch == "qwen3_moe" else [])
        unknown = [n for n in names if n not in known]
        if unknown:
            sys.exit(f"LVLLM_E2E_VARIANTS: unknown {unknown}; known: {', '.join(known)}")
        variants = {n: known[n] for n in names}
        report[arch] = {"stock_load_s": stock["load_s"]}
        for name, (env, args) in variants.items():
            r = vllm_run(model, logs / f"{arch}-{name}.json", logs / f"{arch}-{name}.log", env,
                         [*base, *args, "--score", str(seqs)])
            if "error" in r:
                report[arch][name] = {"error": r["error"]}
                print(arch, name, "FAILED", r["error"], r["log_tail"][-2500:], flush=True)
                continue
            report[arch][name] = {"load_s": r["load_s"], **compare(stock, r)}
            print(arch, name, json.dumps(report[arch][name]), flush=True)
    (out / f"e2e-{'-'.join(archs)}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
