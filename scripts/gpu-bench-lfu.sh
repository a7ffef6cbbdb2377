#!/usr/bin/env bash
# The cheap LfU settings (issue #18) timed on a GPU in one interleaved run: a random-init 1.2B Llama in bf16,
# batch 8 x 512 (as scripts/gpu-check.sh), against plain SFT -> $OUT/results_gpu_lfu_cheap.json.
# Carry .whl (bash scripts/gpu-wheels.sh) for datasets; run on the lent GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
timeout 280 "$PY" bench/bench.py --model-config "${MODEL_CONFIG:-bench/models/llama-1b.json}" --bf16 --batch 8 \
  --seq-len "${SEQ_LEN:-512}" --steps 12 --warmup 2 --out "$OUT/results_gpu_lfu_cheap.json" \
  --methods sft lfu_lora lfu_lora_early lfu_rows25 lfu_every4 lfu_r50_e2 lfu_r25_e2 lfu_r50_e4 2>&1 | tee "$OUT/bench_lfu_cheap.log"
