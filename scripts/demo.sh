#!/usr/bin/env bash
# Set up (first time) and run the demo: pretrain a tiny base on Python's docs, fine-tune it, show forgetting.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/keeltune demo "$@"
