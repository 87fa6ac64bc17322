"""Where batch-1 decode time goes between the GPU stream and the CPU engine.

The plugin's worker writes a snapshot of its cumulative counters (the
engine's `stats()` and the host functions' `hostfn_times()`) to
$LVLLM_TIMING_FILE about once a second.  Two snapshots taken around a
stretch of one-token decode steps give, per generated token:

  gap             GPU work between two CPU layers (attention, router, shared
                  experts, copies) plus the callback thread's dispatch latency
  submit          inside the submit host function (posting the job)
  to_wait         submit returned -> the stream's wait host function started
  wait            inside the wait host function (the engine's remaining work)
  done_to_return  the engine finishing -> the wait returning (wake-up latency)
  engine          submit -> the engine's last worker finishing
  wake_first/last submit -> the first / last worker starting the job

The per-token sum gap + submit + to_wait + wait is the time the stream
spends per token in and around CPU layers; the step boundary (sampling,
scheduling) sits in one gap per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from lvllm_cli.atomic import write_atomically

HOSTFN_FIELDS = ("gap_ns", "submit_ns", "to_wait_ns", "wait_ns", "done_to_return_ns")


def snapshot(engine_stats: Mapping[str, Any], hostfn_times: Mapping[str, Any]) -> dict:
    return {"time": time.time(), "engine": dict(engine_stats), "hostfn": dict(hostfn_times)}


def write_snapshot(path: str | Path, snap: Mapping[str, Any]) -> None:
    write_atomically(path, json.dumps(snap), mode=0o644)


def read_snapshot(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def per_token_ms(before: Mapping[str, Any], after: Mapping[str, Any], cpu_layers: int) -> dict:
    """Milliseconds per generated token between two snapshots of one worker
    (one-token calls only; the engine's own figures cover every call in between)."""
    if cpu_layers < 1:
        raise ValueError(f"cpu_layers must be positive, got {cpu_layers}")
    h0, h1 = before["hostfn"], after["hostfn"]
    calls = h1["calls"] - h0["calls"]
    if calls <= 0:
        raise ValueError("no one-token CPU layer calls between the two snapshots")
    tokens = calls / cpu_layers

    def ms_per_token(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> float:
        return round((b[key] - a[key]) / 1e6 / tokens, 3)

    out = {"tokens": round(tokens, 2), "calls": calls}
    for f in HOSTFN_FIELDS:
        out[f.removesuffix("_ns") + "_ms"] = ms_per_token(h0, h1, f)
    e0, e1 = before["engine"], after["engine"]
    out["engine_ms"] = ms_per_token(e0, e1, "busy_ns")
    for f in ("wake_first", "wake_last"):
        out[f + "_ms"] = ms_per_token(e0["phase_ns"], e1["phase_ns"], f)
    out["engine_calls"] = e1["calls"] - e0["calls"]
    out["stream_ms"] = round(sum(out[f] for f in ("gap_ms", "submit_ms", "to_wait_ms", "wait_ms")), 3)
    return out
