#!/usr/bin/env bash
# Issue #28's presets timed on a GPU in one interleaved run against plain SFT and TRL's SFTTrainer: a random-init
# 1.2B Llama in bf16, batch 8 x 512 (as scripts/gpu-check.sh) -> $OUT/results_gpu_presets.json.
# replay_kl and kl_replay_kl: KL to the initial model on replay rows as inputs (+ KL on the SFT rows); dft / asft:
# token NLL x detached probability (+ KL). Carry .whl (scripts/gpu-wheels.sh) or .whl-ev (WHEELS=.whl-ev, as the
# first call of scripts/gpu-evidence.sh does) for datasets and TRL; run on the lent GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
timeout "${BENCH_TIMEOUT:-200}" "$PY" bench/bench.py --model-config "${MODEL_CONFIG:-bench/models/llama-1b.json}" --bf16 \
  --batch 8 --seq-len "${SEQ_LEN:-512}" --steps "${STEPS:-10}" --warmup 2 --out "$OUT/results_gpu_presets.json" \
  --methods sft trl_sft kl replay_kl kl_replay_kl dft asft 2>&1 | tee "$OUT/bench_presets.log"
