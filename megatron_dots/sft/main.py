"""`megatron-dots sft`: parse, validate, fine-tune (the training loop of `pretrain` over the
SFT feed)."""

import sys
from typing import List, Optional


def sft(args):
    """Fine-tune as the validated flags say; returns the loop's `TrainResult`."""
    from ..training.loop import train
    from .feed import SFTDataFeed

    return train(args, SFTDataFeed)


def main(argv: Optional[List[str]] = None) -> int:
    from ..training.pretrain import run_training_main
    from .arguments import parse_sft_args

    return run_training_main(argv, parse_sft_args, sft)


if __name__ == "__main__":
    sys.exit(main())
