#!/usr/bin/env bash
# On the GPU host (H100 + 16-core Xeon, see docs/PERFORMANCE.md): build lvllm,
# run the engine tests (the AMX kernels only run there), doctor, and the
# engine benchmark.  Results land in $OUT.
#   bash scripts/gpu_engine_check.sh [quick]
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/lvllm-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$REPO"
python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | grep -v -i warning | tail -3
cd /tmp
lscpu > "$OUT/lscpu.txt"
python3 -c "from lvllm_cli import _lk_moe as m; print('features', m.cpu_features()); print('best', m.best_isa(), m.numa_status())"
python3 -m lvllm_cli doctor --json > "$OUT/doctor.json"; python3 -m lvllm_cli doctor 2>&1 | tail -12
timeout 300 python3 -m pytest -q -x -p no:cacheprovider "$REPO/tests/test_engine.py" "$REPO/tests/test_hostcalls.py" 2>&1 | tail -4
python3 "$REPO/scripts/kernel_microbench.py" 2048 | tee "$OUT/kernels.txt"
if [ "${1:-}" = quick ]; then exit 0; fi
python3 -m lvllm_cli bench moe --json > "$OUT/bench.json" 2> "$OUT/bench.log"; tail -3 "$OUT/bench.log"
python3 -m lvllm_cli bench moe -m qwen3-30b-a3b --prefill 1024 --no-torch --virtual-nodes 2 --json > "$OUT/bench_vn2.json" 2>> "$OUT/bench.log"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for f in ("bench.json", "bench_vn2.json"):
    try:
        d = json.load(open(f"{out}/{f}"))
    except Exception as e:
        print(f, "missing", e); continue
    print(f, "bandwidth", d["bandwidth_gbps"], "GB/s")
    for r in d["rows"]:
        print(f"  {r['model']:15} {r['mode']:8} M={r['tokens']:<5} {r['kernel']:12} {r['us_per_layer']:>9.0f} us "
              f"{r['gbps']:6.1f} GB/s {r['pct_of_bandwidth']:5.1f}%  {r['tflops']:6.2f} TF  torch x{r['torch_ratio']}")
        print("     phases us:", r.get("phases_us"))
PY
