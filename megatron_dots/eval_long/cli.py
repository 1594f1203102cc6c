"""`megatron-dots eval-long (--ckpt DIR | --hf DIR) --lengths 4096,...`: passkey and multi-key
retrieval at each length x depth, in one process (CPU, tiny models) or under torchrun with TP /
PP / EP (big models). Rank 0 writes eval_long.csv / .json / .png; the numbers do not depend on
the layout."""

import argparse
import os
import sys
from typing import List, Optional

from ..analysis.model_source import add_layout_options
from .haystack import TASKS

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dots eval-long",
        description="Needle-in-a-haystack retrieval on locally generated filler text: a pass "
        "key (passkey) or one of several key/value needles (multikey) at each length and "
        "depth. Reports greedy exact match (the headline) and graded teacher-forced scores "
        "that separate weak models: answer-token accuracy, answer log-prob, and how the true "
        "value ranks by likelihood among --candidates values.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="DIR", help="Megatron torch_dist checkpoint (root with "
                        "latest_checkpointed_iteration.txt, or one iter_*/release directory)")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face dots1 model directory "
                        "(config.json + safetensors)")
    parser.add_argument("--tokenizer", metavar="DIR_OR_FILE", default=None,
                        help="HF tokenizer directory or sentencepiece .model (default: the one "
                        "in --hf, or the checkpoint's hf_assets/)")
    parser.add_argument("--lengths", required=True, metavar="L1,L2,...",
                        help="sequence lengths in tokens, e.g. 4096,8192,16384,32768; each row "
                        "(prompt + answer) has exactly this many tokens; at most the model's "
                        "max_position_embeddings")
    parser.add_argument("--depths", default=DEFAULT_DEPTHS, metavar="D1,D2,...",
                        help="relative needle depths in [0, 1] within the filler (0: right "
                        f"after the instructions, 1: just before the question; default "
                        f"{DEFAULT_DEPTHS})")
    parser.add_argument("--trials", type=int, default=5, metavar="N",
                        help="trials per task x length x depth cell, each with its own filler "
                        "and values (default 5)")
    parser.add_argument("--tasks", default=",".join(TASKS), metavar="T1,T2",
                        help=f"tasks from {', '.join(TASKS)} (default: both)")
    parser.add_argument("--candidates", type=int, default=4, metavar="K",
                        help="values ranked by likelihood per trial, the true one included "
                        "(multikey: the other keys' values first); each costs one forward pass "
                        "per trial; 1 skips the ranking (default 4)")
    parser.add_argument("--keys", type=int, default=4, metavar="N",
                        help="key/value needles per multikey haystack (default 4)")
    parser.add_argument("--digits", type=int, default=5, metavar="N",
                        help="digits of a pass key / value (default 5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the filler, keys, values and needle placement (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (eval_long.csv, eval_long.json, eval_long.png)")
    parser.add_argument("--micro-batch-size", type=int, default=4, metavar="B",
                        help="rows per forward pass (default 4; use 1 for 32K rows of big "
                        "models)")
    add_layout_options(parser, ' and splits the rows')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_args(parser, args) -> None:
    for flag in ("trials", "candidates", "micro_batch_size", "tp", "pp", "ep", "digits"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.keys < 2:
        parser.error("--keys must be at least 2 (one queried key and distractors)")
    if args.digits > 18:
        parser.error("--digits must be at most 18")
    if max(args.candidates, args.keys) > 9 * 10 ** (args.digits - 1) // 2:
        parser.error(f"--candidates {args.candidates} / --keys {args.keys}: too many for the "
                     f"{9 * 10 ** (args.digits - 1)} distinct {args.digits}-digit values "
                     "(raise --digits)")
    if args.keys > 144:
        parser.error("--keys must be at most 144 (distinct key names)")


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _say(text: str, err: bool = False) -> None:
    if _rank() == 0:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _check_lengths(lengths: List[int], cfg, config_file: str) -> None:
    limit = cfg.max_position_embeddings
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ValueError(f"--lengths {too_long[0]} exceeds max_position_embeddings {limit} "
                         f"in {config_file}")


def _tokenizer(args, cfg):
    from ..analysis.domains import default_tokenizer_dir
    from ..data.tokenizer import TokenizerError, load_tokenizer

    path = args.tokenizer or default_tokenizer_dir(args.hf, args.ckpt)
    if path is None:
        raise ValueError(f"no tokenizer next to {args.hf or args.ckpt} (tokenizer.json, "
                         "tokenizer.model or tokenizer_config.json): pass --tokenizer")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TokenizerError(path, f"tokenizer has {tokenizer.vocab_size} ids, more than the "
                             f"model's vocab_size {cfg.vocab_size}: not this model's tokenizer")
    return tokenizer


def _summary_lines(cells, candidates: int) -> List[str]:
    base = (f"   (chance of {candidates} candidates: choice {1 / candidates:.2f}, rank "
            f"{(candidates + 1) / 2:.1f})" if candidates > 1 else "")
    lines = [f"{'task':9} {'length':>7} {'depth':>6} {'exact':>6} {'tokens':>7} {'logprob':>8} "
             f"{'choice':>7} {'rank':>5}{base}"]
    for c in cells:
        lines.append(f"{c.task:9} {c.length:7d} {c.depth:6.2f} {c.accuracy:6.2f} "
                     f"{c.token_accuracy:7.2f} {c.answer_logprob:8.3f} {c.choice_accuracy:7.2f} "
                     f"{c.mean_rank:5.2f}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    from .haystack import HaystackError, parse_choice, parse_depths, parse_lengths

    try:
        lengths = parse_lengths(args.lengths)
        depths = parse_depths(args.depths)
        tasks = parse_choice(args.tasks, TASKS, "--tasks")
    except HaystackError as err:
        parser.error(str(err))
    import torch

    from ..analysis.model_source import Layout, load_model, read_model_config
    from ..config import DotsConfigError
    from ..data.tokenizer import TokenizerError
    from ..storage.errors import FileError
    from ..storage.progress import progress_bar
    from .haystack import HaystackBuilder, HaystackSettings
    from .model_runner import MegatronTailLogits
    from .report import write_outputs
    from .scoring import chance, score_cell

    dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    settings = HaystackSettings(digits=args.digits, keys=args.keys, candidates=args.candidates,
                                seed=args.seed)
    try:
        model_config = read_model_config(args.ckpt, args.hf)
        cfg, config_file = model_config
        _check_lengths(lengths, cfg, config_file)
        tokenizer = _tokenizer(args, cfg)
        builder = HaystackBuilder(tokenizer, settings)
        cells = [(task, length, depth, builder.trials(task, length, depth, args.trials))
                 for task in tasks for length in lengths for depth in depths]
        model = load_model(args.ckpt, args.hf, Layout(args.tp, args.pp, args.ep), dtype,
                           args.expert_backend, model_config)
    except (FileError, DotsConfigError, TokenizerError, HaystackError, ValueError) as err:
        _say(f"error: {err}", err=True)
        return 2
    tail_logits = MegatronTailLogits(model, args.micro_batch_size)
    scores = []
    with progress_bar(len(cells), "eval-long", unit="cell",
                      enabled=not args.no_progress and _rank() == 0) as bar:
        for task, length, depth, trials in cells:
            bar.set_postfix_str(f"{task} L={length} depth={depth:g}")
            scores.append(score_cell(trials, tail_logits))
            bar.update(1)
    if _rank() == 0:
        report_settings = {
            "model": os.path.abspath(model.source), "config_file": config_file,
            "tokenizer": os.path.abspath(tokenizer.path), "tasks": tasks, "lengths": lengths,
            "depths": depths, "trials": args.trials, "candidates": args.candidates,
            "keys": args.keys, "digits": args.digits, "seed": args.seed, "dtype": dtype,
            "layout": {"tp": args.tp, "pp": args.pp, "ep": args.ep,
                       "world": torch.distributed.get_world_size()},
            "max_position_embeddings": cfg.max_position_embeddings}
        paths = write_outputs(args.out, scores, report_settings, chance(args.candidates))
        for line in _summary_lines(scores, args.candidates):
            _say(line)
        _say("wrote " + ", ".join(paths))
    return 0
