#!/usr/bin/env bash
# The prepared GPU check: on a CUDA machine that has torch, transformers, peft and accelerate and no
# network, in under 7 minutes:
#   a. the GPU tests (tests/test_gpu.py: every model and batch of train / eval / compare on the GPU,
#      model.dtype auto = bfloat16, peak memory from torch.cuda.max_memory_allocated; the shipped FSDP2 config
#      launched as one process equals a plain run for SFT and KL+replay, LfU refused there) and the precision
#      tests (tests/test_precision.py: bf16 evaluation, QLoRA 4-/8-bit when bitsandbytes is there);
#   b. bench/bench.py on a randomly initialised 1.2B Llama (bench/models/llama-1b.json) in bf16,
#      batch 8 x 512, for sft, sft_chunked (train.loss_chunk 256), trl_sft (when TRL is there), lfu_lora, lfu_reps, the cheap LfU settings
#      (lfu_rows50, lfu_every2, lfu_r50_e2), kl, kl_cached, replay, kl_replay -> bench/results_gpu.json (device name and versions included);
#   c. an end-to-end train + evaluate of a tiny model that asserts nothing ran on the CPU (in a);
#   d. plain SFT's step on the same shape with each decoder layer torch.compile'd, and with eager attention
#      (b is SDPA, transformers' default) -> $OUT/sft_compiled.json, $OUT/sft_eager.json.
# Every bench row has the step's model FLOPs (src/forgetless/flops.py), TFLOP/s and MFU against the device's peak.
# What the image lacks travels as wheels: run `bash scripts/gpu-wheels.sh` first where PyPI is reachable
# (it fills the git-ignored .whl/), and carry .whl along. Logs and results go to $OUT (default gpu-check-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
"$PY" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as md, torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "trl"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
PY
status=0
echo "== a/c: GPU and precision tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_precision.py 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== b: bench, random-init 1.2B Llama, bf16, batch 8 x 512"
# MODEL_CONFIG / SEQ_LEN only to dry-run this script on a CPU with a small shape
timeout 200 "$PY" bench/bench.py --model-config "${MODEL_CONFIG:-bench/models/llama-1b.json}" --bf16 --batch 8 \
  --seq-len "${SEQ_LEN:-512}" --out "$OUT/results_gpu.json" \
  --steps 12 --warmup 2 --methods sft sft_chunked trl_sft lfu_lora lfu_reps lfu_rows50 lfu_every2 lfu_r50_e2 kl kl_cached \
  replay kl_replay 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== d: plain SFT compiled, and with eager attention (MFU of each against b's)"
for variant in compiled eager; do
  flag=$([ $variant = compiled ] && echo --compile || echo "--attn eager")
  timeout 150 "$PY" bench/bench.py --model-config "${MODEL_CONFIG:-bench/models/llama-1b.json}" --bf16 --batch 8 \
    --seq-len "${SEQ_LEN:-512}" --out "$OUT/sft_$variant.json" --steps 12 --warmup 3 --methods sft $flag \
    2>&1 | tee "$OUT/bench_sft_$variant.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
# only a real GPU's figures become bench/results_gpu.json (a CPU dry run leaves it alone)
if [ -f "$OUT/results_gpu.json" ] && "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  cp "$OUT/results_gpu.json" bench/results_gpu.json
fi
echo "gpu-check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
