#!/usr/bin/env bash
# Prepare megatron-core 0.19.2 (+ triton, which 0.19 imports unconditionally) in a directory that
# shadows the installed megatron-core via PYTHONPATH; the installed release is left untouched.
# Idempotent. Network: PyPI only (pip download). Usage: setup_mcore019.sh [DIR] (default /tmp/mc019)
set -euo pipefail
DIR="${1:-/tmp/mc019}"
MCORE_VERSION="${MCORE_VERSION:-0.19.2}"
TRITON_VERSION="${TRITON_VERSION:-3.9.0}"
PY="${PYTHON:-python3}"
SITE="$DIR/site"
mkdir -p "$DIR/wheels" "$SITE"

if ! PYTHONPATH="$SITE" "$PY" -c "import sys, megatron.core as m; sys.exit(m.__version__ != '$MCORE_VERSION')" 2>/dev/null; then
  # The wheel is tagged cp312 (Requires-Python >=3.12) but is pure Python apart from
  # megatron/core/datasets/helpers_cpp*.so; unpack it instead of installing it so it also
  # loads on Python 3.11 (the dataset helpers are rebuilt for this Python below).
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR/wheels" "megatron-core==$MCORE_VERSION"
  rm -rf "$SITE/megatron"
  "$PY" -m zipfile -e "$DIR"/wheels/megatron_core-"$MCORE_VERSION"-*.whl "$DIR/unpacked"
  cp -r "$DIR/unpacked/megatron" "$SITE/"
fi

# GPTDataset's index helpers, compiled for this Python from the wheel's own helpers.cpp.
bash "$(dirname "$0")/build_dataset_helpers.sh" "$SITE"

if ! PYTHONPATH="$SITE" "$PY" -c "import triton" 2>/dev/null; then
  # CPU torch wheels do not bring triton; `import triton` works without a GPU.
  "$PY" -m pip download --no-deps --only-binary=:all: -d "$DIR/wheels" "triton==$TRITON_VERSION"
  "$PY" -m pip install --no-deps --no-index --upgrade --target "$SITE" "$DIR"/wheels/triton-"$TRITON_VERSION"-*.whl
fi

PYTHONPATH="$SITE" "$PY" -W ignore -c "import megatron.core as m; print('megatron-core', m.__version__, 'from', m.__file__)"
echo "export PYTHONPATH=$SITE  # then run python / pytest as usual"
