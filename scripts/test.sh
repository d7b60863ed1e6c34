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
echo "== browser for the review page's tests (Debian's chromium, first time about 30 s)"
bash scripts/install-browser.sh
echo "== PostgreSQL for the sweep storage test (Debian's package; first time about 30 s)"
bash scripts/install-postgres.sh
echo "== pytest"
# Without arguments this is the full run (CI's): tests/conftest.py then fails the run on any skip or deselection
# of a test not marked gpu, even one hidden in PYTEST_ADDOPTS or addopts. With arguments (a subset by hand:
# tests/unit, -m "not slurm", -k ...) only the skips count.
if [ "$#" -eq 0 ]; then
  export KEELTUNE_FULL_RUN=1
else
  unset KEELTUNE_FULL_RUN
fi
status=0
.venv/bin/python -m pytest -q --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here"
  status=1
fi
exit "$status"
