"""The recompute planner under the all-to-all overlap schedule trains like the plain schedule
without recompute (torchrun worker).

Every rank builds one tiny dots model (1 dense + 3 MoE layers) three times from the same full
weights:

* ``planned``: the overlap schedule (`enable_a2a_overlap`, optionally with delayed expert wgrad)
  and a `RecomputeController`; its first steps calibrate (on the plain schedule), then the
  budget is set between the least memory the overlap schedule's recompute modes reach and the
  peak without recompute, so planned steps must recompute some layers and not others;
* ``overlap``: the same schedule without recompute;
* ``plain``: the plain schedule (no overlap, no delayed wgrad) without recompute: the reference.

All three train on the same batches (variable lengths per micro-batch without pipelining, one
length with PP, whose p2p buffers have a fixed shape) with Megatron-Core's schedule,
finalize_model_grads (router-bias update) and SGD. Each rank compares per iteration the loss,
its gradient shards and router biases of ``planned`` against ``plain`` and ``overlap``, and
counts what actually ran, so that neither a silent fallback nor a plan that is never applied can
pass: forward steps per schedule kind, core-attention checkpoints executed against the
core_attn modes the controller applied, delayed-wgrad flushes of calibration steps, modes per
layer kind, and the order in which the combined 1F1B ran the (micro-batch, chunk) schedule plans
(`TransformerModelChunkSchedulePlan.run(f_plan, b_plan)`: F then B) against the planner's
`schedule_events(..., overlap=True)`. Rank 0 writes a JSON summary to --out; the process exits 1
on any difference.
"""

import argparse
import json
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_dots  # noqa: E402,F401  (compat patches first)
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.recompute import RecomputeController  # noqa: E402
from megatron_dots.recompute.layer import decoder_layers  # noqa: E402
from megatron_dots.recompute.planner import simulate_peak  # noqa: E402
from megatron_dots.recompute.schedule_order import max_in_flight  # noqa: E402
from megatron_dots.recompute.shapes import MicroBatchShape  # noqa: E402
from megatron_dots.schedule.a2a_overlap import enable_a2a_overlap  # noqa: E402
from layout_flags import add_layout_flags, layout_sizes  # noqa: E402
from worker_common import ddp_model_and_sgd, run_and_exit, train_iteration  # noqa: E402
from reference import make_hf_model, mcore_full_state, tiny_config  # noqa: E402

