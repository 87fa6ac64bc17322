"""Kernel compute speed with data in cache (not a memory benchmark): ns per panel_dot
(32 output rows x K inputs, n tokens) for every kernel family this CPU runs, with
the row stride padded (as the engine does) and not (4 KiB aliased rows).

    python scripts/kernel_microbench.py [K]
"""
import sys

from lvllm_cli import _lk_moe as lk

K = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
print(f"K={K}; GFLOP/s per core = 2*n*32*K / ns")
for isa in ("avx2", "avx512", "avx512_bf16", "amx"):
    if not lk.isa_supported(isa):
        continue
    for n in (1, 8, 16, 32, 64):
        cells = []
        for pad in (32, 0):
            ns = lk.kernel_ns(isa, "bfloat16", n, K, 300, pad)
            cells.append(f"pad{pad:<2} {ns:9.0f} ns {2 * n * 32 * K / ns:7.1f} GF/s")
        print(f"{isa:12} n={n:<3} " + " | ".join(cells))
print("quantized decode kernels: GB/s per core of panel bytes (codes + fp16 scales), data in cache")
for isa in ("avx2", "avx512", "avx512_bf16"):
    if not lk.isa_supported(isa):
        continue
    for kind, G in (("int4", 32), ("int4", 128), ("int4_int8", 32), ("int4_int8", 128), ("fp8", 128)):
        if lk.qkernel_ns(isa, kind, 1, K, G, 1) < 0:
            continue  # int4_int8: the family has no int8 dot product
        panel = K * 32 * (0.5 if kind.startswith("int4") else 1) + K // G * 32 * 2
        cells = []
        for n in (1, 2, 4):
            ns = lk.qkernel_ns(isa, kind, n, K, G, 2000)
            cells.append(f"n={n} {ns:8.0f} ns {panel / ns:6.2f} GB/s")
        print(f"{isa:12} {kind:9} G={G:<4} " + " | ".join(cells))
