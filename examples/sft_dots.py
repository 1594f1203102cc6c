"""Supervised fine-tuning of a dots model on chat conversations with Megatron-Core.

    megatron-dots convert hf-to-mcore --hf /models/dots.llm1.base --out ckpt/base --ep 8
    torchrun --nproc-per-node 8 examples/sft_dots.py --dots-model dots.llm1 \
        --expert-model-parallel-size 8 --micro-batch-size 1 --global-batch-size 128 \
        --seq-length 8192 --train-iters 2000 --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine \
        --lr-warmup-iters 50 --data-path /data/chat.jsonl --tokenizer-model /models/dots.llm1.inst \
        --load ckpt/base --save ckpt/sft --save-interval 200 --bf16 \
        --dots-sft-length-grouped --dots-recompute-budget-gb 70

Same flags as `megatron-dots sft` (which this calls); `--help` lists them all.
"""

import sys

from megatron_dots.sft.main import main

if __name__ == "__main__":
    sys.exit(main())
