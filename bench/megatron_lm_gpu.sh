#!/usr/bin/env bash
# Megatron-LM's own pretrain() with megatron-dots, a few iterations on one GPU (it needs CUDA;
# on CPU the tests stop at model building). Part of the GPU suite: run it as one command on the
# device machine, e.g.  bash bench/megatron_lm_gpu.sh $OUT
#
# For each release archive in ../shared/megatron-lm/ that this Python can run (core_v0.19.0 and
# main need Python 3.12, as on the device machine; core_v0.16.1 pairs with megatron-core 0.16.1):
#   1. the launcher: --dots-model dots-tiny, bf16, distributed optimizer, 10 iterations;
#   2. --spec (core_v0.19+): stock pretrain_gpt.py with `megatron-dots megatron-lm-args`.
# Each run's log goes to OUT/megatron_lm_<release>_<path>.log; a summary (exit codes, the last
# logged loss) to OUT/megatron_lm.json. Nothing is downloaded. GPU_SUITE_DRY_RUN=1 only prints
# the commands.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-${OUT:-/tmp/megatron_lm_gpu}}"
ARCHIVES="${MEGATRON_LM_ARCHIVES:-$HERE/../../shared/megatron-lm}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
COMMON=(--micro-batch-size 2 --global-batch-size 16 --seq-length 256 --train-iters 10
        --lr 1e-4 --mock-data --tokenizer-type NullTokenizer --vocab-size 500 --bf16
        --use-distributed-optimizer --clip-grad 1.0 --log-interval 1 --eval-iters 0
        --transformer-impl local)
summary="{"
for archive in "$ARCHIVES"/Megatron-LM-*.tar.gz; do
  release="$(basename "$archive" .tar.gz)"; release="${release#Megatron-LM-}"
  tar -xzf "$archive" -C "$WORK"
  root="$WORK/Megatron-LM-$release"
  runs=("launcher")
  [ "$release" != "core_v0.16.1" ] && runs+=("spec")
  for path in "${runs[@]}"; do
    log="$OUT/megatron_lm_${release}_${path}.log"
    if [ "$path" = launcher ]; then
      cmd=(python -m megatron_dots.megatron_lm.launch --dots-model dots-tiny "${COMMON[@]}")
    else
      # shellcheck disable=SC2207
      cmd=(python "$root/pretrain_gpt.py" $(python -m megatron_dots.cli megatron-lm-args dots-tiny)
           --spec megatron_dots.megatron_lm.spec dots_spec "${COMMON[@]}")
    fi
    if [ "${GPU_SUITE_DRY_RUN:-0}" = 1 ]; then echo "MEGATRON_LM_DIR=$root ${cmd[*]}"; continue; fi
    (cd "$root" && MEGATRON_LM_DIR="$root" PYTHONPATH="$root:${PYTHONPATH:-}" \
      timeout 300 torchrun --nproc-per-node 1 --no-python "${cmd[@]}") > "$log" 2>&1
    rc=$?
    loss="$(grep -o 'lm loss: [0-9.E+-]*' "$log" | tail -1 | cut -d' ' -f3)"
    summary+="\"${release}_${path}\": {\"rc\": $rc, \"last_lm_loss\": \"${loss}\"}, "
  done
done
summary="${summary%, }}"
echo "$summary" | tee "$OUT/megatron_lm.json"
rm -rf "$WORK"