MICRO_BATCH_SIZE = 2
COUNTS = Counter()
PLANS = {}  # id(schedule plan) -> (micro-batch, chunk) of this step
RAN = []  # ("F" | "B", micro-batch, chunk) in the order the combined 1F1B ran the plans


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    add_layout_flags(parser)
    parser.add_argument("--backend", default="grouped", choices=("sequential", "grouped"))
    parser.add_argument("--delay-wgrad", action="store_true")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--budget-share", type=float, default=0.5,
                        help="budget between the least predicted peak (0) and no recompute (1)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def lengths(iteration, dp_rank, pp, micro_batches):
    if pp > 1:
        return [32] * micro_batches
    first = {0: 16, 1: 48, 2: 40}  # calibration: three lengths, the longest first measured
    if iteration in first:
        return [first[iteration]] * micro_batches
    g = torch.Generator().manual_seed(100 * iteration + dp_rank)
    return [int(s) // 4 * 4 for s in torch.randint(12, 49, (micro_batches,), generator=g)]


def instrument():
    """Count what ran (test instrumentation)."""
    from megatron.core.transformer.attention import Attention

    from megatron_dots.recompute.layer import PlannedRecomputeLayer

    checkpointed = Attention._checkpointed_attention_forward

    def counted_checkpoint(self, *args, **kwargs):
        COUNTS["core_attn_checkpoints"] += 1
        return checkpointed(self, *args, **kwargs)

    Attention._checkpointed_attention_forward = counted_checkpoint
    run_backward_dw = PlannedRecomputeLayer.run_backward_dw

    def counted_backward_dw(self):
        COUNTS["calibration_wgrad_flushes"] += 1
        return run_backward_dw(self)

    PlannedRecomputeLayer.run_backward_dw = counted_backward_dw

    from megatron.core.models.common import model_chunk_schedule_plan as plans

    chunk_run = plans.TransformerModelChunkSchedulePlan.run

    def run(f_plan, b_plan, *args, **kwargs):
        for kind, plan in (("F", f_plan), ("B", b_plan)):
            if plan is not None and id(plan) in PLANS:
                RAN.append((kind, *PLANS[id(plan)]))
        return chunk_run(f_plan, b_plan, *args, **kwargs)

    plans.TransformerModelChunkSchedulePlan.run = staticmethod(run)


def counting_forward_step(ctl, forward_step):
    """The controller's forward step, counting the schedule kind that called it and naming the
    schedule plans it returns."""

    def step(data_iterator, model, return_schedule_plan=False):
        COUNTS["overlap_forward_steps" if return_schedule_plan else "plain_forward_steps"] += 1
        out = forward_step(data_iterator, model, return_schedule_plan=return_schedule_plan)
        if return_schedule_plan:
            PLANS[id(out[0])] = list(ctl.applied)[-1]
        return out

    return step


def build(args, cfg, full, overlap, delay_wgrad):
    model_parallel_cuda_manual_seed(123)
    tc = cfg.to_transformer_config(**layout_sizes(args), sequence_parallel=args.sp,
                                   pipeline_dtype=torch.float32, params_dtype=torch.float32,
                                   batch_p2p_comm=False)
    if overlap:
        enable_a2a_overlap(tc, delay_wgrad=delay_wgrad)
    chunks, optimizer = ddp_model_and_sgd(cfg, tc, full, args.backend)
    return tc, chunks, optimizer


def step(chunks, optimizer, batches, seq, recompute=None):
    return train_iteration(chunks, optimizer, batches, seq, MICRO_BATCH_SIZE, recompute)


def set_budget(ctl, args, micro_batches):
    """A budget between the least predicted peak the allowed modes reach and the peak without
    recompute, for micro-batches of the longest calibrated length."""
    planner = ctl.planner
    longest = max(s for _, _, s in ctl.model.samples)
    shapes = [MicroBatchShape(MICRO_BATCH_SIZE, longest)] * micro_batches
    events = ctl._events(micro_batches)
    hi = simulate_peak(events, planner._items(shapes, float(1 << 80)))
    lo = simulate_peak(events, planner._items(shapes, 0.0))
    planner.budget = lo + args.budget_share * (hi - lo)
    planner.reset()
    return lo, hi


def compare(failures, worst, name, it, a, b):
    diff = abs(a["loss"] - b["loss"])
    worst[f"{name}_loss"] = max(worst[f"{name}_loss"], diff)
    if diff > 1e-6 * max(1.0, abs(b["loss"])):
        failures.append(f"iteration {it}: loss {a['loss']} != {name} {b['loss']}")
    for kind, field in (("grads", "grad"), ("bias", "bias")):
        if set(a[kind]) != set(b[kind]):
            failures.append(f"iteration {it}: {kind} keys differ from {name}")
            continue
        for key, value in a[kind].items():
            other = b[kind][key]
            if value is None or other is None:
                if (value is None) != (other is None):
                    failures.append(f"iteration {it}: {kind} of {key}: one is None ({name})")
                continue
            d = (value - other).abs().max().item()
            worst[f"{name}_{field}"] = max(worst[f"{name}_{field}"], d)
            if not torch.allclose(value, other, rtol=1e-5, atol=5e-7):
                failures.append(f"iteration {it}: {kind} of {key} differ from {name} by {d:.3g}")


def main():
    args = parse_args()
    init_distributed()
    parallel_state.initialize_model_parallel(**layout_sizes(args))
    cfg = tiny_config(num_layers=4, seq_aux_loss_coeff=1e-2, bias_update_rate=1e-2)
    full = mcore_full_state(make_hf_model(cfg, seed=31, bias_scale=0.05), cfg, tp=args.tp)
    tc, planned, opt_planned = build(args, cfg, full, overlap=True, delay_wgrad=args.delay_wgrad)
    _, overlap, opt_overlap = build(args, cfg, full, overlap=True, delay_wgrad=args.delay_wgrad)
    _, plain, opt_plain = build(args, cfg, full, overlap=False, delay_wgrad=False)
    ctl = RecomputeController(planned, tc, budget_bytes=1e12, bucket_tokens=8)
    ctl.wrap = (lambda wrap: lambda f: counting_forward_step(ctl, wrap(f)))(ctl.wrap)
    instrument()

    dp_rank = parallel_state.get_data_parallel_rank()
    names = ("plain_loss", "plain_grad", "plain_bias", "overlap_loss", "overlap_grad",
             "overlap_bias")
    worst = dict.fromkeys(names, 0.0)
    failures, records, order_ok, budget, in_flight = [], [], True, None, 0
    calibration_layer_passes = 0
    kinds = Counter()  # (layer kind, mode) over planned steps
    for iteration in range(args.iters):
        g = torch.Generator().manual_seed(1000 * iteration + dp_rank)
        batches = [torch.randint(0, cfg.vocab_size, (MICRO_BATCH_SIZE, s + 1), generator=g)
                   for s in lengths(iteration, dp_rank, args.pp, args.micro_batches)]
        seq = max(b.shape[1] - 1 for b in batches)
        checkpoints = COUNTS["core_attn_checkpoints"]
        PLANS.clear()
        del RAN[:]
        a = step(planned, opt_planned, batches, seq, recompute=ctl)
        record = ctl.history[-1]
        if record["calibration"]:
            budget = set_budget(ctl, args, args.micro_batches)
            order_ok &= not RAN  # the plain schedule built no schedule plans
            calibration_layer_passes += args.micro_batches * sum(
                len(decoder_layers(c)) for c in planned)
        else:
            events = ctl._events(args.micro_batches)
            order_ok &= RAN == [tuple(e) for e in events]
            order_ok &= list(ctl._counters) == [(mb, c) for kind, mb, c in events if kind == "F"]
            in_flight = max(in_flight, max_in_flight(RAN))
            applied = 0
            for (mb, chunk), modes in ctl.applied.items():
                for layer, mode in zip(decoder_layers(planned[chunk]), modes):
                    kinds[(layer.kind, mode)] += 1
                    applied += mode in ("core_attn", "core_attn+mlp")
            if COUNTS["core_attn_checkpoints"] - checkpoints != applied:
                failures.append(f"iteration {iteration}: {applied} core_attn modes "
                                f"applied, {COUNTS['core_attn_checkpoints'] - checkpoints} "
                                "core attentions checkpointed")
        records.append({k: v for k, v in record.items() if k != "model"})
        compare(failures, worst, "plain", iteration, a, step(plain, opt_plain, batches, seq))
        compare(failures, worst, "overlap", iteration, a,
                step(overlap, opt_overlap, batches, seq))
    window = ctl.take_window()
    line = ctl.describe(window)

    for text in failures[:20]:
        print(f"[rank {torch.distributed.get_rank()}] {text}", file=sys.stderr)
    everyone = [None] * torch.distributed.get_world_size()
    mine = {"failures": len(failures), "counts": dict(COUNTS), "order_ok": order_ok,
            "kinds": {f"{k}:{m}": n for (k, m), n in kinds.items()}, "worst": worst,
            "records": records, "budget": budget, "describe": line,
            "window": window, "in_flight": in_flight,
            "calibration_layer_passes": calibration_layer_passes}
    torch.distributed.all_gather_object(everyone, mine)
    total_failures = sum(r["failures"] for r in everyone)
    if torch.distributed.get_rank() == 0:
        summary = {
            "failures": total_failures,
            "order_ok": all(r["order_ok"] for r in everyone),
            "in_flight": [r["in_flight"] for r in everyone],
            "calibration_layer_passes": sum(r["calibration_layer_passes"] for r in everyone),
            "worst": {k: max(r["worst"][k] for r in everyone) for k in worst},
            "counts": sum((Counter(r["counts"]) for r in everyone), Counter()),
            "kinds": sum((Counter(r["kinds"]) for r in everyone), Counter()),
            "ranks": [{k: r[k] for k in ("records", "budget", "describe", "window", "counts")}
                      for r in everyone],
        }
        with open(args.out, "w") as handle:
            json.dump(summary, handle)
    return 1 if total_failures else 0


if __name__ == "__main__":
    run_and_exit(main)
