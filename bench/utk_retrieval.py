"""Does UtK data help a small model retrieve from its context? A CPU experiment (issue 21).

The recipe's last two pretraining stages at toy scale, twice from the same stage-1 checkpoint:

1. corpus: `demo.local_corpus()` (standard-library docstrings); a byte-level BPE tokenizer
   (`--vocab-size`) that also holds the UtK marker tokens as special tokens; `preprocess`;
2. `utk` of the same dataset at the long length (`--long-seq-length`);
3. stage 1: `pretrain` dots-tiny at `--short-seq-length` for `--short-steps` on the plain data;
4. stage 2, from stage 1's checkpoint (`--pretrained-checkpoint STAGE1 --dots-new-data-stage`),
   `--long-steps` at `--long-seq-length` with the same batch in tokens, once on the UtK data and
   once on the plain data: the same steps, the same number of training tokens, the same seed;
5. `eval-long` of both at `--eval-lengths` and five depths (passkey and multikey).

Both tables go to `--out` (JSON: every cell of both variants; markdown with `--markdown`),
whatever they show. Repeat with `--seeds` for the spread across training seeds.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import markdown_table, write_report  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/utk_retrieval.json",
                        help="JSON report path")
    parser.add_argument("--work", default=None,
                        help="working directory (default: a temporary one, removed)")
    parser.add_argument("--seeds", default="1", help="training seeds, comma-separated")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary")
    parser.add_argument("--short-seq-length", type=int, default=64, help="stage-1 length")
    parser.add_argument("--short-steps", type=int, default=300, help="stage-1 steps")
    parser.add_argument("--long-seq-length", type=int, default=512,
                        help="stage-2 length (also the model's --max-position-embeddings)")
    parser.add_argument("--long-steps", type=int, default=300, help="stage-2 steps")
    parser.add_argument("--batch-tokens", type=int, default=2048,
                        help="tokens per step in both stages")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--chunk-min", type=int, default=16, help="utk --chunk-min")
    parser.add_argument("--chunk-max", type=int, default=96, help="utk --chunk-max")
    parser.add_argument("--docs-per-knot", type=int, default=4, help="utk --docs-per-knot")
    parser.add_argument("--knot-fraction", type=float, default=0.8, help="utk --knot-fraction")
    parser.add_argument("--eval-lengths", default="256,512",
                        help="eval-long --lengths (multikey needs about 180 tokens of "
                        "instructions, needles and question with the 512-token vocabulary)")
    parser.add_argument("--trials", type=int, default=20, help="eval-long --trials")
    parser.add_argument("--candidates", type=int, default=4, help="eval-long --candidates")
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables")
    return parser.parse_args(argv)


def cli(*argv):
    """One `megatron-dots` command in its own process (a fresh Megatron-Core state each)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    command = [sys.executable, "-m", "megatron_dots.cli", *map(str, argv)]
    print("$ megatron-dots " + " ".join(map(str, argv)), flush=True)
    subprocess.run(command, check=True, env=env)


