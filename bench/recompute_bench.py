"""Input-aware activation recompute (`megatron_dots.recompute`) on a variable-length workload.

Builds one dots model on one device (GPU: bf16 via Float16Module; CPU: fp32), Megatron-Core DDP
and Megatron-Core's Adam (`training.optimizer.build_optimizer`), and runs the same seeded
workload with each recompute strategy in turn, timing full training steps
(`training.step.train_step`: forward, backward, gradient finalisation and the optimizer step):

* ``planner``: `RecomputeController` (per-micro-batch recompute chosen from the fitted memory
  model). Its *calibration* steps (every layer recomputes while the memory model measures; they
  happen whenever a micro-batch is longer than any measured so far, or fewer than three
  lengths are measured) are reported separately and left out of its timed steps;
* ``static``: whole-layer recompute of the first N layers for every micro-batch (Megatron's
  ``--recompute-granularity full --recompute-method block --recompute-num-layers N``), N the
  smallest for which the planner's fitted memory model predicts that a step of max-length
  micro-batches fits the activation budget (same 5 % safety margin and peak simulation as the
  planner). Needs ``planner`` to run first (it fits the model);
* ``full``: every layer recomputes (``--recompute-method uniform --recompute-num-layers 1``);
* ``none``: no recompute (may exceed the budget; a CUDA OOM is recorded as ``OOM``).

Each step has ``--micro-batches`` micro-batches of ``--micro-batch-size`` rows of random token
ids; the sequence length is drawn uniformly from [--min-seq, --max-seq] per step (or per
micro-batch with ``--per-micro-batch-seq``), from a seeded generator, so every strategy sees the
same steps. The first ``--warmup`` steps of every strategy are not timed. Throughput is
reported over each strategy's own timed steps and over the *common* steps (timed steps that
were not planner calibration steps), which is the like-for-like comparison. All strategies
train the same model and optimizer one after the other (weights are not reset between them).

The budget (``--budget-gb``) is the whole per-GPU memory; the activation budget is what is
left after parameters, fp32 gradients and Adam state (`recompute.budget.static_bytes`). Peak
memory is `torch.cuda.max_memory_allocated` over all steps of a strategy (null on CPU).

GPU (one H100, dots-mini):

    python bench/recompute_bench.py --model dots-mini --min-seq 512 --max-seq 8192 \\
        --budget-gb 70 --steps 40 --micro-batches 4 --markdown

CPU smoke check (dots-tiny, fp32, < 2 minutes):

    python bench/recompute_bench.py --model dots-tiny --min-seq 32 --max-seq 256 --steps 8 \\
        --micro-batches 2 --budget-gb 0.012 --bucket 32 --out /tmp/recompute_bench.json
"""

import argparse
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build, free_memory, host_info, sync, write_report  # noqa: E402

GIB = float(1 << 30)
STRATEGIES = ("planner", "static", "full", "none")


# -- model ------------------------------------------------------------------------------------
# -- workload ---------------------------------------------------------------------------------
def draw_workload(args) -> List[List[int]]:
    """Per step, the sequence length of each micro-batch (seeded, the same for every strategy)."""
    rng = random.Random(args.seed)
    steps = []
    for _ in range(args.steps):
        if args.per_micro_batch_seq:
            steps.append([rng.randint(args.min_seq, args.max_seq) for _ in range(args.micro_batches)])
        else:
            steps.append([rng.randint(args.min_seq, args.max_seq)] * args.micro_batches)
    return steps


def make_batches(lengths: Sequence[int], step: int, args, vocab: int, device) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed * 100003 + step)
    return [
        torch.randint(0, vocab, (args.micro_batch_size, s + 1), generator=gen).to(device)
        for s in lengths
    ]


def uniform_step_batches(args, vocab: int, device):
    """`run_strategy`'s `step_batches` for this workload: (step, lengths) -> (micro-batches,
    the step's sequence length for the schedule, fields of the step's record (``tokens``: the
    tokens counted by tokens/s), a label for the log)."""

    def step_batches(step: int, lengths: Sequence[int]):
        batches = make_batches(lengths, step, args, vocab, device)
        tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        return batches, max(lengths), {"seq": list(lengths), "tokens": tokens}, f"seq {lengths}"

    return step_batches


