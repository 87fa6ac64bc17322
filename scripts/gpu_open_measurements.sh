#!/usr/bin/env bash
# The GPU-host runs still missing for issues 4, 5 and 8 (see docs/NOTES.md), one
# step per device call so each stays under the 10-minute limit:
#
#   bash scripts/gpu_open_measurements.sh STEP       (after the vLLM kit is installed)
#
#   stock-offload   30B shapes under stock vLLM --cpu-offload-gb (the 2x target's baseline)
#   threads         30B decode with the plugin at LK_THREADS=12,14 (is CPU contention the last 5 %?)
#   next            Qwen3-Next tiny checkpoint: stock vs plugin
#   deepseek-v2     DeepSeek-V2 tiny checkpoint: stock vs plugin
#   serve-30b       `lvllm serve` of a Qwen3-30B-A3B config dir with --load-format dummy
#   quant-e2e       tiny Qwen3-MoE with fp8 / int4 experts: stock vLLM vs plugin (issue 8)
#   quant-30b       30B shapes with int4 and fp8 experts, decode vs their rooflines (issue 8)
#   diag            host-function latency (no vLLM), kernels in cache, engine phases at 30B decode
#   perf-30b        30B bf16 + int4 with the per-token timing breakdown (LVLLM_TIMING_FILE)
#   next-diag       Qwen3-Next: stock vs stock again, and plugin with every layer on the GPU
#   quant-gptq-awq  tiny Qwen3-MoE with GPTQ / AWQ experts: stock vLLM vs plugin (issue 8)
#   memops          LVLLM_STREAM_SYNC=memops: tiny Qwen3-MoE stock vs plugin, then 30B bf16 decode
#   memops-int4     LVLLM_STREAM_SYNC=memops: 30B int4 decode
#   perf-80b-fp8    Qwen3-Next-80B-A3B shapes with fp8 experts on the CPU: decode vs roofline (issue 8)
#   int8-engine     int4 on int8 activations: kernels in cache, engine decode at 30B shapes vs bf16 activations
#   int8-engine-g32 the same at group 32 (the 30B int4 checkpoint's)
#   int8-prefetch   LK_Q4_PREFETCH sweep (LK_PREFETCH_SWEEP, default 0 256 512 1024 2048 0 bytes): int4, fp8, bf16
#   int8-30b        30B int4 decode in vLLM, int8 activations vs bf16 activations (same run)
#   int8-e2e        tiny int4 / GPTQ checkpoints: stock vs plugin on int8 activations, and on bf16 activations
#   next-dump       Qwen3-Next: stock vs plugin, both scored against float32 here (fp32_reference_score.py,
#                   where this host's transformers has Qwen3-Next), and the model + both scored runs
#                   copied to $OUT (to score them on any CPU machine otherwise)
#
# Output goes to $OUT with tee, never through grep (a killed pipeline returns nothing).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/lvllm-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-/root/gpu-kit-site} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
# vLLM processes left by a previous call that the device tool killed hold GPU memory.
for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do kill -9 "$p"; done
cd "$REPO"
case "${1:-}" in
  stock-offload) LVLLM_RUN_TIMEOUT=560 python3 scripts/gpu_perf_30b.py "$OUT" stock_offload 2>&1 | tee "$OUT/stock_offload.log" ;;
  threads)
    for t in 12 14; do
      LK_THREADS=$t LVLLM_RUN_TIMEOUT=270 python3 scripts/gpu_perf_30b.py "$OUT/threads-$t" lvllm_graphs 2>&1 | tee "$OUT/threads-$t.log"
    done ;;
  next) LVLLM_RUN_TIMEOUT=280 python3 scripts/gpu_plugin_e2e.py "$OUT" qwen3_next 2>&1 | tee "$OUT/e2e-next.log" ;;
  deepseek-v2) LVLLM_RUN_TIMEOUT=280 python3 scripts/gpu_plugin_e2e.py "$OUT" deepseek_v2 2>&1 | tee "$OUT/e2e-dsv2.log" ;;
  quant-e2e) LVLLM_RUN_TIMEOUT=200 python3 scripts/gpu_plugin_e2e.py "$OUT" qwen3_moe_fp8 qwen3_moe_int4 2>&1 | tee "$OUT/e2e-quant.log" ;;
  quant-30b) LVLLM_RUN_TIMEOUT=270 python3 scripts/gpu_perf_30b.py "$OUT" lvllm_int4 lvllm_fp8 2>&1 | tee "$OUT/quant-30b.log" ;;
  diag)
    python3 scripts/gpu_hostfn_latency.py "$OUT/hostfn_latency.json" 2>&1 | tee "$OUT/hostfn_latency.log"
    (cd /tmp && python3 "$REPO/scripts/kernel_microbench.py" 2048) 2>&1 | tee "$OUT/kernels.txt"
    (cd /tmp && python3 -m lvllm_cli bench moe -m qwen3-30b-a3b --dtype bfloat16 --dtype int4 --dtype fp8 --decode 1 \
      --prefill 128 --no-torch -t 15 --json) > "$OUT/bench_q.json" 2> "$OUT/bench_q.log"; tail -12 "$OUT/bench_q.log" ;;
  perf-30b) LVLLM_RUN_TIMEOUT=270 python3 scripts/gpu_perf_30b.py "$OUT" lvllm_graphs lvllm_int4 2>&1 | tee "$OUT/perf-30b.log" ;;
  next-diag) LVLLM_E2E_VARIANTS=stock_again,plugin_all_gpu LVLLM_RUN_TIMEOUT=250 \
      python3 scripts/gpu_plugin_e2e.py "$OUT" qwen3_next 2>&1 | tee "$OUT/e2e-next-diag.log" ;;
  quant-gptq-awq) LVLLM_RUN_TIMEOUT=200 python3 scripts/gpu_plugin_e2e.py "$OUT" qwen3_moe_gptq qwen3_moe_awq 2>&1 | tee "$OUT/e2e-gptq-awq.log" ;;
  memops)
    LVLLM_STREAM_SYNC=memops LVLLM_E2E_VARIANTS=cpu_graphs LVLLM_RUN_TIMEOUT=150 \
      python3 scripts/gpu_plugin_e2e.py "$OUT" qwen3_moe 2>&1 | tee "$OUT/e2e-memops.log"
    LVLLM_STREAM_SYNC=memops LVLLM_RUN_TIMEOUT=270 python3 scripts/gpu_perf_30b.py "$OUT" lvllm_graphs 2>&1 | tee "$OUT/perf-memops.log" ;;
  memops-int4) LVLLM_STREAM_SYNC=memops LVLLM_RUN_TIMEOUT=270 python3 scripts/gpu_perf_30b.py "$OUT" lvllm_int4 2>&1 | tee "$OUT/perf-memops-int4.log" ;;
  perf-80b-fp8) LVLLM_RUN_TIMEOUT=560 python3 scripts/gpu_perf_80b_fp8.py "$OUT" 2>&1 | tee "$OUT/perf-80b-fp8.log" ;;
  int8-engine)
    (cd /tmp && python3 "$REPO/scripts/kernel_microbench.py" 2048) 2>&1 | tee "$OUT/kernels.txt"
    (cd /tmp && python3 -m lvllm_cli bench moe -m qwen3-30b-a3b --dtype bfloat16 --dtype int4 --dtype int4-bf16act \
      --dtype fp8 --decode 1 --decode 4 --prefill 128 --no-torch -t 15 --json) > "$OUT/bench_int8.json" 2> "$OUT/bench_int8.log"
    tail -16 "$OUT/bench_int8.log" ;;
  int8-engine-g32)  # the group of the 30B int4 checkpoint gpu_perf_30b serves
    (cd /tmp && python3 -m lvllm_cli bench moe -m qwen3-30b-a3b --dtype bfloat16 --dtype int4 --dtype int4-bf16act \
      --group 32 --decode 1 --decode 4 --prefill 128 --no-torch -t 15 --json) > "$OUT/bench_int8_g32.json" 2> "$OUT/bench_int8_g32.log"
    tail -16 "$OUT/bench_int8_g32.log" ;;
  int8-prefetch)  # LK_Q4_PREFETCH sweep of the int8-activation decode (no vLLM needed)
    for pf in ${LK_PREFETCH_SWEEP:-0 256 512 1024 2048 0}; do
      (cd /tmp && LK_Q4_PREFETCH=$pf python3 -m lvllm_cli bench moe -m qwen3-30b-a3b --dtype int4 --dtype fp8 --dtype bfloat16 \
        --decode 1 --decode 4 --prefill 128 --no-torch -t 15 --json) > "$OUT/pf-$pf.json" 2> "$OUT/pf-$pf.log"
      echo "LK_Q4_PREFETCH=$pf"; grep -E "decode M=|prefill M=" -A1 "$OUT/pf-$pf.log" | tr -s ' ' | paste - - | cut -c1-160
    done ;;
  int8-30b) LVLLM_RUN_TIMEOUT=270 python3 scripts/gpu_perf_30b.py "$OUT" lvllm_int4 lvllm_int4_bf16act 2>&1 | tee "$OUT/int8-30b.log" ;;
  int8-e2e) LVLLM_E2E_VARIANTS=cpu_graphs,cpu_graphs_bf16act LVLLM_RUN_TIMEOUT=200 \
      python3 scripts/gpu_plugin_e2e.py "$OUT" qwen3_moe_int4 qwen3_moe_gptq 2>&1 | tee "$OUT/e2e-int8.log" ;;
  next-dump)
    LVLLM_RUN_TIMEOUT=280 python3 scripts/gpu_plugin_e2e.py "$OUT" qwen3_next 2>&1 | tee "$OUT/e2e-next.log"
    w=${LVLLM_E2E_WORK:-/tmp/lvllm-e2e}
    if python3 -c "import transformers.models.qwen3_next" 2> /dev/null; then
      python3 scripts/fp32_reference_score.py "$w/qwen3_next" "$w/logs/qwen3_next-stock.json" \
        "$w/logs/qwen3_next-cpu_graphs.json" --out "$OUT/next-fp32.json" 2>&1 | tee "$OUT/next-fp32.log"
    else
      echo "this host's transformers has no Qwen3-Next: score the copies in $OUT/next elsewhere" | tee "$OUT/next-fp32.log"
    fi
    # The device tool returns files of a few MB at most: the 17 MB checkpoint goes in 4 MB parts
    # (cat next/model.safetensors.part* > model.safetensors; the tiny model cannot be regenerated
    # bit for bit elsewhere: its random init depends on the torch version).
    mkdir -p "$OUT/next" && cp "$w"/qwen3_next/*.json "$OUT/next/" \
      && split -b 4M "$w/qwen3_next/model.safetensors" "$OUT/next/model.safetensors.part" \
      && cp "$w/logs/qwen3_next-stock.json" "$w/logs/qwen3_next-cpu_graphs.json" "$OUT/next/" ;;
  serve-30b)
    d=/tmp/lvllm-shape-30b
    [ -d "$d" ] || python3 -m lvllm_cli shape qwen3-30b-a3b "$d"
    cd /tmp
    setsid python3 -m lvllm_cli serve "$d" --port 8124 -- --load-format dummy > "$OUT/serve-30b.log" 2>&1 &
    echo $! > /tmp/lvllm-serve30.pid
    for i in $(seq 400); do curl -sf http://127.0.0.1:8124/health > /dev/null && break; sleep 1; done
    curl -s http://127.0.0.1:8124/v1/completions -H 'Content-Type: application/json' \
      -d "{\"model\": \"$d\", \"prompt\": \"Hello\", \"max_tokens\": 16}" | tee "$OUT/serve-30b-completion.json"; echo
    kill -INT -"$(cat /tmp/lvllm-serve30.pid)"
    for i in $(seq 30); do kill -0 "$(cat /tmp/lvllm-serve30.pid)" 2>/dev/null || break; sleep 1; done
    tail -20 "$OUT/serve-30b.log" ;;
  *) sed -n 2,30p "$0"; exit 2 ;;
esac
