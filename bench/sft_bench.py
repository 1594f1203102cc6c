"""Input-aware activation recompute on an SFT workload: many short conversations, a long tail.

`recompute_bench.py`'s strategies, timing and report on the micro-batches supervised
fine-tuning makes (one dots model on one device, Megatron-Core DDP and Adam, full training
steps of `training.step.train_step`; see that script's docstring for the strategies):

* ``planner``: `RecomputeController` chooses each micro-batch's recompute to fit the budget;
* ``static``: whole-layer recompute of the first N layers for every micro-batch, N the smallest
  for which the planner's fitted memory model predicts that a step of the longest possible
  micro-batches (``--micro-batch-size`` x ``--max-seq`` rounded up to ``--pad-multiple``, as
  `recompute_bench.py` sizes it) fits: what a fixed ``--recompute-method block`` setting must
  be sized for, since any micro-batch may hold a conversation of the maximum length;
* ``full``: every layer recomputed; ``none``: no recompute (may exceed the budget).

Conversation lengths (tokens, seeded; the same for every strategy): with probability
``--tail-share`` (0.15) uniform in [``--tail-min``, ``--max-seq``] (2048..8192), otherwise
log-normal with median ``--median`` (400) and sigma ``--sigma`` (0.7), i.e. 80 % of the short
ones between ~160 and ~980 tokens; all clipped to [``--min-seq``, ``--max-seq``] (16..8192). With
the defaults the median conversation has ~470 tokens, the mean ~1,200, the 90th percentile
~4,100, and the conversations of 2,048 tokens or more (the tail) hold about 66 % of all tokens
(32,000 draws). The script prints the drawn distribution's percentiles.

Each step is a global batch of ``--global-batch`` conversations cut, in order (or after sorting
them by length, longest first, with ``--length-grouped``), into micro-batches of
``--micro-batch-size`` rows. A micro-batch is padded only to its own longest conversation,
rounded up to ``--pad-multiple`` tokens, and is the dict `gpt_forward_step` takes: ``tokens``,
``labels`` (next token), ``loss_mask`` (0 on padding), ``position_ids``, each [b, s].

The planner is calibrated before the workload (``--no-precalibrate``: during it, as in
`recompute_bench.py`): one untimed forward/backward of micro-batches of the longest possible
length (as for ``static``) and of its halves down to ``--pad-multiple`` (at least three lengths),
with every layer recomputed while the memory model measures. A real SFT run knows its maximum
length up front and would do the same once; without it, the workload's steps that bring a new
longest micro-batch are calibration steps, left out of the common steps.

Report per strategy (``--markdown`` as a table): tokens/s counting real tokens (loss-mask 1)
and counting padded tokens, over the common steps; mean step time; peak memory
(`torch.cuda.max_memory_allocated`, null on CPU); steps over the budget, predicted (the
planner's memory model, margin and schedule simulation for the modes the strategy ran, against
the activation budget) and on CUDA measured (the allocator's peak of each step against
``--budget-gb``; an OOM counts); and the planner's speedup over static.

GPU (one H100 / H200, dots-mini; see bench/README.md "SFT workload" for the budget):

    python bench/sft_bench.py --model dots-mini --vocab-size 32000 --max-seq 8192 \\
        --budget-gb 50 --global-batch 16 --steps 8 --warmup 1 --markdown

CPU smoke check (dots-tiny, fp32, one thread (``--cpu-threads``), about 20 s on 2 cores):

    python bench/sft_bench.py --model dots-tiny --max-seq 256 --median 40 --tail-min 96 \\
        --pad-multiple 16 --global-batch 8 --micro-batch-size 2 --steps 4 --warmup 1 \\
        --budget-gb 0.02 --bucket 32 --out /tmp/sft_bench.json --markdown
"""

import argparse
import math
import os
import random
import sys
import time
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build, markdown_table  # noqa: E402
from recompute_bench import (  # noqa: E402
    GIB,
    STRATEGIES,
    finish_report,
    fmt,
    predicted_step_peak,
    print_table,
    run_strategies,
    summarize_runs,
)

