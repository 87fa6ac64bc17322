"""How long the GPU stream takes to get from one host function to the next (GPU machine, no vLLM).

    python scripts/gpu_hostfn_latency.py [OUT.json]

A CPU MoE layer costs the stream two host functions (submit, wait) plus the
copies around them.  This measures, inside CUDA graphs of 48 "layers" as the
plugin captures them and eagerly, the time between two host functions
(steady clock stamps written by the host functions themselves) with nothing,
with the plugin's copies (D2H of x / ids / weights, H2D of the output), and
with N small kernels in between; and the GPU time of the same kernels alone
(CUDA events) so that the difference is the host-function overhead.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from lvllm_cli.moe import native

LAYERS, HIDDEN, TOPK, REPLAYS = 48, 2048, 8, 30


def main() -> None:
    lk = native.load()
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    slots = torch.zeros(2 * LAYERS, dtype=torch.int64, pin_memory=True)
    x = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (1, TOPK), device=dev, dtype=torch.int32)
    w = torch.rand(1, TOPK, device=dev)
    hx = torch.empty(1, HIDDEN, dtype=torch.bfloat16, pin_memory=True)
    hids = torch.empty(1, TOPK, dtype=torch.int32, pin_memory=True)
    hw = torch.empty(1, TOPK, pin_memory=True)
    hout = torch.randn(1, HIDDEN, dtype=torch.bfloat16, pin_memory=True)
    y = torch.empty_like(x)

    def kernels(n: int):
        for _ in range(n):
            x.mul_(1.0001)

    def stamp(i: int):
        lk.enqueue_stamp(torch.cuda.current_stream().cuda_stream, slots.data_ptr() + 8 * i)

    def gpu_work(copies: bool, n: int):
        # what the stream does between a layer's wait and the next layer's submit: H2D out, GPU work, D2H in
        if copies:
            y.copy_(hout, non_blocking=True)
        kernels(n)
        if copies:
            hx.copy_(x, non_blocking=True)
            hids.copy_(ids, non_blocking=True)
            hw.copy_(w, non_blocking=True)

    def one_layer(i: int, copies: bool, n: int):
        # submit (stamp 2i) ... wait returns (stamp 2i, as if instant) -> gpu_work -> next submit
        gpu_work(copies, n)
        stamp(2 * i + 1)
        if 2 * i + 2 < 2 * LAYERS:
            stamp(2 * i + 2)

    def pattern(copies: bool, n: int):
        stamp(0)
        for i in range(LAYERS):
            one_layer(i, copies, n)

    def gaps() -> tuple[list[float], list[float]]:
        s = slots.tolist()
        return [(s[2 * i + 1] - s[2 * i]) / 1e3 for i in range(LAYERS - 1)], [
            (s[2 * i + 2] - s[2 * i + 1]) / 1e3 for i in range(LAYERS - 1)]

    def gpu_time_us(copies: bool, n: int) -> float:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(g, stream=stream):
                for _ in range(LAYERS):
                    gpu_work(copies, n)
        times = []
        for _ in range(REPLAYS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            g.replay()
            b.record(stream)
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / LAYERS)
        return statistics.median(times[3:])

    report = {"layers": LAYERS, "device": torch.cuda.get_device_name(), "rows": []}
    for copies, n in ((False, 0), (True, 0), (True, 10), (True, 40)):
        for mode in ("graph", "eager"):
            between, back_to_back = [], []
            if mode == "graph":
                g = torch.cuda.CUDAGraph()
                with torch.cuda.stream(stream):
                    with torch.cuda.graph(g, stream=stream):
                        pattern(copies, n)
                for r in range(REPLAYS):
                    g.replay()
                    torch.cuda.synchronize()
                    if r >= 3:
                        a, b = gaps()
                        between += a
                        back_to_back += b
            else:
                for r in range(REPLAYS):
                    with torch.cuda.stream(stream):
                        pattern(copies, n)
                    torch.cuda.synchronize()
                    if r >= 3:
                        a, b = gaps()
                        between += a
                        back_to_back += b
            gpu = gpu_time_us(copies, n)
            row = {"mode": mode, "copies": copies, "kernels": n,
                   "between_us_median": round(statistics.median(between), 1),
                   "between_us_p90": round(sorted(between)[int(0.9 * len(between))], 1),
                   "hostfn_to_hostfn_us_median": round(statistics.median(back_to_back), 1),
                   "gpu_alone_us": round(gpu, 1)}
            row["overhead_us"] = round(row["between_us_median"] - gpu, 1)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
