"""`megatron-dots utk`: flags, their checks (exit 2 naming the flag), the build, the summary."""

import argparse
import sys

from ..data.preprocess import PreprocessError
from ..data.tokenizer import TokenizerError, load_tokenizer
from .build import BuildPlan, UtkError, build_utk, input_documents, output_dtype
from .knotting import KnotConfig, KnotStats
from .markers import MarkerError, marker_ids_from_base, marker_ids_from_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dots utk",
        description="Build UtK ('Untie the Knots', arXiv 2409.04774) long-context samples from "
        "a `megatron-dots preprocess` dataset: documents are cut into chunks, the chunks of "
        "several documents are shuffled together, each tagged with document / chunk marker "
        "tokens, and each document's chunk order follows as a backtracing target. Every output "
        "document is exactly --seq-length tokens, so `pretrain --seq-length` on it trains on one "
        "UtK sample per sequence. The output depends on --seed and the flags, not on --workers.")
    parser.add_argument("--input-prefix", required=True, metavar="P",
                        help="input indexed dataset P.bin/P.idx (a preprocess output)")
    parser.add_argument("--output-prefix", required=True, metavar="Q",
                        help="writes Q.bin and Q.idx (the directory must exist; existing files "
                        "of that name are replaced only when the build succeeds)")
    parser.add_argument("--seq-length", type=int, required=True, metavar="L",
                        help="tokens per sample: use the same --seq-length in pretrain")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="HF tokenizer directory holding the UtK marker tokens as special "
                        "tokens (see the error message for how to add them)")
    parser.add_argument("--marker-base", type=int, metavar="ID",
                        help="instead of --tokenizer: the markers take consecutive ids from ID "
                        "(in megatron_dots.utk.markers.marker_names order); ID must lie above "
                        "every id of the data and the markers below the model's vocabulary")
    parser.add_argument("--seed", type=int, default=1234, metavar="S",
                        help="seed of every random choice (default 1234)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="building processes (default 1); the output does not depend on it")
    parser.add_argument("--knot-fraction", type=float, default=0.8, metavar="F",
                        help="share of samples that are knotted, the others stay plain "
                        "concatenated text (default 0.8; the paper used 0.3 and 0.8)")
    parser.add_argument("--docs-per-knot", type=int, default=16, metavar="N",
                        help="most documents whose chunks are shuffled together in one knot "
                        "(default 16; needs <|utk_doc_0|> .. <|utk_doc_N-1|>)")
    parser.add_argument("--min-chunks", type=int, default=2, metavar="N",
                        help="fewest chunks per document, before clipping to the chunk length "
                        "bounds (default 2)")
    parser.add_argument("--max-chunks", type=int, default=3, metavar="N",
                        help="most chunks per document, before clipping (default 3; the paper "
                        "found 2-3 best)")
    parser.add_argument("--chunk-min", type=int, default=64, metavar="T",
                        help="shortest chunk in tokens; a document shorter stays one chunk "
                        "(default 64)")
    parser.add_argument("--chunk-max", type=int, default=4096, metavar="T",
                        help="longest chunk in tokens; longer documents get more chunks "
                        "(default 4096; at least twice --chunk-min)")
    parser.add_argument("--group-samples", type=int, default=256, metavar="N",
                        help="samples' worth of source tokens per work unit (default 256); each "
                        "unit's last sample is padded with <|utk_pad|>. Changes the output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = KnotConfig(args.seq_length, args.knot_fraction, args.docs_per_knot,
                        args.min_chunks, args.max_chunks, args.chunk_min, args.chunk_max)
    for flag, problem in config.validate():
        parser.error(f"{flag}: {problem}")
    if args.workers < 1:
        parser.error("--workers: must be at least 1")
    if args.group_samples < 1:
        parser.error("--group-samples: must be at least 1")
    if (args.tokenizer is None) == (args.marker_base is None):
        parser.error("give exactly one of --tokenizer DIR (marker ids from the tokenizer's "
                     "special tokens) or --marker-base ID (consecutive ids): without either the "
                     "markers' ids would be guesses that can collide with real tokens")
    if args.marker_base is not None and args.marker_base < 0:
        parser.error("--marker-base: must be at least 0")
    if _same_prefix(args.input_prefix, args.output_prefix):
        parser.error("--output-prefix: must differ from --input-prefix")
    try:
        plan = _plan(args, config)
        stats = build_utk(plan, args.output_prefix, args.workers, args.group_samples,
                          not args.no_progress)
    except (MarkerError, TokenizerError) as err:
        print(f"error: {'--tokenizer ' if args.tokenizer else ''}{err}", file=sys.stderr)
        return 2
    except PreprocessError as err:  # a bad --output-prefix
        print(f"error: --output-prefix {err}", file=sys.stderr)
        return 2
    except UtkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.flag else 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(stats, args.output_prefix), flush=True)
    ids = plan.markers.all_ids()
    print(f"utk: {len(ids)} markers, ids {min(ids)}..{max(ids)} (knot {plan.markers.knot}, pad "
          f"{plan.markers.pad}); output dtype {plan.dtype.__name__}", flush=True)
    return 0


def _same_prefix(a: str, b: str) -> bool:
    import os

    return os.path.abspath(a) == os.path.abspath(b)


def _plan(args, config: KnotConfig) -> BuildPlan:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lengths = input_documents(args.input_prefix)
    if len(lengths) and int(lengths.max()) < config.chunk_min and config.knot_fraction > 0:
        raise UtkError(f"{args.input_prefix}: every document is shorter than --chunk-min "
                       f"{config.chunk_min} (longest {int(lengths.max())} tokens): no document "
                       "could be cut into chunks; lower --chunk-min")
    vocab_size, eod = None, None
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
        markers = marker_ids_from_tokenizer(tokenizer, config.docs_per_knot,
                                            config.chunk_markers)
        vocab_size, eod = tokenizer.vocab_size, tokenizer.eod
        markers.check_distinct(eod, where=args.tokenizer)
    else:
        markers = marker_ids_from_base(args.marker_base, config.docs_per_knot,
                                       config.chunk_markers)
    input_dtype = IndexedDataset(args.input_prefix).index.dtype
    return BuildPlan(args.input_prefix, config, markers, args.seed,
                     output_dtype(input_dtype, markers, vocab_size))


def summary(stats: KnotStats, output_prefix: str) -> str:
    total = stats.samples * 1.0 or 1.0
    tokens = stats.source_tokens + stats.marker_tokens + stats.pad_tokens or 1
    return (f"utk: {stats.samples:,} samples ({stats.knotted_samples / total:.1%} knotted, "
            f"{stats.knots:,} knots, {stats.chunks:,} chunks of {stats.pieces:,} document pieces; "
            f"{stats.short_pieces:,} pieces shorter than --chunk-min kept whole, "
            f"{stats.cut_documents:,} documents continued across samples) from "
            f"{stats.documents:,} documents: {stats.source_tokens:,} source tokens, "
            f"{stats.marker_tokens:,} marker tokens ({stats.marker_tokens / tokens:.2%}), "
            f"{stats.pad_tokens:,} padding tokens ({stats.pad_tokens / tokens:.2%}) -> "
            f"{output_prefix}.bin/.idx")