PAD_ID = 0


# -- workload ---------------------------------------------------------------------------------
def draw_length(rng: random.Random, args) -> int:
    """One conversation's length (see the module docstring)."""
    if rng.random() < args.tail_share:
        length = rng.randint(args.tail_min, args.max_seq)
    else:
        length = int(round(rng.lognormvariate(math.log(args.median), args.sigma)))
    return min(max(length, args.min_seq), args.max_seq)


def padded_length(lengths: Sequence[int], multiple: int) -> int:
    """A micro-batch's sequence length: its longest sample rounded up to `multiple`."""
    return -(-max(lengths) // multiple) * multiple


def draw_workload(args) -> List[List[List[int]]]:
    """Per step, per micro-batch, the lengths of its conversations (seeded: the same for every
    strategy)."""
    rng = random.Random(args.seed)
    steps = []
    for _ in range(args.steps):
        batch = [draw_length(rng, args) for _ in range(args.global_batch)]
        if args.length_grouped:
            batch.sort(reverse=True)
        size = args.micro_batch_size
        steps.append([batch[i:i + size] for i in range(0, len(batch), size)])
    return steps


def make_micro_batch(lengths: Sequence[int], seq: int, gen: torch.Generator, vocab: int,
                     device) -> Dict[str, torch.Tensor]:
    """Random conversations of these lengths, right-padded to `seq`: tokens, next-token labels,
    loss mask (0 on padding) and position ids, each [len(lengths), seq]."""
    ids = torch.randint(1, vocab, (len(lengths), seq + 1), generator=gen)
    real = torch.arange(seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    tokens = torch.where(real, ids[:, :-1], PAD_ID)
    labels = torch.where(real, ids[:, 1:], PAD_ID)
    positions = torch.arange(seq).expand(len(lengths), seq)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": real.float(),
             "position_ids": positions}
    return {k: v.contiguous().to(device) for k, v in batch.items()}


def sft_step_batches(args, vocab: int, device):
    """`recompute_bench.run_strategy`'s `step_batches` for the SFT workload: ``tokens`` counts
    real tokens, ``padded_tokens`` the micro-batches' full size."""

    def step_batches(step: int, micro_batches: Sequence[Sequence[int]]):
        gen = torch.Generator().manual_seed(args.seed * 100003 + step)
        seqs = [padded_length(m, args.pad_multiple) for m in micro_batches]
        batches = [make_micro_batch(m, s, gen, vocab, device) for m, s in zip(micro_batches, seqs)]
        real = sum(sum(m) for m in micro_batches)
        padded = sum(len(m) * s for m, s in zip(micro_batches, seqs))
        fields = {"seq": seqs, "samples": [list(m) for m in micro_batches], "tokens": real,
                  "padded_tokens": padded}
        label = (f"{len(seqs)} mb, seq {min(seqs)}-{max(seqs)}, {real} tokens "
                 f"({real / padded:.0%} of {padded} padded)")
        return batches, max(seqs), fields, label

    return step_batches


def percentiles(values: Sequence[int], qs=(10, 50, 90, 99)) -> Dict[str, float]:
    ordered = sorted(values)
    out = {f"p{q}": ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] for q in qs}
    out.update(min=ordered[0], max=ordered[-1], mean=sum(ordered) / len(ordered))
    return out


def describe_workload(workload, args) -> Dict[str, object]:
    samples = [n for step in workload for mb in step for n in mb]
    tail = [n for n in samples if n >= args.tail_min]
    seqs = [padded_length(mb, args.pad_multiple) for step in workload for mb in step]
    padded = sum(len(mb) * padded_length(mb, args.pad_multiple) for step in workload for mb in step)
    return {
        "conversations": len(samples),
        "length_percentiles": percentiles(samples),
        "share_at_least_tail_min": len(tail) / len(samples),
        "token_share_at_least_tail_min": sum(tail) / sum(samples),
        "micro_batch_seq_percentiles": percentiles(seqs),
        "longest_micro_batch_seq": max(seqs),
        "real_over_padded_tokens": sum(samples) / padded,
    }


