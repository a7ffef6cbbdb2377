#!/usr/bin/env bash
# The main job: install, then fine-tune the embedded default (SmolLM2-135M-Instruct on shipped
# arithmetic data), offline on CPU. Extra arguments are config overrides, e.g. train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/forgetless train default --overwrite "$@"
