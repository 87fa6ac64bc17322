#!/usr/bin/env bash
# On the GPU host: `lvllm serve demo`, one completion, then `lvllm monitor --once --json`
# while scripts/load_gen.py drives steady load; compares the monitor's decode rate
# with the load generator's own over the same window.  Results in $OUT.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/lvllm-out}
PORT=${PORT:-8123}
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT"
cd /tmp
setsid python3 -m lvllm_cli serve demo --port "$PORT" > "$OUT/serve.log" 2>&1 &
echo $! > /tmp/lvllm-serve.pid
for i in $(seq 300); do curl -sf "$URL/health" > /dev/null && break; sleep 1; done
curl -sf "$URL/health" > /dev/null || { echo "server not ready"; tail -40 "$OUT/serve.log"; kill -INT -"$(cat /tmp/lvllm-serve.pid)"; exit 1; }
MODEL=$(curl -s "$URL/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"Hello, my name is\", \"max_tokens\": 16}" | tee "$OUT/completion.json"; echo
python3 "$REPO/scripts/load_gen.py" "$URL" --seconds 35 --concurrency 4 --out "$OUT/load.json" &
LOAD=$!
sleep 8
T0=$(python3 -c "import time; print(time.time())")
python3 -m lvllm_cli monitor "$URL" --once --json --interval 15 > "$OUT/monitor.json"
T1=$(python3 -c "import time; print(time.time())")
wait $LOAD
python3 - "$OUT" "$T0" "$T1" "$REPO" <<'PY'
import json, sys
out, t0, t1, repo = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
sys.path.insert(0, repo + "/scripts")
from load_gen import rate_between
mon = json.load(open(f"{out}/monitor.json"))
log = json.load(open(f"{out}/load.json"))["requests"]
# the monitor's window is the last --interval seconds before it printed
lg = rate_between(log, t1 - 15, t1)
m = mon.get("generation_tokens_per_s")
print("monitor generation tok/s", m, "load generator tok/s", round(lg, 1), "ratio", round(m / lg, 3) if m and lg else None)
print("monitor snapshot:", json.dumps({k: mon.get(k) for k in ("requests_running", "kv_cache_usage", "ttft_p50_s", "itl_p50_s", "itl_p99_s")}))
print("engine figures:", json.dumps({k: v for k, v in mon.items() if "cpu" in k or "engine" in k or "moe" in k})[:800])
json.dump({"monitor_tokens_per_s": m, "load_gen_tokens_per_s": lg}, open(f"{out}/serve_demo_check.json", "w"))
PY
kill -INT -"$(cat /tmp/lvllm-serve.pid)"
for i in $(seq 30); do kill -0 "$(cat /tmp/lvllm-serve.pid)" 2>/dev/null || break; sleep 1; done
tail -5 "$OUT/serve.log"