def calibration_lengths(longest: int, multiple: int) -> List[int]:
    """`longest`, its halves down to `multiple` (rounded up to it), at least three lengths."""
    lengths = [longest]
    while lengths[-1] // 2 >= multiple:
        lengths.append(-(-(lengths[-1] // 2) // multiple) * multiple)
    while len(lengths) < 3:
        lengths.append(max(1, lengths[-1] // 2))
    return sorted(set(lengths), reverse=True)


def precalibrate(chunks, args, vocab, device, longest: int):
    """`run_strategies`' `prepare_planner`: one untimed calibration step of the planner."""
    from megatron_dots.training.step import forward_backward

    def prepare(ctl):
        lengths = calibration_lengths(longest, args.pad_multiple)
        gen = torch.Generator().manual_seed(args.seed * 100003 - 1)
        batches = [make_micro_batch([s] * args.micro_batch_size, s, gen, vocab, device)
                   for s in lengths]
        start = time.perf_counter()
        forward_backward(chunks, batches, max(lengths), args.micro_batch_size, recompute=ctl)
        print(f"[planner] calibration before the workload, seq {lengths}: "
              f"{time.perf_counter() - start:.1f} s\n    {ctl.describe(ctl.take_window())}",
              flush=True)

    return prepare


# -- budget checks ------------------------------------------------------------------------------
def strategy_modes(name, layer_counts, static_choice):
    if name == "static":
        n = static_choice["layers"]
        return [["full" if i < n else "none" for i in range(k)] for k in layer_counts]
    return [[name] * k for k in layer_counts]


def over_budget(name, records, ctl, static_choice, layer_counts, args, budget) -> Dict[str, object]:
    """Steps over the budget: predicted (activation peak of the modes the strategy ran; the
    planner's own prediction on its planned steps) and, on CUDA, the allocator's peak of every
    step against --budget-gb (an OOM counts). Adds ``predicted_activation_peak`` to records."""
    from megatron_dots.recompute.shapes import MicroBatchShape

    fitted = ctl is not None and bool(ctl.model.samples)
    predicted = 0
    for r in records:
        if r.get("oom") or not fitted:
            continue
        if name == "planner" and not r.get("calibration"):
            peak = r["predicted_peak"]
        else:
            modes = strategy_modes("full" if name == "planner" else name, layer_counts, static_choice)
            shapes = [MicroBatchShape(len(m), s) for m, s in zip(r["samples"], r["seq"])]
            peak = predicted_step_peak(ctl, modes, shapes, args.bucket)
        r["predicted_activation_peak"] = peak
        predicted += peak > budget
    limit = args.budget_gb * GIB
    measured = [r for r in records if r.get("oom") or r.get("peak_allocated") is not None]
    return {
        "steps": len(records),
        "steps_over_budget_predicted": predicted if fitted else None,
        "steps_over_budget_cuda": (sum(bool(r.get("oom")) or r["peak_allocated"] > limit
                                       for r in measured) if measured else None),
    }


# -- report -----------------------------------------------------------------------------------
HEADER = ["strategy", "status", "tokens/s (real)", "tokens/s (padded)", "step ms",
          "peak GiB", "steps over budget (pred.)", "steps over budget (CUDA)",
          "recomputed layers", "max pred. error"]


def table_rows(results):
    rows = []
    for name, r in results.items():
        if r.get("status") == "skipped":
            rows.append([name, "skipped"] + ["-"] * (len(HEADER) - 2))
            continue
        steps = r["steps_checked"]
        rows.append([
            name, r["status"],
            fmt(r["common_tokens_per_s"], ",.0f"),
            fmt(r["common_padded_tokens_per_s"], ",.0f"),
            fmt(r["common_mean_step_ms"], ".1f"),
            fmt(r["peak_allocated_gib"], ".2f"),
            "-" if r["steps_over_budget_predicted"] is None
            else f"{r['steps_over_budget_predicted']}/{steps}",
            "-" if r["steps_over_budget_cuda"] is None else f"{r['steps_over_budget_cuda']}/{steps}",
            fmt(r["recomputed_layer_share"], ".0%"),
            fmt(r.get("max_prediction_error"), ".1%"),
        ])
    return rows


def speedups(results) -> Dict[str, object]:
    planner, static = results.get("planner", {}), results.get("static", {})

    def ratio(a, b):
        return a / b if a and b else None

    return {
        "planner_over_static_common": ratio(planner.get("common_tokens_per_s"),
                                            static.get("common_tokens_per_s")),
        # Over the same steps (past warmup), the planner's calibration steps included.
        "planner_over_static_incl_calibration": ratio(
            planner.get("tokens_per_s_incl_calibration"), static.get("tokens_per_s")),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dots-mini", help="DotsConfig preset")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--expert-backend", default="sequential")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the preset's vocabulary (default: the preset's)")
    parser.add_argument("--max-seq", type=int, default=8192, help="longest conversation")
    parser.add_argument("--min-seq", type=int, default=16, help="shortest conversation")
    parser.add_argument("--median", type=float, default=400.0,
                        help="median of the log-normal short conversations")
    parser.add_argument("--sigma", type=float, default=0.7, help="sigma of the log-normal")
    parser.add_argument("--tail-share", type=float, default=0.15,
                        help="share of conversations drawn uniformly from the long tail")
    parser.add_argument("--tail-min", type=int, default=2048, help="shortest tail conversation")
    parser.add_argument("--global-batch", type=int, default=16,
                        help="conversations per step (optimizer step)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--pad-multiple", type=int, default=64,
                        help="micro-batches are padded to their longest row rounded up to this")
    parser.add_argument("--length-grouped", action="store_true",
                        help="sort each global batch by length before cutting micro-batches")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per strategy")
    parser.add_argument("--budget-gb", type=float, required=True,
                        help="per-GPU memory budget in GiB (parameters, gradients, Adam state and "
                             "activations)")
    parser.add_argument("--bucket", type=int, default=256, help="planner shape bucket (tokens)")
    parser.add_argument("--no-precalibrate", dest="precalibrate", action="store_false",
                        help="calibrate the planner during the workload instead of before it")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {','.join(STRATEGIES)} (run in this order)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads without CUDA (default 1: CPU timings are a smoke "
                             "check, and one thread keeps them stable on a shared machine; 0: "
                             "torch's default)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="bench/results/sft_bench.json", help="JSON report")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    if "planner" not in strategies or strategies[0] != "planner":
        parser.error("run 'planner' first: 'static' and the predicted budget checks use its "
                     "fitted memory model")
    if not 1 <= args.min_seq <= args.max_seq:
        parser.error("need 1 <= --min-seq <= --max-seq")
    if not args.min_seq <= args.tail_min <= args.max_seq or not 0 < args.median <= args.max_seq:
        parser.error("need --min-seq <= --tail-min <= --max-seq and 0 < --median <= --max-seq")
    if not 0 <= args.tail_share <= 1 or args.sigma < 0:
        parser.error("need 0 <= --tail-share <= 1 and --sigma >= 0")
    if args.global_batch % args.micro_batch_size:
        parser.error("--global-batch must be a multiple of --micro-batch-size")
    # run_strategy / summarize read these recompute_bench names.
    args.micro_batches = args.global_batch // args.micro_batch_size

    from megatron_dots.recompute import activation_budget, static_bytes
    from megatron_dots.recompute.layer import decoder_layers

    workload = draw_workload(args)
    dist = describe_workload(workload, args)
    pct = dist["length_percentiles"]
    seq_pct = dist["micro_batch_seq_percentiles"]
    print(f"SFT workload: {args.steps} steps x {args.global_batch} conversations "
          f"({args.micro_batches} micro-batches x {args.micro_batch_size} rows"
          f"{', length-grouped' if args.length_grouped else ''}, padded to x{args.pad_multiple})")
    print("  conversation length: " + ", ".join(f"{k} {v:,.0f}" for k, v in pct.items())
          + f"; {dist['share_at_least_tail_min']:.0%} >= {args.tail_min} holding "
          f"{dist['token_share_at_least_tail_min']:.0%} of the tokens")
    print("  micro-batch length:  " + ", ".join(f"{k} {v:,.0f}" for k, v in seq_pct.items())
          + f"; real / padded tokens {dist['real_over_padded_tokens']:.0%}")

    if args.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(args.cpu_threads)
    t0 = time.time()
    dc, cfg, chunks, optimizer, device, dtype = build(
        args, dots_overrides={"vocab_size": args.vocab_size} if args.vocab_size else None)
    static = static_bytes(chunks, grad_reduce_in_fp32=True)
    budget = activation_budget(args.budget_gb, static)
    total, active = dc.num_parameters()
    print(f"model {args.model}: {total:,} parameters ({active:,} active), {dtype} on {device}; "
          f"built in {time.time() - t0:.1f} s")
    print(f"budget {args.budget_gb:g} GiB: static (params + fp32 grads + Adam) "
          f"{static / GIB:.3f} GiB, activation budget {budget / GIB:.3f} GiB")
    vocab = dc.vocab_size
    layer_counts = [len(decoder_layers(c)) for c in chunks]
    longest = padded_length([args.max_seq], args.pad_multiple)
    runs, skipped, ctl, static_choice, common_steps = run_strategies(
        strategies, chunks, cfg, optimizer, workload, args, vocab, device, budget,
        static_shape=(args.micro_batch_size, longest, args.micro_batches),
        step_batches=sft_step_batches(args, vocab, device),
        prepare_planner=precalibrate(chunks, args, vocab, device, longest)
        if args.precalibrate else None)
    results = summarize_runs(runs, skipped, args, ctl, static_choice, layer_counts, common_steps,
                             budget, counts=("padded_tokens",))
    for name, records in runs.items():
        checks = over_budget(name, records, ctl, static_choice, layer_counts, args, budget)
        results[name]["steps_checked"] = checks.pop("steps")
        results[name].update(checks)
    speedup = speedups(results)

    print(f"\nSFT recompute benchmark: {args.model}, {dtype}, budget {args.budget_gb:g} GiB "
          f"(activations {budget / GIB:.3f} GiB), {args.steps} steps x {args.global_batch} "
          f"conversations, micro-batches {args.micro_batch_size} x up to "
          f"{dist['longest_micro_batch_seq']} tokens (at most {longest}); "
          f"common steps {len(common_steps)} (warmup {args.warmup}, planner calibration steps "
          f"{len(results.get('planner', {}).get('calibration_steps', []))}"
          f"{', calibrated before' if args.precalibrate else ''}); tokens/s and step ms over the "
          f"common steps; steps over budget over all {args.steps}")
    print_table(results, HEADER, table_rows(results))
    if speedup["planner_over_static_common"]:
        print(f"planner / static tokens/s: {speedup['planner_over_static_common']:.2f}x "
              f"(common steps)"
              + (f", {speedup['planner_over_static_incl_calibration']:.2f}x with the planner's "
                 f"calibration steps" if speedup["planner_over_static_incl_calibration"] else ""))
    if "static" in results and results["static"].get("block_layers") is not None:
        print(f"static: whole-layer recompute of the first {results['static']['block_layers']} of "
              f"{max(layer_counts)} layers (for {args.micro_batch_size} x {longest} tokens)")
    if args.markdown:
        print()
        print(markdown_table(HEADER, table_rows(results)))

    return finish_report(args, device, dtype, total, static, budget, common_steps, workload,
                         results, distribution=dist, speedup=speedup)


if __name__ == "__main__":
    main(sys.argv[1:])
