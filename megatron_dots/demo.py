"""`megatron-dots demo`: the whole workflow on a tiny dots model, on local text, no network.

1. corpus: the documentation of Python's standard library (docstrings of installed modules),
   one JSON line per docstring;
2. a byte-level BPE tokenizer trained on it (`data.tokenizer.train_bpe_tokenizer`);
3. `megatron-dots preprocess` into a Megatron indexed dataset (two worker processes);
4. `megatron-dots pretrain` of the `dots-tiny` preset: the first half of the steps, a
   checkpoint, then a second run that resumes from it and finishes (validation at the end),
   with a router bias update rate of DEMO_BIAS_UPDATE_RATE (a demo setting: faster than the
   1e-3 default for a 300-step run, so that the aux-loss-free balancing shows within it);
5. the expert-load heatmap, the expert balance over time (max share and imbalance per layer
   against iteration) and the loss curve as PNGs, and the final max share of each MoE layer;
6. `convert mcore-to-hf` with the tokenizer, `compare` (our logits vs transformers'
   `Dots1ForCausalLM` on the export) and a greedy generation with transformers.

Everything is written to `--out` (default: a temporary directory, removed at the end).
"""

import argparse
import importlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from typing import List, Optional

# Standard-library modules whose documentation makes the corpus (present in every CPython).
_CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
    "io", "itertools", "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)

# A demo setting, not a recommendation for real runs: DotsConfig's 1e-3 (the paper does not
# publish its rate) moves a bias by at most 0.3 in 300 steps, too little to balance dots-tiny's
# routers within the demo, which then ends with collapse alarms (layer 4: one expert at 31.5%
# of routed slots, 12.5% uniform). At 1e-2 one alarm fires at iteration 50, every layer stays
# under 14% from iteration 75 on (12.7-12.8% at the end) and the loss ends a little lower;
# 3e-2 and 5e-2 also balance but end with a higher loss and, at 5e-2, sign-update jitter
# (max shares 14-14.5%).
DEMO_BIAS_UPDATE_RATE = 1e-2


def local_corpus(min_bytes: int = 200_000) -> List[str]:
    """Docstrings of standard-library modules, classes and functions, in a fixed order."""
    chunks: List[str] = []
    for name in _CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python: skip what is missing
            continue
        for _, obj in [(name, module)] + sorted(inspect.getmembers(module), key=lambda m: m[0]):
            doc = inspect.getdoc(obj) if (obj is module or getattr(obj, "__module__", None) == name) else None
            if doc and len(doc) > 80:
                chunks.append(doc.strip())
    documents = list(dict.fromkeys(chunks))
    size = sum(len(d.encode("utf-8")) for d in documents)
    if size < min_bytes:
        raise RuntimeError(f"only {size} bytes of local documentation found; need {min_bytes}")
    return documents


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="megatron-dots demo",
        description="Tokenizer, preprocessing, pretraining with a save and resume, expert-load "
        "heatmap, HF export and generation: dots-tiny on local text, CPU or GPU, no network.",
    )
    parser.add_argument("--steps", type=int, default=300,
                        help="optimizer steps in all (default 300); the run saves at half and "
                        "resumes from there")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sample")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per step (gradient accumulation)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=1234, help="random seed")
    parser.add_argument("--bias-update-rate", type=float, default=DEMO_BIAS_UPDATE_RATE,
                        metavar="RATE",
                        help="router expert-bias update rate, passed as pretrain's "
                        f"--moe-router-bias-update-rate (default {DEMO_BIAS_UPDATE_RATE:g}: a "
                        "demo setting, faster than the 1e-3 of DotsConfig so that the "
                        "aux-loss-free balancing acts within a short run)")
    parser.add_argument("--log-interval", type=int, default=25, help="steps between log lines")
    parser.add_argument("--out", default=None,
                        help="directory for everything the demo makes (default: a temporary "
                        "directory, deleted at the end)")
    args = parser.parse_args(argv)
    for flag in ("steps", "seq_length", "micro_batch_size", "micro_batches", "log_interval"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the demo saves at half and resumes)")
    if not (args.bias_update_rate >= 0 and math.isfinite(args.bias_update_rate)):
        parser.error("--bias-update-rate must be a finite number >= 0")
    return args


