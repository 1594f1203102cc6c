"""Command-line arguments of `megatron-dots sft`: pretraining's flags (Megatron-LM names) plus
the SFT data flags, validated before any work as `pretrain`'s are."""

import argparse
import os
from typing import List, Optional

from ..training.arguments import ArgumentError, build_parser, validate_args

CHAT_TEMPLATES = ("auto", "chatml")


def build_sft_parser() -> argparse.ArgumentParser:
    parser = build_parser(prog="megatron-dots sft")
    parser.description = (
        "Supervised fine-tuning of a dots model on chat conversations (JSONL of "
        '{"messages": [{"role": ..., "content": ...}]}) with Megatron-Core: loss on assistant '
        "tokens only, variable-length micro-batches. Start from a converted checkpoint with "
        "--load (or --finetune); other flags as `megatron-dots pretrain` (Megatron-LM names).")
    # SFT trains on all conversations unless a validation share is asked for.
    parser.set_defaults(split="100,0,0")
    group = parser.add_argument_group("sft")
    group.add_argument("--dots-chat-template", default="auto", choices=CHAT_TEMPLATES,
                       help="how conversations become tokens: 'auto' = the tokenizer's own "
                       "chat_template (tokenizer_config.json); 'chatml' = the documented "
                       "fallback <|im_start|>ROLE\\nCONTENT<|im_end|>\\n (the tokenizer must "
                       "know <|im_start|> and <|im_end|>)")
    group.add_argument("--dots-sft-pad-multiple", type=int, default=64, metavar="TOKENS",
                       help="each micro-batch is padded to its own longest sample rounded up "
                       "to a multiple of this (at most --seq-length; with --sequence-parallel "
                       "a multiple of --tensor-model-parallel-size); default 64")
    group.add_argument("--dots-sft-overlong", default="truncate", choices=("truncate", "drop"),
                       help="conversations longer than --seq-length + 1 tokens: 'truncate' "
                       "(train on their first --seq-length + 1 tokens) or 'drop'; either way "
                       "the log counts them (default truncate)")
    group.add_argument("--dots-sft-length-grouped", action="store_true",
                       help="sort each global batch by length before cutting it into "
                       "micro-batches (less padding; the batch and its gradient are unchanged)")
    return parser


def check_sft_data(args) -> None:
    """--data-path FILE.jsonl and a Hugging Face tokenizer with the chat template."""
    if args.mock_data:
        raise ArgumentError("--mock-data is not supported by sft: give --data-path FILE.jsonl")
    if not args.data_path or len(args.data_path) != 1:
        raise ArgumentError("sft needs one --data-path FILE.jsonl (conversations, one JSON "
                            "object per line)")
    path = args.data_path[0]
    if not os.path.isfile(path):
        raise ArgumentError(f"--data-path {path}: no such file")
    if args.tokenizer_type not in (None, "HuggingFaceTokenizer"):
        raise ArgumentError(f"sft tokenizes with a chat template: --tokenizer-type "
                            f"{args.tokenizer_type} is not supported (give --tokenizer-model "
                            "HF_DIR)")
    if args.tokenizer_model is None or not os.path.isdir(args.tokenizer_model):
        raise ArgumentError("sft needs --tokenizer-model HF_TOKENIZER_DIR (a local Hugging "
                            "Face tokenizer directory)" + (
                                f"; {args.tokenizer_model} is not a directory"
                                if args.tokenizer_model else ""))
    args.tokenizer_type = "HuggingFaceTokenizer"


def validate_sft_args(args, world_size: int) -> None:
    if args.dots_batch_stages:
        raise ArgumentError("--dots-batch-stages is not supported by sft (the batch schedule "
                            "counts fixed-length samples): give --global-batch-size")
    if args.dots_a2a_overlap:
        raise ArgumentError(
            "--dots-a2a-overlap is not supported by sft: Megatron-Core's overlap schedule runs "
            "the MoE layer as separate nodes that do not pass the padding mask to the router "
            "(models/gpt/fine_grained_callables.py), so the padding of variable-length "
            "micro-batches would count in the router's load statistics and bias updates")
    validate_args(args, world_size, check_data=check_sft_data)
    multiple = args.dots_sft_pad_multiple
    if multiple < 1:
        raise ArgumentError(f"--dots-sft-pad-multiple must be >= 1, got {multiple}")
    tp = args.tensor_model_parallel_size
    if args.sequence_parallel:
        if multiple % tp:
            raise ArgumentError(f"--dots-sft-pad-multiple {multiple} must be a multiple of "
                                f"--tensor-model-parallel-size {tp} with --sequence-parallel "
                                "(each rank holds an equal slice of the sequence)")
        if args.seq_length % tp:
            raise ArgumentError(f"--seq-length {args.seq_length} must be a multiple of "
                                f"--tensor-model-parallel-size {tp} with --sequence-parallel")


def parse_sft_args(argv: Optional[List[str]] = None, world_size: int = 1) -> argparse.Namespace:
    args = build_sft_parser().parse_args(argv)
    validate_sft_args(args, world_size)
    return args
