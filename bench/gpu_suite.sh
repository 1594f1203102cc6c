#!/usr/bin/env bash
# The GPU suite: every GPU measurement of this project as one command on one GPU (H100/H200),
# within 8 minutes, no network. See bench/gpu_suite.py for the steps and bench/README.md for
# the targets and how to run it on the device machine:
#
#   bash bench/gpu_suite.sh OUT [--budget-s 480] [--steps layer_bench,pretrain,...]
#   GPU_SUITE_DRY_RUN=1 bash bench/gpu_suite.sh OUT     # every step at smoke size, on CPU
#
# Wheels in .whl/ (megatron-core for the device's Python, see the device README) are installed
# into a private folder first; Megatron-LM archives are read from MEGATRON_LM_ARCHIVES
# (default: .mlm/ when present, else ../shared/megatron-lm). Writes OUT/gpu_suite.json and
# OUT/gpu_suite.md; exits 1 if a step failed or missed a target.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="${1:?usage: bash bench/gpu_suite.sh OUT [options of bench/gpu_suite.py]}"
shift
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-suite-site "$ROOT"/.whl/*.whl || exit 1
  export PYTHONPATH="/tmp/gpu-suite-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${MEGATRON_LM_ARCHIVES:-}" ] && [ -d "$ROOT/.mlm" ]; then
  export MEGATRON_LM_ARCHIVES="$ROOT/.mlm"
fi
exec python3 "$HERE/gpu_suite.py" "$OUT" "$@"