def pretrain_flags(args, work: str, data_prefix: str, tokenizer_dir: str) -> List[str]:
    """The `megatron-dots pretrain` command line of the demo (printed for the user)."""
    steps = args.steps
    return [
        "--dots-model", "dots-tiny", "--tokenizer-model", tokenizer_dir,
        "--data-path", data_prefix, "--split", "95,5,0",
        "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size * args.micro_batches),
        "--train-iters", str(steps), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        # WSD as in the paper: warmup (10%), stable, linear anneal to 10% of peak (last 20%).
        "--lr-decay-style", "WSD", "--lr-warmup-iters", str(max(1, steps // 10)),
        "--lr-wsd-decay-iters", str(max(1, steps // 5)), "--seed", str(args.seed),
        "--moe-router-bias-update-rate", format(args.bias_update_rate, "g"),
        "--log-interval", str(args.log_interval), "--eval-interval", str(steps),
        "--eval-iters", "4", "--save", os.path.join(work, "ckpt"),
        "--load", os.path.join(work, "ckpt"), "--save-interval", str(steps // 2),
        "--tensorboard-dir", os.path.join(work, "tensorboard"),
        "--data-cache-path", os.path.join(work, "data", "cache"),
    ]


def run(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    import torch

    from .compat.distributed import init_distributed
    from .convert.compare import compare
    from .convert.mcore_to_hf import convert_mcore_to_hf
    from .data.preprocess import preprocess
    from .data.tokenizer import train_bpe_tokenizer
    from .telemetry.balance_plot import plot_expert_balance
    from .telemetry.plots import plot_expert_heatmap, plot_loss_csv
    from .training.arguments import parse_args as parse_pretrain_args
    from .training.loop import pretrain

    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise SystemExit("megatron-dots demo runs as one process: start it without torchrun")
    work = os.path.abspath(args.out or tempfile.mkdtemp(prefix="megatron-dots-demo-"))
    os.makedirs(work, exist_ok=True)
    start = time.time()

    documents = local_corpus()
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({"text": doc}) + "\n")
    tokenizer_dir = train_bpe_tokenizer(documents, os.path.join(work, "tokenizer"),
                                        vocab_size=512, overwrite=True)
    print(f"[1/6] corpus: {len(documents):,} docstrings of the standard library "
          f"({os.path.getsize(corpus):,} bytes) -> {corpus}; byte-level BPE tokenizer "
          f"(512 tokens) -> {tokenizer_dir}", flush=True)
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    prefix = preprocess([corpus], tokenizer_dir, os.path.join(work, "data", "corpus"),
                        workers=2, progress=False)["text"]
    print(f"[2/6] preprocessed -> {prefix}.bin/.idx", flush=True)

    flags = pretrain_flags(args, work, prefix, tokenizer_dir)
    half = args.steps // 2
    print(f"[3/6] megatron-dots pretrain {' '.join(flags)} --exit-interval {half}\n"
          f"      (router bias update rate {args.bias_update_rate:g}: a demo setting, faster "
          "for a run of a few hundred steps; DotsConfig's default for real runs is 1e-3, the "
          "paper does not publish its rate)", flush=True)
    first = pretrain(parse_pretrain_args(flags + ["--exit-interval", str(half)]))
    print(f"[4/6] resuming from {first.saved[-1]}", flush=True)
    second = pretrain(parse_pretrain_args(flags))
    ckpt = os.path.join(work, "ckpt")

    load_csv = os.path.join(ckpt, "expert_load.csv")
    heatmap = plot_expert_heatmap(load_csv, os.path.join(work, "expert_load.png"))
    balance_png = plot_expert_balance(load_csv, os.path.join(work, "expert_balance.png"),
                                      title=f"expert balance, router bias update rate "
                                      f"{args.bias_update_rate:g}")
    loss_png = plot_loss_csv(os.path.join(ckpt, "losses.csv"), os.path.join(work, "loss.png"))
    balance = expert_balance_report(load_csv)
    print(f"[5/6] expert-load heatmap -> {heatmap}; balance over time -> {balance_png}; loss "
          f"curve -> {loss_png}", flush=True)

    hf_dir = convert_mcore_to_hf(ckpt, os.path.join(work, "hf"), tokenizer_dir=tokenizer_dir,
                                 overwrite=True, progress=False)
    check = compare(ckpt, hf_dir, batch=2, seq_length=args.seq_length, seed=args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = "Return a new"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = hf.generate(ids, max_new_tokens=24, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"[6/6] exported to {hf_dir}; transformers vs Megatron logits: max |diff| "
          f"{check.max_abs_diff:.2e}, cosine {check.cosine:.6f}, top-1 agreement "
          f"{check.top1_agreement:.3f}", flush=True)

    losses = first.losses + second.losses
    head, tail = _mean([l for _, l in losses[:10]]), _mean([l for _, l in losses[-10:]])
    valid = second.valid_losses[-1][1] if second.valid_losses else float("nan")
    resume_loss = dict(second.losses).get(half + 1)
    summary = {
        "steps": args.steps, "resumed_at": half, "first_loss": head, "last_loss": tail,
        "valid_loss": valid, "uniform_loss": math.log(512),
        "loss_after_resume": resume_loss, "hf_max_abs_logit_diff": check.max_abs_diff,
        "hf_top1_agreement": check.top1_agreement, "seconds": round(time.time() - start, 1),
        "generation": text, "bias_update_rate": args.bias_update_rate,
        "final_max_share": balance["final_max_share"],
        "alarm_iterations": balance["alarm_iterations"],
    }
    with open(os.path.join(work, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"loss {head:.3f} -> {tail:.3f} (training, mean of 10 steps); held-out loss "
          f"{valid:.3f} (uniform over the vocabulary: {math.log(512):.3f})")
    print(balance["text"])
    print(f"greedy generation: {text!r}")
    if args.out:
        print(f"everything is in {work}: corpus.jsonl, tokenizer/, data/, ckpt/ (with "
              "losses.csv and expert_load.csv), tensorboard/, expert_load.png, "
              f"expert_balance.png, loss.png, hf/, summary.json ({summary['seconds']} s in "
              "all)")
    else:
        shutil.rmtree(work, ignore_errors=True)
        print(f"done in {summary['seconds']} s (pass --out DIR to keep what the demo makes)")
    return summary


def expert_balance_report(csv_path: str) -> dict:
    """The last logged max share of each MoE layer and the iterations that raised an alarm
    (collapsed or dead experts), from the run's expert-load CSV, with a line saying so."""
    from .telemetry.balance_plot import balance_series
    from .telemetry.expert_load import read_expert_load_csv

    records = read_expert_load_csv(csv_path)
    series = balance_series(records)
    final = series.last()
    alarmed = sorted({int(row["iteration"]) for row in records.rows
                      if row["collapsed_experts"] or row["dead_experts"]})
    last_it = int(series.iterations[-1])
    shares = ", ".join(f"layer {layer} {100 * share:.1f}%" for layer, share in final.items())
    logs = len(series.iterations)
    if not alarmed:
        alarms = f"no collapse or dead-expert alarm in any of the {logs} logs"
    else:
        where = (f"iteration {alarmed[0]}" if len(alarmed) == 1
                 else f"iterations {alarmed[0]}-{alarmed[-1]}")
        alarms = f"collapse/dead-expert alarms in {len(alarmed)} of {logs} logs ({where})"
        quiet = sum(1 for it in series.iterations if it > alarmed[-1])
        alarms += (", still at the last log" if alarmed[-1] == last_it else
                   f", none in the last {quiet}: the router bias balanced the load")
    text = (f"expert load at iteration {last_it}: max share {shares} (uniform "
            f"{100 * series.uniform:.3g}%, alarm above {100 * series.collapse_threshold:.3g}%); "
            f"{alarms}")
    return {"final_max_share": {str(layer): share for layer, share in final.items()},
            "alarm_iterations": alarmed, "text": text}


def _mean(values):
    return sum(values) / len(values)


def main(argv=None) -> int:
    summary = run(argv)
    ok = summary["hf_max_abs_logit_diff"] <= 1e-3 and summary["last_loss"] < summary["first_loss"]
    return 0 if ok else 1
