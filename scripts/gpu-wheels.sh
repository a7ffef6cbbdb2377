#!/usr/bin/env bash
# Wheels for what the lent GPU machines' image lacks (it has torch, transformers, peft, accelerate and
# no network), and the transformers / peft the test suite pins (the image's transformers 5.17 lacks
# the boolean logits_to_keep the SFT step uses; forgetless falls back to full logits there): downloaded here into .whl/ (git-ignored), installed there by scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2 trl==1.16.0 \
  transformers==5.23.0 peft==0.21.2
du -sh .whl && ls .whl
