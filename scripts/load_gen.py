"""Steady completion load against an OpenAI-compatible server; measures its own token rate.

    python scripts/load_gen.py URL --seconds 30 --concurrency 4 --max-tokens 64 --out load.json

Every finished request is logged with its finish time and completion tokens,
so the rate over any window (e.g. the one `lvllm monitor --once` sampled)
can be computed afterwards: rate_between(log, t0, t1).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request


def model_name(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def worker(url, model, stop_at, max_tokens, log, lock, i):
    n = 0
    while time.time() < stop_at:
        body = json.dumps({"model": model, "prompt": f"request {i}-{n}: tell me about", "max_tokens": max_tokens,
                           "ignore_eos": True, "temperature": 0.0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        t0 = time.time()
        with urllib.request.urlopen(req, timeout=120) as r:
            usage = json.load(r)["usage"]
        with lock:
            log.append({"start": t0, "end": time.time(), "tokens": usage["completion_tokens"]})
        n += 1


def rate_between(log, t0, t1):
    """Tokens/s over [t0, t1], counting each request's tokens spread evenly over its own duration."""
    total = 0.0
    for r in log:
        lo, hi = max(r["start"], t0), min(r["end"], t1)
        if hi > lo:
            total += r["tokens"] * (hi - lo) / (r["end"] - r["start"])
    return total / (t1 - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model = model_name(a.url)
    log, lock = [], threading.Lock()
    stop_at = time.time() + a.seconds
    ts = [threading.Thread(target=worker, args=(a.url, model, stop_at, a.max_tokens, log, lock, i)) for i in range(a.concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    json.dump({"model": model, "requests": log}, open(a.out, "w"))
    print(f"{len(log)} requests, {sum(r['tokens'] for r in log)} tokens")


if __name__ == "__main__":
    main()
