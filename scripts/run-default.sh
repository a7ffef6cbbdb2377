#!/usr/bin/env bash
# The main job: install, then compare plain SFT and distillation replay (replay-kl) on the embedded default
# (SmolLM2-135M-Instruct learning shipped arithmetic data), offline on CPU, and write
# runs/compare/report.md with its plots. Extra arguments are config overrides, e.g. train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/forgetless compare default output_dir=runs/compare "$@"
