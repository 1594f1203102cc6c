#!/usr/bin/env bash
# Compile megatron-core's GPTDataset index helpers (C++ with pybind11) for this Python, from the
# helpers.cpp of the megatron-core under SITE, as megatron-core's datasets/Makefile does.
# Idempotent. Network: PyPI only (pybind11). Usage: build_dataset_helpers.sh SITE
set -euo pipefail
SITE="$1"
PY="${PYTHON:-python3}"
if PYTHONPATH="$SITE" "$PY" -c "import megatron.core.datasets.helpers_cpp" 2>/dev/null; then
  exit 0
fi
PYBIND="$SITE/../pybind11"
"$PY" -m pip install --quiet --target "$PYBIND" pybind11
DATASETS="$SITE/megatron/core/datasets"
read -r INCLUDES SUFFIX < <(PYTHONPATH="$PYBIND" "$PY" -c "import pybind11, sysconfig
print(f\"-I{pybind11.get_include()} -I{sysconfig.get_paths()['include']}\".replace(' ', ':'), sysconfig.get_config_var('EXT_SUFFIX'))")
g++ -O3 -Wall -shared -std=c++11 -fPIC ${INCLUDES//:/ } "$DATASETS/helpers.cpp" -o "$DATASETS/helpers_cpp$SUFFIX"
