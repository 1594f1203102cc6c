#!/usr/bin/env bash
# Prepare the megatron-core 0.20.0 of Megatron-LM main (d98e8a6, not on the package index) in a
# directory that shadows the installed megatron-core via PYTHONPATH, from the source archive in
# ../shared/megatron-lm/ (read-only; nothing is downloaded but pybind11). Triton comes from the
# test requirements. Idempotent. Usage: setup_mcore_main.sh [DIR] (default /tmp/mcmain)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${1:-/tmp/mcmain}"
ARCHIVE="${MEGATRON_LM_ARCHIVES:-$HERE/../../shared/megatron-lm}/Megatron-LM-main-d98e8a6.tar.gz"
PY="${PYTHON:-python3}"
SITE="$DIR/site"
if ! PYTHONPATH="$SITE" "$PY" -c "import sys, megatron.core as m; sys.exit(m.__version__ != '0.20.0')" 2>/dev/null; then
  rm -rf "$DIR/src" "$SITE/megatron"
  mkdir -p "$DIR/src" "$SITE/megatron"
  tar -xzf "$ARCHIVE" -C "$DIR/src"
  cp -r "$DIR/src/Megatron-LM-main-d98e8a6/megatron/core" "$SITE/megatron/"
fi
bash "$HERE/build_dataset_helpers.sh" "$SITE"
PYTHONPATH="$SITE" "$PY" -W ignore -c "import megatron.core as m; print('megatron-core', m.__version__, 'from', m.__file__)"
echo "export PYTHONPATH=$SITE  # then run python / pytest as usual"
