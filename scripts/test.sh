#!/usr/bin/env bash
# Set up (first time) and run everything CI runs: ruff, the local Slurm test cluster, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== ruff"
.venv/bin/ruff check .
echo "== slurm test cluster (tests/slurm; first time on a machine about 30-45 s)"
bash slurm/local-cluster/install.sh
bash slurm/local-cluster/start.sh
echo "== pytest"
status=0
.venv/bin/python -m pytest -q --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here"
  status=1
fi
exit "$status"
