#!/usr/bin/env bash
# The test suite: install, then run pytest on CPU (tiny local models + the embedded default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
