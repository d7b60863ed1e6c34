#!/usr/bin/env bash
# Create .venv with keeltune and its pinned CPU stack (torch 2.13.0 CPU build). Idempotent: a stamp of the
# requirement files skips the install when nothing changed. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
STAMP=$VENV/.keeltune-setup
want=$(cat requirements-cpu.txt pyproject.toml | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the pinned CPU stack (about a minute)"
  pip_quiet() {  # pip, without the notices about local index folders this machine's pip config names
    "$VENV/bin/pip" install --quiet "$@" 2>&1 | { grep -v -e "^WARNING: Location 'file:" || true; }
  }
  pip_quiet --upgrade pip
  # torch first and pinned, so nothing else pulls a multi-GB CUDA build
  pip_quiet "torch==2.13.0"
  pip_quiet -r requirements-cpu.txt
  pip_quiet --no-deps -e .
  # DeepSpeed compiles its ops on first use; build them once here (under a lock), not in every rank later
  "$VENV/bin/python" -m keeltune.sharding.zero3 2>&1 | grep -v -e "Warning" -e "warn(" || true
  echo "$want" > "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"