# -- fixed recompute ("static", "full", "none") -------------------------------------------------
class FixedRecompute:
    """The controller's interface to `training.step.forward_backward` with the same layer modes
    for every micro-batch of every step."""

    def __init__(self, chunks, modes_per_chunk: Sequence[Sequence[str]]):
        self.chunks = list(chunks)
        self.modes = [list(m) for m in modes_per_chunk]
        self._forward_only = False

    def begin_step(self, micro_batches, forward_only: bool = False):
        self._forward_only = forward_only
        return None

    def wrap(self, forward_step_func):
        from megatron_dots.recompute.layer import set_modes

        def forward_step(data_iterator, model):
            index = next(i for i, c in enumerate(self.chunks) if c is model)
            set_modes(model, None if self._forward_only else self.modes[index])
            return forward_step_func(data_iterator, model)

        return forward_step

    def end_step(self):
        return None


def predicted_step_peak(ctl, modes_per_chunk: Sequence[Sequence[str]], shapes,
                        bucket_tokens: int) -> float:
    """The planner's prediction (fitted memory model, its safety margin, the schedule's peak) of
    the activation peak of a step whose micro-batches have `shapes` (`MicroBatchShape`s, bucketed
    to `bucket_tokens` as the planner does) and all run the layer modes `modes_per_chunk`."""
    from megatron_dots.recompute.planner import ItemPlan, simulate_peak
    from megatron_dots.recompute.shapes import bucket

    scale = 1.0 + ctl.planner.margin
    rows: Dict[object, tuple] = {}
    for shape in {bucket(s, bucket_tokens) for s in shapes}:
        items = []
        for chunk, (layout, modes) in enumerate(zip(ctl.layouts, modes_per_chunk)):
            live = ctl.predicted_bytes(chunk, modes, shape) * scale
            transient = max(
                [ctl.model.layer_bytes(k, m, shape)[1] * scale for k, m in zip(layout.layer_kinds, modes)]
                + [0.0]
            )
            items.append(ItemPlan(tuple(modes), live, transient, 0.0))
        rows[shape] = tuple(items)
    return simulate_peak(ctl._events(len(shapes)), [rows[bucket(s, bucket_tokens)] for s in shapes])


def static_block_layers(ctl, micro_batch_size: int, seq_length: int, micro_batches: int,
                        bucket_tokens: int) -> Dict[str, object]:
    """Smallest N such that full recompute of the first N layers of every chunk is predicted
    (`predicted_step_peak`: fitted memory model, planner margin, schedule peak) to fit a step
    of `micro_batches` micro-batches of `micro_batch_size` x `seq_length` tokens (the longest
    micro-batch) into the activation budget."""
    from megatron_dots.recompute.shapes import MicroBatchShape, bucket

    shape = bucket(MicroBatchShape(micro_batch_size, seq_length), bucket_tokens)
    layers = [len(layout.layer_kinds) for layout in ctl.layouts]
    predicted = {}
    for n in range(max(layers) + 1):
        modes = [["full" if i < n else "none" for i in range(k)] for k in layers]
        peak = predicted_step_peak(ctl, modes, [shape] * micro_batches, bucket_tokens)
        predicted[n] = peak
        if peak <= ctl.planner.budget:
            return {"layers": n, "predicted_peak": peak, "fits": True, "shape_seq": shape.seq_length,
                    "predicted_by_n": predicted}
    return {"layers": max(layers), "predicted_peak": predicted[max(layers)], "fits": False,
            "shape_seq": shape.seq_length, "predicted_by_n": predicted}


