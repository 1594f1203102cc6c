"""`megatron-dots sft-preprocess`: tokenize a JSONL file of chat conversations into an SFT cache
directory (token ids + assistant loss mask) and report what it holds."""

import argparse
import sys

from ..data.tokenizer import TokenizerError
from ..storage.errors import DataFileError
from .chat_format import TEMPLATES, ChatFormat
from .prepare import SFTDataset, prepare_sft_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dots sft-preprocess",
        description="Tokenize chat conversations (JSONL, one {\"messages\": [{\"role\", "
        "\"content\"}, ...]} per line) with a chat template into an SFT cache directory: "
        "tokens.npy, loss_mask.npy (1 on assistant replies and their end-of-turn token), "
        "offsets.npy, meta.json. Conversations without an assistant turn are skipped and "
        "counted.",
    )
    parser.add_argument("--input", required=True, metavar="FILE.jsonl",
                        help="JSONL file of conversations; roles system, user, assistant")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="local Hugging Face tokenizer directory; never downloaded")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="cache directory to write (written under a hidden name and renamed "
                        "into place when complete; must not exist or be empty unless "
                        "--overwrite)")
    parser.add_argument("--chat-template", "--dots-chat-template", dest="chat_template",
                        choices=TEMPLATES, default="auto",
                        help="auto: the tokenizer's own chat_template (default); chatml: the "
                        "documented ChatML fallback <|im_start|>ROLE\\nCONTENT<|im_end|>\\n, "
                        "which needs <|im_start|> and <|im_end|> tokens in the tokenizer")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output directory (only once the new one "
                        "is complete)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def report(dataset: SFTDataset) -> str:
    """The counts of a prepared cache, one per line."""
    meta = dataset.meta
    skipped = meta["skipped_no_assistant"]
    lines = meta["skipped_no_assistant_lines"]
    where = f" (lines {', '.join(map(str, lines))}{', ...' if skipped > len(lines) else ''})" \
        if skipped else ""
    share = meta["assistant_tokens"] / meta["tokens"] if meta["tokens"] else 0.0
    return "\n".join([
        f"sft-preprocess: {meta['conversations']:,} conversations kept -> {dataset.path}",
        f"sft-preprocess: {skipped:,} skipped without an assistant turn{where}",
        f"sft-preprocess: {meta['tokens']:,} tokens, {meta['assistant_tokens']:,} assistant "
        f"tokens ({share:.1%}), longest conversation {meta['max_length']:,} tokens",
    ])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        chat_format = ChatFormat(args.tokenizer, args.chat_template)
        dataset = prepare_sft_data(args.input, chat_format, args.output,
                                   progress=not args.no_progress, overwrite=args.overwrite)
    except (DataFileError, TokenizerError, OSError) as err:  # OSError: --output unusable
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(dataset), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
