#!/usr/bin/env bash
# Fill bench/wheels/ (git-ignored) with what the offline single-GPU image lacks, for bench/gpu_check.sh.
# Run on a machine WITH the package index. The image's Python version is not known in advance, so the
# binary (per-Python) wheels are fetched for every version in PY_VERSIONS (default: 3.10 3.11 3.12);
# pure-Python and abi3 wheels once. Fails if the folder ends up over 64 MiB (what a device call may carry).
#
#   bash bench/fetch_gpu_wheels.sh            # PY_VERSIONS="3.11" bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
PY_VERSIONS=${PY_VERSIONS:-"3.10 3.11 3.12"}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
PIP=${PIP:-.venv/bin/pip}
LIMIT_MIB=64
mkdir -p "$WHEELS"

# deepspeed has no wheel on PyPI: build its pure-Python one (ops JIT-build on the GPU machine with nvcc)
if ! ls "$WHEELS"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  "$PIP" wheel --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
fi
# pure Python (or one wheel for every Python): deepspeed's and keeltune's small runtime deps
"$PIP" download --no-deps --only-binary=:all: -d "$WHEELS" \
  bitsandbytes==0.50.2 hjson pydantic annotated-types typing-inspection typing-extensions einops \
  py-cpuinfo rich markdown-it-py mdurl pygments pytest pluggy iniconfig
"$PIP" download --no-deps --only-binary=:all: --platform "$PLATFORM" --python-version 3.11 \
  --implementation cp -d "$WHEELS" ninja psutil
# one wheel per Python version: the compiled ones
for version in $PY_VERSIONS; do
  "$PIP" download --no-deps --only-binary=:all: --platform "$PLATFORM" --python-version "$version" \
    --implementation cp -d "$WHEELS" pydantic-core msgpack pyyaml
done
# pydantic pins one pydantic-core version: check it is the one fetched
ls -1 "$WHEELS"
total=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
echo "bench/wheels: $(ls "$WHEELS"/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MiB ($total bytes)"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
  echo "bench/wheels is over ${LIMIT_MIB} MiB: too big to carry to the device machine" >&2
  exit 1
fi
