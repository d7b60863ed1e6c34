#!/usr/bin/env bash
# keeltune GPU check on a single-GPU machine without network: installs what the image lacks from wheels
# carried in bench/wheels (see bench/fetch_gpu_wheels.sh; git-ignored), then runs bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                  # the full check on the GPU (about 5-6 minutes on one H100)
#   bash bench/gpu_check.sh --tiny --no-install   # CPU logic check, 1-3 minutes on 2 cores
#   bash bench/gpu_check.sh --tests            # the GPU tests (pytest tests/gpu) instead of the benchmark
#
# Every other argument goes to bench/gpu_check.py (--parts, --steps, --micro-batch, ...).
# Results: $OUT/gpu_check.json when $OUT is set, else bench/gpu_check.json; a table at the end. The profile
# part writes gpu_check_profile.json and its Chrome trace gpu_check_profile_trace.json[.gz] beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then  # the first interpreter that has torch
  for candidate in .venv/bin/python python python3; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
PYTHON=${PYTHON:?no python with torch found; set PYTHON}
WHEELS=bench/wheels
install=1
tests=0
args=()
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    --tests) tests=1 ;;
    *) args+=("$arg") ;;
  esac
done

if (( install )); then
  # import name -> requirement; only what is not importable is installed, from the folder only
  missing=()
  for pair in deepspeed:deepspeed==0.19.8 bitsandbytes:bitsandbytes==0.50.2 yaml:pyyaml rich:rich psutil:psutil \
              hjson:hjson pydantic:pydantic einops:einops msgpack:msgpack cpuinfo:py-cpuinfo ninja:ninja \
              pytest:pytest pluggy:pluggy iniconfig:iniconfig; do
    module=${pair%%:*}
    "$PYTHON" -c "import $module" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if (( ${#missing[@]} )); then
    [[ -d "$WHEELS" ]] || { echo "missing ${missing[*]} and no $WHEELS folder (bash bench/fetch_gpu_wheels.sh)" >&2; exit 1; }
    echo "installing from $WHEELS: ${missing[*]}"
    pip=("$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS")
    "${pip[@]}" "${missing[@]}" || "${pip[@]}" --break-system-packages "${missing[@]}"
  fi
fi

command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
"$PYTHON" -c "import torch, transformers, peft; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
if (( tests )); then
  exec "$PYTHON" -m pytest -p no:cacheprovider tests/gpu "${args[@]}"
fi
exec "$PYTHON" bench/gpu_check.py "${args[@]}"
