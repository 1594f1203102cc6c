"""`megatron-dots analyze experts | ablate-shared`: the dots.llm1 report's first analyses on a
Megatron checkpoint or a Hugging Face directory, in one process or under torchrun with TP / PP /
EP (forward only). Rank 0 writes the outputs; the numbers do not depend on the layout.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

from ..storage.atomic import atomic_write_text
from .expert_share import DEAD_SHARE, HOT_SHARE, REPORT_EXPERTS
from .model_source import add_layout_options

DEFAULT_TOKENS = 200_000
DEFAULT_SEQ_LENGTH = 4096


def _common_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="DIR", help="Megatron torch_dist checkpoint (root with "
                        "latest_checkpointed_iteration.txt, or one iter_*/release directory)")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face dots1 model directory "
                        "(config.json + safetensors), e.g. a released dots.llm1 checkpoint")
    parser.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                        help="a domain: a JSONL file with a 'text' field, or a Megatron "
                        "indexed-dataset prefix (PATH.bin / PATH.idx); repeat for each domain")
    parser.add_argument("--tokenizer", metavar="DIR_OR_FILE", default=None,
                        help="HF tokenizer directory or sentencepiece .model for JSONL domains "
                        "(default: the one in --hf, or the checkpoint's hf_assets/)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                        help=f"tokens per domain: whole documents in file order, the last one "
                        f"cut (default {DEFAULT_TOKENS:,}); fewer are used, with a warning, "
                        "when a domain has fewer")
    parser.add_argument("--seq-length", type=int, default=None, metavar="L",
                        help=f"window length: each document is cut into consecutive windows of "
                        f"L tokens (default: {DEFAULT_SEQ_LENGTH} or the model's max positions "
                        "if smaller)")
    parser.add_argument("--micro-batch-size", type=int, default=2, metavar="B",
                        help="windows per forward pass (default 2)")
    add_layout_options(parser)
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap replicates over windows for the 95%% intervals "
                        "(default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dots analyze",
        description="Analyses of a trained dots model on text domains (forward only; run "
        "under torchrun with --tensor/pipeline/expert-model-parallel-size for big models).")
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    experts = sub.add_parser(
        "experts", help="per-domain routed-slot share of every expert: expert_share.csv, "
        "summary.json, heatmap and specialization PNGs",
        description="Count, per domain, MoE layer and expert, the routed slots (top-k "
        "selections after the expert bias, as training routes) and write DIR/expert_share.csv "
        "(domain,layer,expert,share,count), DIR/summary.json (max shares, dead and hot "
        "experts, specialization ratios with bootstrap intervals) and PNGs.")
    _common_options(experts)
    experts.add_argument("--dead-share", type=float, default=None, metavar="S",
                         help="an expert is dead below this share on every domain (default: "
                         f"the dots.llm1 report's {DEAD_SHARE:g} for its {REPORT_EXPERTS} "
                         f"experts, i.e. {DEAD_SHARE * REPORT_EXPERTS:g}/E for E experts)")
    experts.add_argument("--hot-share", type=float, default=None, metavar="S",
                         help="an expert is hot above this mean share (default: the report's "
                         f"{HOT_SHARE:g} for {REPORT_EXPERTS} experts, i.e. "
                         f"{HOT_SHARE * REPORT_EXPERTS:g}/E)")
    ablate = sub.add_parser(
        "ablate-shared", help="loss per domain with the full MoE output, without the shared "
        "experts and without the routed experts: ablation.csv / .json / .png and a verdict",
        description="Mean next-token cross entropy of each domain's windows for the model as "
        "is (full), with every MoE layer's shared-expert output zeroed (no-shared) and with "
        "its routed-expert output zeroed (shared-only). Writes DIR/ablation.csv "
        "(domain,variant,loss,tokens), DIR/ablation.json (paired bootstrap intervals, the "
        "verdict) and DIR/ablation.png.")
    _common_options(ablate)
    return parser


def _check_args(parser, args) -> None:
    for flag in ("tokens", "micro_batch_size", "tp", "pp", "ep", "bootstrap"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("dead_share", "hot_share"):
        if not 0 <= (getattr(args, flag, None) or 0.0) <= 1:
            parser.error(f"--{flag.replace('_', '-')} must lie in [0, 1]")
    if args.seq_length is not None and args.seq_length < 2:
        parser.error("--seq-length must be at least 2 (a window predicts its next tokens)")


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _say(text: str, err: bool = False) -> None:
    if _rank() == 0:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _windows(args, cfg):
    """Every domain's windows (warning about short domains)."""
    from ..data.tokenizer import TokenizerError, load_tokenizer
    from .domains import AnalysisInputError, default_tokenizer_dir, domain_windows, parse_domains

    sources = parse_domains(args.data)
    seq_length = args.seq_length or min(DEFAULT_SEQ_LENGTH, cfg.max_position_embeddings)
    if seq_length > cfg.max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} exceeds the model's max positions "
                         f"({cfg.max_position_embeddings})")
    tokenizer = None
    if any(not s.is_indexed for s in sources):
        path = args.tokenizer or default_tokenizer_dir(args.hf, args.ckpt)
        if path is not None:
            try:
                tokenizer = load_tokenizer(path)
            except TokenizerError as err:
                raise AnalysisInputError(err.path, err.message) from None
            size = tokenizer.vocab_size
            if size > cfg.vocab_size or size < cfg.vocab_size // 2:
                relation = "more" if size > cfg.vocab_size else "under half"
                raise AnalysisInputError(path, f"tokenizer has {size} ids, {relation} than "
                                         f"the model's vocabulary of {cfg.vocab_size}: not this "
                                         "model's tokenizer")
    domains = [domain_windows(s, args.tokens, seq_length, cfg.vocab_size, tokenizer)
               for s in sources]
    for domain in domains:
        if domain.short:
            _say(f"warning: domain {domain.name!r} ({domain.path}) has {domain.tokens_taken:,} "
                 f"tokens, fewer than --tokens {args.tokens:,}: using those", err=True)
    return domains, seq_length


