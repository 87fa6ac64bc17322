"""One vLLM engine run for the plugin's end-to-end checks (run by gpu_plugin_e2e.py / gpu_perf_30b.py).

    python scripts/vllm_run.py MODEL_DIR OUT.json [--eager] [--score SEQS.json] [--bench]
                               [--load-format dummy] [--extra-json '{"cpu_offload_gb": 60}']

Whether lvllm's CPU experts are used is decided by the environment
(LVLLM_MOE_CPU=1), exactly as `lvllm serve` does it.  Writes JSON with:
  generate   greedy continuations (token ids and their logprobs) of fixed
             prompts, one request at a time ("single") and 16 at once ("batch")
  score      the logprob of every token of given sequences (teacher forcing)
  bench      decode tokens/s at 1, 4 and 16 concurrent requests
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


def timing_snapshot() -> dict | None:
    """The plugin worker's counters (LVLLM_TIMING_FILE, rewritten each second): wait for a fresh one."""
    path = os.environ.get("LVLLM_TIMING_FILE")
    if not path:
        return None
    time.sleep(1.5)
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--score")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--gpu-util", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--extra-json", default="{}")
    ap.add_argument("--concurrency", default="1,4,16", help="bench: comma-separated request counts")
    a = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=a.model, dtype="bfloat16", enforce_eager=a.eager, gpu_memory_utilization=a.gpu_util,
        max_model_len=a.max_model_len, max_num_seqs=32, seed=0, load_format=a.load_format,
        compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]},
    )
    kwargs.update(json.loads(a.extra_json))
    t0 = time.time()
    llm = LLM(**kwargs)
    result: dict = {"load_s": round(time.time() - t0, 1), "lvllm": os.environ.get("LVLLM_MOE_CPU") == "1",
                    "eager": a.eager}

    def run(batch, params):
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)

    if not a.bench:
        greedy = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, logprobs=1, detokenize=False, ignore_eos=True)

        def seqs(outs):
            rows = []
            for o in outs:
                c = o.outputs[0]
                rows.append({"prompt": list(o.prompt_token_ids), "tokens": list(c.token_ids),
                             "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
            return rows

        ps = prompts()
        result["single"] = [seqs(run([p], greedy))[0] for p in ps]
        result["batch"] = seqs(run(ps, greedy))
        to_score = json.load(open(a.score)) if a.score else [r["prompt"] + r["tokens"] for r in result["single"]]
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        scored = []
        for o in run(to_score, scoring):
            ids = list(o.prompt_token_ids)
            scored.append([None] + [pl[t].logprob for t, pl in zip(ids[1:], o.prompt_logprobs[1:])])
        result["score"] = {"sequences": to_score, "logprobs": scored}
    else:
        result["bench"] = []
        for conc in (int(c) for c in a.concurrency.split(",")):
            batch = prompts(conc, seed=conc)
            short = SamplingParams(temperature=0.0, max_tokens=16, detokenize=False, ignore_eos=True)
            long = SamplingParams(temperature=0.0, max_tokens=16 + a.max_tokens, detokenize=False, ignore_eos=True)
            run(batch, short)  # warm-up
            t1 = time.perf_counter()
            run(batch, short)
            short_s = time.perf_counter() - t1
            before = timing_snapshot() if conc == 1 else None
            t2 = time.perf_counter()
            run(batch, long)
            decode_s = (time.perf_counter() - t2) - short_s  # the extra max_tokens steps only: prefill cancels out
            if before is not None:
                result["timing_batch1"] = {"before": before, "after": timing_snapshot()}
            result["bench"].append({"concurrency": conc, "decode_tokens": conc * a.max_tokens,
                                    "decode_s": round(decode_s, 3),
                                    "tokens_per_s": round(conc * a.max_tokens / decode_s, 2),
                                    "per_request_tokens_per_s": round(a.max_tokens / decode_s, 2)})
    json.dump(result, open(a.out, "w"))
    print("done", a.out)


if __name__ == "__main__":
    main()
