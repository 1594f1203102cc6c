"""Pretrain a dots.llm1-style MoE model with Megatron-Core: the pretrain_gpt.py of megatron-dots.

    torchrun --nproc-per-node 8 examples/pretrain_dots.py --dots-model dots-mini \
        --tensor-model-parallel-size 1 --expert-model-parallel-size 8 \
        --micro-batch-size 1 --global-batch-size 64 --seq-length 4096 --train-iters 1000 \
        --lr 3e-4 --min-lr 3e-5 --lr-decay-style WSD --lr-warmup-iters 100 \
        --lr-wsd-decay-iters 200 --data-path /data/corpus_text_document \
        --tokenizer-model /models/dots.llm1 --save ckpt --load ckpt --save-interval 200 --bf16

Same flags as `megatron-dots pretrain` (which this calls); `--help` lists them all.
"""

import sys

from megatron_dots.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