def pretrain_flags(args, seed, seq_length, steps, data, tokenizer, save, lr_warmup):
    return [
        "pretrain", "--dots-model", "dots-tiny", "--tokenizer-model", tokenizer,
        "--max-position-embeddings", args.long_seq_length,
        "--data-path", data, "--split", "100,0,0", "--seq-length", seq_length,
        "--micro-batch-size", args.batch_tokens // seq_length,
        "--global-batch-size", args.batch_tokens // seq_length, "--train-iters", steps,
        "--lr", args.lr, "--min-lr", args.lr / 10, "--lr-decay-style", "WSD",
        "--lr-warmup-iters", lr_warmup, "--lr-wsd-decay-iters", max(1, steps // 5),
        "--seed", seed, "--moe-router-bias-update-rate", "1e-2", "--log-interval", 50,
        "--save", save, "--load", save, "--save-interval", steps,
        "--data-cache-path", os.path.join(os.path.dirname(data), "cache"), "--eval-iters", 0,
    ]


def prepare_data(args, work):
    """Corpus, tokenizer with the markers, the plain dataset and its UtK build."""
    from megatron_dots.data.preprocess import preprocess
    from megatron_dots.data.tokenizer import train_bpe_tokenizer
    from megatron_dots.demo import local_corpus
    from megatron_dots.utk.markers import marker_names

    documents = local_corpus()
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({"text": doc}) + "\n")
    tokenizer = train_bpe_tokenizer(
        documents, os.path.join(work, "tokenizer"), vocab_size=args.vocab_size,
        overwrite=True, special_tokens=marker_names(args.docs_per_knot))
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    plain = preprocess([corpus], tokenizer, os.path.join(work, "data", "corpus"), workers=2,
                       progress=False)["text"]
    utk = os.path.join(work, "data", "utk")
    cli("utk", "--input-prefix", plain, "--output-prefix", utk, "--seq-length",
        args.long_seq_length, "--tokenizer", tokenizer, "--seed", 1234, "--workers", 2,
        "--docs-per-knot", args.docs_per_knot, "--chunk-min", args.chunk_min,
        "--chunk-max", args.chunk_max, "--knot-fraction", args.knot_fraction,
        "--no-progress")
    return tokenizer, plain, utk


def read_cells(csv_path):
    with open(csv_path) as handle:
        return [{k: (v if k == "task" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def run_seed(args, work, seed, tokenizer, plain, utk):
    stage1 = os.path.join(work, f"seed{seed}", "stage1")
    cli(*pretrain_flags(args, seed, args.short_seq_length, args.short_steps, plain, tokenizer,
                        stage1, max(1, args.short_steps // 10)))
    total = args.short_steps + args.long_steps
    results = {}
    for variant, data in (("utk", utk), ("plain", plain)):
        stage2 = os.path.join(work, f"seed{seed}", variant)
        # The stage continues stage 1's iteration count and schedule: --train-iters is the
        # total, the schedule's warmup is over, WSD anneals over the last fifth of stage 2.
        flags = pretrain_flags(args, seed, args.long_seq_length, total, data, tokenizer,
                               stage2, max(1, args.short_steps // 10))
        flags[flags.index("--lr-wsd-decay-iters") + 1] = max(1, args.long_steps // 5)
        flags[flags.index("--save-interval") + 1] = args.long_steps
        cli(*flags, "--pretrained-checkpoint", stage1, "--dots-new-data-stage")
        out = os.path.join(work, f"seed{seed}", f"eval_{variant}")
        cli("eval-long", "--ckpt", stage2, "--tokenizer", tokenizer, "--lengths",
            args.eval_lengths, "--trials", args.trials, "--candidates", args.candidates,
            "--seed", 7, "--out", out, "--no-progress")
        results[variant] = read_cells(os.path.join(out, "eval_long.csv"))
    return results


def table(cells, metric):
    rows = [[c["task"], int(c["length"]), c["depth"], round(c[metric], 3)] for c in cells]
    return markdown_table(["task", "length", "depth", metric], rows)


def main(argv=None):
    args = parse_args(argv)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="utk-retrieval-"))
    os.makedirs(work, exist_ok=True)
    start = time.time()
    tokenizer, plain, utk = prepare_data(args, work)
    runs = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs[seed] = run_seed(args, work, seed, tokenizer, plain, utk)
    report = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "runs": runs,
              "seconds": round(time.time() - start, 1)}
    write_report(report, args.out)
    for seed, result in runs.items():
        for variant, cells in result.items():
            mean = {m: sum(c[m] for c in cells) / len(cells)
                    for m in ("accuracy", "choice_accuracy", "answer_logprob")}
            print(f"seed {seed} {variant}: mean over cells " + ", ".join(
                f"{m} {v:.3f}" for m, v in mean.items()))
            if args.markdown:
                print(table(cells, "choice_accuracy"))
    print(f"report: {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