def _token_report(domains, seq_length: int) -> dict:
    return {"seq_length": seq_length, "domains": {
        d.name: {"path": d.path, "tokens_asked": d.tokens_asked, "tokens_taken": d.tokens_taken,
                 "tokens": d.tokens,
                 "predicted": d.predicted, "windows": len(d.windows), "documents": d.documents}
        for d in domains}}


def _run_experts(args, model, domains, seq_length: int) -> List[str]:
    from .expert_share import (ExpertShares, expert_summary, summary_lines,
                               write_expert_share_csv)
    from .figures import plot_share_heatmaps, plot_specialization
    from .forward_pass import run_windows

    counts = [run_windows(model, d.windows, args.micro_batch_size, progress=not args.no_progress,
                          desc=f"experts {d.name}").counts for d in domains]
    if _rank() != 0:
        return []
    result = ExpertShares.from_windows([d.name for d in domains], model.moe_layers, counts)
    scale = REPORT_EXPERTS / model.cfg.num_moe_experts
    summary = expert_summary(
        result, args.bootstrap, args.seed,
        args.dead_share if args.dead_share is not None else DEAD_SHARE * scale,
        args.hot_share if args.hot_share is not None else HOT_SHARE * scale)
    summary["model"] = os.path.abspath(model.source)
    summary["tokens"] = _token_report(domains, seq_length)
    atomic_write_text(os.path.join(args.out, "expert_share.csv"), write_expert_share_csv(result))
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1))
    plot_share_heatmaps(result, os.path.join(args.out, "expert_share.png"))
    plot_specialization(result, os.path.join(args.out, "specialization.png"))
    return summary_lines(summary)


def _run_ablation(args, model, domains, seq_length: int) -> List[str]:
    from .ablation import VARIANTS, DomainLosses, ablation_summary, verdict_lines, \
        write_ablation_csv
    from .figures import plot_ablation
    from .forward_pass import run_windows

    results = []
    for domain in domains:
        sums, predicted = {}, None
        for variant in VARIANTS:
            run = run_windows(model, domain.windows, args.micro_batch_size, count_routing=False,
                              variant=None if variant == "full" else variant,
                              progress=not args.no_progress, desc=f"{variant} {domain.name}")
            sums[variant], predicted = run.loss_sum, run.predicted
        results.append(DomainLosses(domain.name, sums, predicted))
    if _rank() != 0:
        return []
    summary = ablation_summary(results, args.bootstrap, args.seed)
    summary["model"] = os.path.abspath(model.source)
    summary["tokens"] = _token_report(domains, seq_length)
    atomic_write_text(os.path.join(args.out, "ablation.csv"), write_ablation_csv(results))
    atomic_write_text(os.path.join(args.out, "ablation.json"), json.dumps(summary, indent=1))
    plot_ablation(summary, os.path.join(args.out, "ablation.png"))
    return verdict_lines(summary)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    import torch

    from ..config import DotsConfigError
    from ..data.tokenizer import TokenizerError
    from ..storage.errors import FileError
    from .model_source import Layout, load_model, read_model_config

    dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    try:
        model_config = read_model_config(args.ckpt, args.hf)
        domains, seq_length = _windows(args, model_config[0])
        model = load_model(args.ckpt, args.hf, Layout(args.tp, args.pp, args.ep), dtype,
                           args.expert_backend, model_config)
        if _rank() == 0:
            os.makedirs(args.out, exist_ok=True)
        run = _run_experts if args.analysis == "experts" else _run_ablation
        lines = run(args, model, domains, seq_length)
    except (FileError, DotsConfigError, TokenizerError, ValueError) as err:
        _say(f"error: {err}", err=True)
        return 2
    for line in lines:
        _say(line)
    if _rank() == 0:
        _say(f"wrote {args.out}")
    return 0