# -- running ----------------------------------------------------------------------------------
def run_strategy(name, recompute, chunks, optimizer, workload, args, vocab, device, ctl=None,
                 step_batches=None):
    """Run every step of the workload; per-step records (a CUDA OOM ends the strategy).
    `step_batches(step, workload[step])` makes a step's micro-batches (default:
    `uniform_step_batches`)."""
    from megatron_dots.training.step import train_step

    step_batches = step_batches or uniform_step_batches(args, vocab, device)
    free_memory(device)
    records = []
    for step, spec in enumerate(workload):
        batches, seq_length, fields, label = step_batches(step, spec)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        oom = False
        start = time.perf_counter()
        try:
            loss = train_step(chunks, optimizer, batches, seq_length, args.micro_batch_size,
                              recompute=recompute).loss
            sync(device)
        except torch.OutOfMemoryError:
            oom = True
        seconds = time.perf_counter() - start
        record = {"step": step, **fields}
        if oom:
            # The controller's plan was never closed; leave the layers in a clean state.
            if ctl is not None:
                ctl.plan = None
            del batches
            free_memory(device)
            record["oom"] = True
            records.append(record)
            print(f"[{name}] step {step} {label}: CUDA OOM; strategy stopped", flush=True)
            break
        record.update(seconds=seconds, loss=loss)
        # Read after the step (the controller resets the peak in begin_step): forward,
        # backward and the optimizer step of this step.
        record["peak_allocated"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        line = f"[{name}] step {step} {label}: {1000 * seconds:.0f} ms, loss {loss:.3f}"
        if record["peak_allocated"] is not None:
            line += f", peak {record['peak_allocated'] / GIB:.2f} GiB"
        if ctl is not None:
            hist = ctl.history[-1]
            record["calibration"] = hist["calibration"]
            for key in ("recomputed_layer_share", "max_prediction_error", "predicted_peak",
                        "fits", "cuda_max_allocated", "modes"):
                if key in hist:
                    record[key] = hist[key]
            line += f"\n    {ctl.describe(ctl.take_window())}"
        records.append(record)
        print(line, flush=True)
    return records


def run_strategies(strategies, chunks, cfg, optimizer, workload, args, vocab, device, budget,
                   static_shape, step_batches=None, prepare_planner=None):
    """Run each strategy of `strategies` over `workload` in turn (see the module docstring).
    `static_shape` = (micro-batch size, sequence length, micro-batches per step): the step of
    longest micro-batches ``static`` must fit. `prepare_planner(ctl)` runs once the planner's
    `RecomputeController` is built, before its first step. Returns (records per strategy that
    ran, results of strategies skipped, the controller or None, static's choice or None, the
    common steps)."""
    from megatron_dots.recompute import RecomputeController
    from megatron_dots.recompute.layer import decoder_layers

    layer_counts = [len(decoder_layers(c)) for c in chunks]
    skipped: Dict[str, dict] = {}
    ctl: Optional[RecomputeController] = None
    common_steps = set(range(args.warmup, args.steps))
    static_choice = None
    runs = {}
    for name in strategies:
        if name == "planner":
            ctl = RecomputeController(chunks, cfg, budget, bucket_tokens=args.bucket)
            print(f"\n== planner (memory model: {ctl.model.attention} attention, bucket "
                  f"{args.bucket} tokens)")
            if prepare_planner is not None:
                prepare_planner(ctl)
            records = run_strategy(name, ctl, chunks, optimizer, workload, args, vocab, device, ctl,
                                   step_batches=step_batches)
            common_steps -= {r["step"] for r in records if r.get("calibration")}
            runs[name] = records
            continue
        if name == "static":
            if not ctl.model.samples:
                skipped[name] = {"status": "skipped", "reason": "the planner measured nothing"}
                continue
            static_choice = static_block_layers(ctl, *static_shape, args.bucket)
            n = static_choice["layers"]
            print(f"\n== static: full recompute of the first {n} of {max(layer_counts)} layers "
                  f"(predicted peak {static_choice['predicted_peak'] / GIB:.3f} GiB of "
                  f"{budget / GIB:.3f} GiB for seq {static_choice['shape_seq']}"
                  f"{'' if static_choice['fits'] else ', does NOT fit'})")
            modes = [["full" if i < n else "none" for i in range(k)] for k in layer_counts]
        else:
            print(f"\n== {name}")
            modes = [[name] * k for k in layer_counts]
        runs[name] = run_strategy(name, FixedRecompute(chunks, modes), chunks, optimizer,
                                  workload, args, vocab, device, step_batches=step_batches)
    return runs, skipped, ctl, static_choice, common_steps


def strategy_extra(name, records, args, ctl, static_choice, layer_counts) -> dict:
    """What a strategy's summary adds to `summarize`'s: the planner's calibration, prediction
    error and plans; static's layer count and predicted peaks; the recomputed layer share."""
    if name == "planner":
        cal = [r for r in records if r.get("calibration")]
        planned = [r for r in records if not r.get("calibration") and not r.get("oom")]
        timed_all = [r for r in records if r["step"] >= args.warmup and not r.get("oom")]
        secs_all = sum(r["seconds"] for r in timed_all)
        errors = [r["max_prediction_error"] for r in planned if "max_prediction_error" in r]
        shares = [r["recomputed_layer_share"] for r in planned
                  if r["step"] >= args.warmup and "recomputed_layer_share" in r]
        return {
            "calibration_steps": [r["step"] for r in cal],
            "calibration_mean_step_ms": (1000 * sum(r["seconds"] for r in cal) / len(cal)
                                         if cal and not any(r.get("oom") for r in cal) else None),
            "tokens_per_s_incl_calibration": (sum(r["tokens"] for r in timed_all) / secs_all
                                              if secs_all > 0 else None),
            "recomputed_layer_share": sum(shares) / len(shares) if shares else None,
            "max_prediction_error": max(errors) if errors else None,
            "max_predicted_peak_gib": max((r["predicted_peak"] for r in planned), default=0) / GIB
            if planned else None,
            "all_plans_fit": all(r.get("fits", True) for r in planned),
            "memory_model": ctl.model.describe(),
            "plan_cache": {"hits": ctl.planner.cache_hits, "misses": ctl.planner.cache_misses},
        }
    if name == "static":
        return {"recomputed_layer_share": static_choice["layers"] / max(layer_counts),
                "block_layers": static_choice["layers"],
                "predicted_peak_gib": static_choice["predicted_peak"] / GIB,
                "predicted_fits": static_choice["fits"],
                "predicted_peak_gib_by_layers": {str(k): v / GIB for k, v in
                                                 static_choice["predicted_by_n"].items()}}
    return {"recomputed_layer_share": 1.0 if name == "full" else 0.0}


def summarize_runs(runs, skipped, args, ctl, static_choice, layer_counts, common_steps, budget,
                   counts=()) -> Dict[str, dict]:
    """`summarize` + `strategy_extra` per strategy that ran, after those skipped."""
    results: Dict[str, dict] = dict(skipped)
    for name, records in runs.items():
        extra = strategy_extra(name, records, args, ctl, static_choice, layer_counts)
        results[name] = summarize(name, records, args, common_steps, budget, extra, counts)
    return results


def summarize(name, records, args, common_steps, budget_bytes, extra=None, counts=()):
    """A strategy's summary. Rates count each record's ``tokens``; each key of `counts` (e.g.
    ``padded_tokens``) adds ``{key}_per_s`` and ``common_{key}_per_s`` over the same steps."""
    timed = [r for r in records if r["step"] >= args.warmup and not r.get("oom")
             and not r.get("calibration")]
    common = [r for r in timed if r["step"] in common_steps]
    oom = any(r.get("oom") for r in records)

    def rate(rs, key="tokens"):
        secs = sum(r["seconds"] for r in rs)
        return (sum(r[key] for r in rs) / secs) if rs and secs > 0 else None

    def mean_ms(rs):
        return 1000 * sum(r["seconds"] for r in rs) / len(rs) if rs else None

    peaks = [r["peak_allocated"] for r in records if r.get("peak_allocated") is not None]
    peak = max(peaks) if peaks else None
    out = {
        "status": "OOM" if oom else "ok",
        "timed_steps": len(timed),
        "tokens_per_s": rate(timed),
        "mean_step_ms": mean_ms(timed),
        "common_steps": len(common),
        "common_tokens_per_s": None if oom else rate(common),
        "common_mean_step_ms": None if oom else mean_ms(common),
        "peak_allocated_gib": peak / GIB if peak is not None else None,
        "peak_within_budget": (peak <= args.budget_gb * GIB) if peak is not None else None,
    }
    for key in counts:
        out[f"{key}_per_s"] = rate(timed, key)
        out[f"common_{key}_per_s"] = None if oom else rate(common, key)
    if extra:
        out.update(extra)
    out["steps"] = records
    return out


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table_rows(results):
    rows = []
    for name, r in results.items():
        if r.get("status") == "skipped":
            rows.append([name, "skipped", "-", "-", "-", "-", "-", "-", "-"])
            continue
        within = r["peak_within_budget"]
        rows.append([
            name,
            r["status"],
            fmt(r["common_tokens_per_s"], ",.0f"),
            fmt(r["common_mean_step_ms"], ".1f"),
            fmt(r["tokens_per_s"], ",.0f"),
            fmt(r["peak_allocated_gib"], ".2f"),
            "-" if within is None else ("yes" if within else "NO"),
            fmt(r["recomputed_layer_share"], ".0%"),
            fmt(r.get("max_prediction_error"), ".1%"),
        ])
    return rows


HEADER = ["strategy", "status", "tokens/s (common)", "step ms (common)", "tokens/s (own)",
          "peak GiB", "peak <= budget", "recomputed layers", "max pred. error"]


def print_table(results, header=None, body=None):
    """`results` as an aligned text table (default: `HEADER` and `table_rows`)."""
    header = header or HEADER
    rows = [header] + (table_rows(results) if body is None else body)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for k, row in enumerate(rows):
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def print_markdown(results):
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADER))) + "|")
    for row in table_rows(results):
        print("| " + " | ".join(str(c) for c in row) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dots-mini", help="DotsConfig preset")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--expert-backend", default="sequential")
    parser.add_argument("--min-seq", type=int, default=512)
    parser.add_argument("--max-seq", type=int, default=8192)
    parser.add_argument("--per-micro-batch-seq", action="store_true",
                        help="draw the length per micro-batch (default: one length per step)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per strategy")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--budget-gb", type=float, required=True,
                        help="per-GPU memory budget in GiB (parameters, gradients, Adam state and "
                             "activations)")
    parser.add_argument("--bucket", type=int, default=256, help="planner shape bucket (tokens)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {','.join(STRATEGIES)} (run in this order)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="bench/results/recompute_bench.json", help="JSON report")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    if "static" in strategies and ("planner" not in strategies
                                   or strategies.index("planner") > strategies.index("static")):
        parser.error("'static' is chosen with the planner's fitted memory model: run 'planner' first")
    if args.min_seq < 1 or args.max_seq < args.min_seq:
        parser.error("need 1 <= --min-seq <= --max-seq")

    from megatron_dots.recompute import activation_budget, static_bytes
    from megatron_dots.recompute.layer import decoder_layers

    t0 = time.time()
    dc, cfg, chunks, optimizer, device, dtype = build(args)
    static = static_bytes(chunks, grad_reduce_in_fp32=True)
    budget = activation_budget(args.budget_gb, static)
    total, active = dc.num_parameters()
    print(f"model {args.model}: {total:,} parameters ({active:,} active), {dtype} on {device}; "
          f"built in {time.time() - t0:.1f} s")
    print(f"budget {args.budget_gb:g} GiB: static (params + fp32 grads + Adam) "
          f"{static / GIB:.3f} GiB, activation budget {budget / GIB:.3f} GiB")
    workload = draw_workload(args)
    vocab = dc.vocab_size
    layer_counts = [len(decoder_layers(c)) for c in chunks]
    runs, skipped, ctl, static_choice, common_steps = run_strategies(
        strategies, chunks, cfg, optimizer, workload, args, vocab, device, budget,
        static_shape=(args.micro_batch_size, args.max_seq, args.micro_batches))
    results = summarize_runs(runs, skipped, args, ctl, static_choice, layer_counts, common_steps,
                             budget)

    print(f"\nrecompute benchmark: {args.model}, {dtype}, budget {args.budget_gb:g} GiB "
          f"(activations {budget / GIB:.3f} GiB), {args.steps} steps x {args.micro_batches} "
          f"micro-batches x {args.micro_batch_size} rows, seq {args.min_seq}-{args.max_seq}"
          f"{' per micro-batch' if args.per_micro_batch_seq else ' per step'}; common steps "
          f"{len(common_steps)} (warmup {args.warmup}, planner calibration "
          f"{len(results.get('planner', {}).get('calibration_steps', []))})")
    print_table(results)
    if "planner" in results and results["planner"].get("tokens_per_s_incl_calibration"):
        p = results["planner"]
        print(f"planner incl. calibration steps: {p['tokens_per_s_incl_calibration']:,.0f} tokens/s; "
              f"calibration steps {p['calibration_steps']}; memory model: {p['memory_model']}")
    if args.markdown:
        print()
        print_markdown(results)

    return finish_report(args, device, dtype, total, static, budget, common_steps, workload,
                         results)


def finish_report(args, device, dtype, total, static, budget, common_steps, workload, results,
                  **extra) -> dict:
    """Write the benchmark's JSON report (the fields every recompute benchmark has, then
    `extra`) to --out and tear down model parallelism; returns the report."""
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "host": host_info(device),
        "args": vars(args),
        "dtype": dtype,
        "parameters": total,
        "static_bytes": static,
        "activation_budget_bytes": budget,
        "common_steps": sorted(common_steps),
        "workload": workload,
        "results": results,
        **extra,
    }
    write_report(report, args.out)
    print(f"report: {args.out}")
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
