#!/usr/bin/env python3
"""How fast does `lvllm gguf merge` go, against what the disk itself can do?

Steps, all in --dir (default: a fresh directory under /tmp):
  1. write a qwen3moe-shaped GGUF of about --size bytes with gguf.GGUFWriter
     (random, incompressible tensor data: a 256 MiB random pool XORed with a
     fresh 64-bit key per tensor, so no two tensors share bytes);
  2. split it into --shards shards with lvllm's splitter, delete the model;
  3. --rounds times, interleaved, the order rotating from round to round,
     each step after `sync` and --settle seconds of quiet (medians reported):
     a. evict the shards from the page cache (fsync + posix_fadvise
        DONTNEED; --warm reads them into it instead: merge drops what it
        has read) and run `lvllm gguf merge` as a
        subprocess: the merge's own time (after validation, fsync included),
        wall time, and peak RSS (the merge process's VmHWM at exit);
     b. copy baseline: evict again, `cat` the shards into one file + fsync
        (what any tool reading and writing these bytes on this disk pays);
     c. disk baseline: write as many random bytes in 1 MiB chunks + fsync
        (only the writes and the fsync are timed);
  4. remove everything (unless --keep) and print a markdown report
     (--json FILE also writes the numbers).

Example: python scripts/bench_gguf_merge.py --size 20G --shards 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GB = 1000**3
MiB = 1024**2
POOL_BYTES = 256 * MiB
# Disk baseline write size: the merge's own buffer size. A buffer that stays
# in the CPU cache copies into the page cache faster: 8 GB written side by
# side on the dev VM, 0.39-0.58 GB/s from a 64 MiB buffer, 0.68-0.69 from
# 1 MiB.
CHUNK = 1 * MiB

# Qwen3-30B-A3B-like shapes (ggml order, ne): hidden 2048, 128 experts of 768
HIDDEN, EXPERTS, EXPERT_FF, VOCAB = 2048, 128, 768, 16384


def parse_size(text: str) -> int:
    from lvllm_cli.gguf_tools import parse_size as ps

    return ps(text)


def machine_description(directory: Path) -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except Exception:
        ram = None
    fs, dev = "unknown", "unknown"
    best = ""
    try:
        real = os.path.realpath(directory)
        for line in open("/proc/mounts"):
            d, mnt, typ = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fs, dev = mnt, typ, d
    except OSError:
        pass
    rotational = None
    name = os.path.basename(dev)
    rot = Path(f"/sys/block/{name}/queue/rotational")
    if rot.exists():
        rotational = rot.read_text().strip() == "1"
    import gguf  # noqa: F401

    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:
        gguf_version = "unknown"
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "ram_bytes": ram, "kernel": platform.release(),
        "filesystem": fs, "device": dev, "mount": best, "rotational_flag": rotational,
        "python": platform.python_version(), "gguf": gguf_version,
        "copy_file_range": hasattr(os, "copy_file_range"),
    }


def evict(paths) -> None:
    """Drop these files from the page cache so the next read comes from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(paths) -> None:
    """Read these files into the page cache (for --warm)."""
    buf = bytearray(1024 * 1024)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def disk_write_baseline(path: Path, size: int, rng: np.random.Generator) -> float:
    """Seconds to write `size` random bytes and fsync them (only I/O is timed)."""
    buf = rng.integers(0, 2**63, size=CHUNK // 8, dtype=np.uint64)
    spent = 0.0
    with open(path, "wb", buffering=0) as f:
        left = size
        while left > 0:
            buf ^= np.uint64(rng.integers(1, 2**63))  # fresh bytes each chunk, untimed
            view = memoryview(buf).cast("B")[: min(CHUNK, left)]
            t0 = time.perf_counter()
            while view:
                n = f.write(view)
                view = view[n:]
            spent += time.perf_counter() - t0
            left -= min(CHUNK, left)
        t0 = time.perf_counter()
        os.fsync(f.fileno())
        spent += time.perf_counter() - t0
    return spent


def disk_direct_baseline(path: Path, size: int, rng: np.random.Generator) -> tuple[int, float] | None:
    """(bytes, seconds) writing random data with O_DIRECT in 64 MiB requests +
    fsync: the device's own sequential write speed, no page cache involved.
    None where O_DIRECT is not supported (tmpfs, some FUSE)."""
    import mmap

    chunk = 64 * MiB
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    words = np.frombuffer(buf, dtype=np.uint64)
    words[:] = rng.integers(0, 2**63, size=words.size, dtype=np.uint64)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return None
    spent, written = 0.0, 0
    try:
        while written < size:
            words ^= np.uint64(rng.integers(1, 2**63))
            t0 = time.perf_counter()
            try:
                written += os.write(fd, buf)
            except OSError:
                return None
            spent += time.perf_counter() - t0
        t0 = time.perf_counter()
        os.fsync(fd)
        spent += time.perf_counter() - t0
    finally:
        os.close(fd)
        del words
        buf.close()
    return written, spent


def tensor_specs(target: int):
    """(name, byte shape, ggml type) of a qwen3moe-like model of about `target` bytes."""
    from gguf import GGMLQuantizationType as QT

    q4k_row = lambda cols: cols // 256 * 144  # noqa: E731
    q8_row = lambda cols: cols // 32 * 34  # noqa: E731
    layer = [
        ("attn_norm.weight", (HIDDEN * 4,), QT.F32),
        ("attn_q.weight", (4096, q8_row(HIDDEN)), QT.Q8_0),
        ("attn_k.weight", (512, q8_row(HIDDEN)), QT.Q8_0),
        ("attn_v.weight", (512, q8_row(HIDDEN)), QT.Q8_0),
        ("attn_output.weight", (HIDDEN, q8_row(4096)), QT.Q8_0),
        ("ffn_norm.weight", (HIDDEN * 4,), QT.F32),
        ("ffn_gate_inp.weight", (EXPERTS, HIDDEN * 4), QT.F32),
        ("ffn_gate_exps.weight", (EXPERTS, EXPERT_FF, q4k_row(HIDDEN)), QT.Q4_K),
        ("ffn_up_exps.weight", (EXPERTS, EXPERT_FF, q4k_row(HIDDEN)), QT.Q4_K),
        ("ffn_down_exps.weight", (EXPERTS, HIDDEN, q4k_row(EXPERT_FF)), QT.Q4_K),
    ]
    per_layer = sum(math.prod(s) for _, s, _ in layer)
    head = [("token_embd.weight", (VOCAB, HIDDEN * 2), QT.F16)]
    tail = [("output_norm.weight", (HIDDEN * 4,), QT.F32), ("output.weight", (VOCAB, q8_row(HIDDEN)), QT.Q8_0)]
    fixed = sum(math.prod(s) for _, s, _ in head + tail)
    n_layers = max(1, round((target - fixed) / per_layer))
    specs = list(head)
    for i in range(n_layers):
        specs += [(f"blk.{i}.{n}", s, t) for n, s, t in layer]
    return specs + tail, n_layers


def write_model(path: Path, target: int, rng: np.random.Generator) -> tuple[int, int]:
    import gguf

    specs, n_layers = tensor_specs(target)
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_name("lvllm-bench-qwen3moe")
    w.add_block_count(n_layers)
    w.add_embedding_length(HIDDEN)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(8)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    for name, shape, qtype in specs:
        w.add_tensor_info(name, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pool = rng.integers(0, 2**63, size=POOL_BYTES // 8, dtype=np.uint64)
    for _, shape, _ in specs:
        n = math.prod(shape)
        words = -(-n // 8)
        pos, left, parts = int(rng.integers(0, pool.size)), words, []
        while left:  # a window of the pool, wrapping around
            take = min(left, pool.size - pos)
            parts.append(pool[pos:pos + take])
            left, pos = left - take, 0
        data = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        data ^= np.uint64(rng.integers(1, 2**63))
        w.write_tensor_data(data.view(np.uint8)[:n].reshape(shape))
    w.close()
    return len(specs), n_layers


# Runs the real CLI and, at exit, prints the process's own VmHWM (peak RSS of
# its address space since exec) and where its lvllm_cli came from. The rusage of a child (wait4,
# RUSAGE_CHILDREN) would also count the parent's pages it shared between fork
# and exec, blaming this script's buffers on the merge.
_MERGE_WRAPPER = """
import atexit, sys
def _report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("LVLLM_BENCH_VMHWM", int(line.split()[1]) * 1024, file=sys.stderr)
    print("LVLLM_BENCH_MODULE", sys.modules["lvllm_cli"].__file__, file=sys.stderr)
atexit.register(_report)
sys.argv = ["lvllm"] + sys.argv[1:]
from lvllm_cli.cli import main
main()
"""


def run_merge(first: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", _MERGE_WRAPPER, "gguf", "merge", str(first), str(out), "-q", "--json"]
    t0 = time.perf_counter()
    # cwd: lvllm_cli comes from sys.path (the installed package, or a checkout
    # named in PYTHONPATH, which the child inherits), not from the cwd
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"merge failed ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout)
    result["wall_seconds"] = wall
    peaks = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("LVLLM_BENCH_VMHWM")]
    result["peak_rss_bytes"] = peaks[-1] if peaks else None
    modules = [line.split(None, 1)[1] for line in proc.stderr.splitlines() if line.startswith("LVLLM_BENCH_MODULE")]
    result["module"] = modules[-1] if modules else None
    return result


def cat_baseline(shards, out: Path) -> float:
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        subprocess.run(["cat", *map(str, shards)], stdout=f, check=True)
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="model size, e.g. 4G or 20G (1000^3)")
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: new one under /tmp)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved merge/cat/disk-write rounds (medians)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of quiet (after sync) before each measurement")
    ap.add_argument("--warm", action="store_true", help="read the shards into the page cache before merge and cat")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    from lvllm_cli.gguf_tools import split

    size = parse_size(args.size)
    work = args.dir or Path(tempfile.mkdtemp(prefix="lvllm-bench-gguf-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 2.2 * size:
        raise SystemExit(f"{work}: {free / GB:.1f} GB free, the benchmark needs about {2.2 * size / GB:.1f} GB")
    rng = np.random.default_rng(args.seed)
    report: dict = {"machine": machine_description(work), "size_arg": args.size, "shards": args.shards,
                    "cold": not args.warm}
    try:
        model = work / "model.gguf"
        t0 = time.perf_counter()
        n_tensors, n_layers = write_model(model, size, rng)
        model_bytes = model.stat().st_size
        print(f"model: {model_bytes / GB:.2f} GB, {n_tensors} tensors, {n_layers} layers "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        report.update(model_bytes=model_bytes, tensors=n_tensors, layers=n_layers)

        t0 = time.perf_counter()
        res = split(model, work / "model-split", max_tensors=-(-n_tensors // args.shards))
        shards = list(res.outputs)
        model.unlink()
        print(f"split into {len(shards)} shards ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        report["shards"] = len(shards)
        # let the disk absorb the split's writes before anything is timed: the
        # first step after it measured half speed whatever it was
        os.sync()
        time.sleep(3 * args.settle)

        # interleaved rounds: a shared or virtual disk drifts, so compare
        # numbers taken side by side and report medians
        merged, cat_out, base = work / "merged.gguf", work / "cat.bin", work / "baseline.bin"
        samples: dict[str, list[float]] = {"merge": [], "merge_wall": [], "cat": [], "disk_write": [], "direct_write": [],
                                           "rss": []}
        merged_bytes = None

        def do_merge():
            nonlocal merged_bytes
            if args.warm:
                warm_up(shards)
            else:
                evict(shards)
            m = run_merge(shards[0], merged)
            merged_bytes = merged.stat().st_size
            merged.unlink()
            samples["merge"].append(merged_bytes / m["seconds"] / GB)
            samples["merge_wall"].append(merged_bytes / m["wall_seconds"] / GB)
            samples["rss"].append(m["peak_rss_bytes"])
            report["merge_module"] = m["module"]
            return f"merge {samples['merge'][-1]:.2f} GB/s (wall {samples['merge_wall'][-1]:.2f}), " \
                   f"peak RSS {m['peak_rss_bytes'] / MiB:.0f} MiB"

        def do_cat():
            if args.warm:
                warm_up(shards)
            else:
                evict(shards)
            secs = cat_baseline(shards, cat_out)
            n = cat_out.stat().st_size
            cat_out.unlink()
            samples["cat"].append(n / secs / GB)
            return f"cat {samples['cat'][-1]:.2f} GB/s"

        def do_write():
            n = sum(p.stat().st_size for p in shards)
            secs = disk_write_baseline(base, n, rng)
            base.unlink()
            samples["disk_write"].append(n / secs / GB)
            return f"disk write {samples['disk_write'][-1]:.2f} GB/s"

        def do_direct():
            got = disk_direct_baseline(base, sum(p.stat().st_size for p in shards), rng)
            base.unlink()
            if got is None:
                return "direct write unsupported"
            samples["direct_write"].append(got[0] / got[1] / GB)
            return f"direct write {samples['direct_write'][-1]:.2f} GB/s"

        steps = [do_merge, do_cat, do_write, do_direct]
        for r in range(args.rounds):
            # rotate the order: a virtual disk absorbs bursts and then pays for
            # them, so whoever runs right after a big write is at a disadvantage
            line = []
            for step in steps[r % len(steps):] + steps[: r % len(steps)]:
                os.sync()
                time.sleep(args.settle)
                line.append(step())
            print(f"round {r + 1}: " + "; ".join(line), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) if v else float("nan") for k, v in samples.items()}
    report.update(
        merged_bytes=merged_bytes, rounds=args.rounds, samples=samples,
        merge_GBps=med["merge"], merge_wall_GBps=med["merge_wall"], cat_GBps=med["cat"],
        disk_write_GBps=med["disk_write"], direct_write_GBps=med["direct_write"],
        merge_peak_rss_bytes=max(samples["rss"]),
        ratio_vs_disk_write=med["merge"] / med["disk_write"], ratio_vs_direct_write=med["merge"] / med["direct_write"],
        ratio_vs_cat=med["merge"] / med["cat"],
    )
    mach = report["machine"]
    rng_of = lambda k: f"{min(samples[k]):.2f}-{max(samples[k]):.2f}" if samples[k] else "n/a"  # noqa: E731
    print(f"""
| model | shards | merge GB/s (wall) | write+fsync GB/s | O_DIRECT write GB/s | cat GB/s | merge / write | merge / O_DIRECT | merge / cat | merge peak RSS | cache |
|---|---|---|---|---|---|---|---|---|---|---|
| {merged_bytes / GB:.2f} GB, {n_tensors} tensors | {len(shards)} | {med['merge']:.2f} ({med['merge_wall']:.2f}) | {med['disk_write']:.2f} | {med['direct_write']:.2f} | {med['cat']:.2f} | {report['ratio_vs_disk_write']:.2f} | {report['ratio_vs_direct_write']:.2f} | {report['ratio_vs_cat']:.2f} | {max(samples['rss']) / MiB:.0f} MiB | {'cold' if report['cold'] else 'warm'} |

medians of {args.rounds} interleaved rounds; ranges (GB/s): merge {rng_of('merge')}, write+fsync {rng_of('disk_write')}, O_DIRECT {rng_of('direct_write')}, cat {rng_of('cat')}
machine: {mach['cpu']}, {mach['cpus']} CPUs, {(mach['ram_bytes'] or 0) / 2**30:.0f} GiB RAM, kernel {mach['kernel']},
{mach['filesystem']} on {mach['device']} (rotational flag {mach['rotational_flag']}), Python {mach['python']}, gguf {mach['gguf']}
merge ran {report.get('merge_module')}""")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
