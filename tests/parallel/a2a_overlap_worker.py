"""The all-to-all overlap schedule against the plain schedule of the same layout (torchrun worker).

Each rank builds the same tiny dots model twice from one set of weights: once with the plain
schedule (no pipelining or interleaved 1F1B) and once with `enable_a2a_overlap` (Megatron-Core's
combined 1F1B plus the dots shared-expert rewiring, optionally with delayed expert wgrad). Both
train for --iters iterations on the same batches (forward_backward_func, DDP, finalize_model_grads
with the router-bias update, SGD step). Every rank compares, per iteration, the loss, each of its
gradient shards and the router biases of the two runs; rank 0 writes a JSON summary (worst
differences, and counters that prove the overlap path ran: forward/backward-paired steps,
deferred shared-expert forwards and backwards, delayed expert wgrad computations) to --out. The
process exits 1 if anything differs.
"""

import argparse
import json
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_dots  # noqa: E402  (compat patches first)
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.schedule.a2a_overlap import enable_a2a_overlap  # noqa: E402
from megatron_dots.training import forward_backward  # noqa: E402
from layout_flags import add_layout_flags, layout_sizes  # noqa: E402
from worker_common import ddp_model_and_sgd, run_and_exit, train_iteration  # noqa: E402
from reference import make_hf_model, mcore_full_state, tiny_config  # noqa: E402

MICRO_BATCH_SIZE = 2
SEQ_LENGTH = 16
COUNTS = Counter()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    add_layout_flags(parser)
    parser.add_argument("--backend", default="grouped", choices=("sequential", "grouped"))
    parser.add_argument("--delay-wgrad", action="store_true",
                        help="delayed expert weight gradients in the overlap run")
    parser.add_argument("--micro-batches", type=int, default=8,
                        help="micro-batches per data-parallel rank per iteration")
    parser.add_argument("--first-k-dense", type=int, default=1, help="leading dense layers")
    parser.add_argument("--trace", default=None,
                        help="write the overlap run's last-iteration op order on rank 0 as JSON "
                        "[kind, micro-batch, op] records, in the simulator's op names")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", required=True)
    return parser.parse_args()


# Megatron-Core node names (0.16 / 0.19) -> the simulator's op names, per pass kind.
NODE_OPS = {"F": {"attn": "attention", "pre_dispatch_computation": "attention",
                  "moe_dispatch": "dispatch", "mlp": "experts", "moe_combine": "combine"},
            "B": {"attn": "attention_bwd", "pre_dispatch_computation": "attention_bwd",
                  "moe_dispatch": "dispatch_bwd", "mlp": "experts_dgrad",
                  "moe_combine": "combine_bwd"}}
# Once instrumented: every op of the schedule as (kind, micro-batch, op), in issue order (=
# execution order on CPU); micro-batches are numbered per iteration (EVENTS_START).
EVENTS = []
EVENTS_START = [0]
MICRO_BATCH = {}  # id(chunk state) -> micro-batch number in this iteration


def record(kind, chunk_state, op):
    if op is None:
        return
    if chunk_state is None:  # the expert wgrad: the micro-batch of the op before it
        mb = EVENTS[-1][1]
    else:
        mb = MICRO_BATCH.setdefault(id(chunk_state), len(MICRO_BATCH))
    EVENTS.append((kind, mb, op))


def new_iteration():
    EVENTS_START.append(len(EVENTS))
    MICRO_BATCH.clear()


def instrument():
    """Wrap the schedule's entry points to record what actually ran (test instrumentation)."""
    from megatron.core.models.common import model_chunk_schedule_plan as plans
    from megatron.core.pipeline_parallel.utils import ScheduleNode

    from megatron_dots.model.experts import TorchGroupedExperts
    from megatron_dots.schedule import layer_plan

    chunk_run = plans.TransformerModelChunkSchedulePlan.run

    def run(f_plan, b_plan, *args, **kwargs):
        COUNTS["paired_steps" if f_plan is not None and b_plan is not None else "single_steps"] += 1
        return chunk_run(f_plan, b_plan, *args, **kwargs)

    plans.TransformerModelChunkSchedulePlan.run = staticmethod(run)

    for kind, method in (("F", "forward"), ("B", "backward")):
        original = getattr(ScheduleNode, method)

        def recorded(self, arg=(), _original=original, _kind=kind):
            record(_kind, getattr(self, "chunk_state", None), NODE_OPS[_kind].get(self.name))
            return _original(self, arg)

        setattr(ScheduleNode, method, recorded)
    for kind, method, op in (("F", "forward", "shared"), ("B", "backward", "shared_bwd")):
        original = getattr(layer_plan._DeferredSharedExperts, method)

        def recorded_shared(self, _original=original, _kind=kind, _op=op):
            record(_kind, self.layer_plan.chunk_state, _op)
            return _original(self)

        setattr(layer_plan._DeferredSharedExperts, method, recorded_shared)
    backward_dw = TorchGroupedExperts.backward_dw

    def recorded_backward_dw(self):
        if self._pending_wgrad:
            COUNTS["delayed_wgrads"] += len(self._pending_wgrad)
            record("B", None, "experts_wgrad")
        return backward_dw(self)

    TorchGroupedExperts.backward_dw = recorded_backward_dw


def event_counts():
    """Shared-expert forwards / backwards and delayed wgrads that did not come right after
    their layer's dispatch backward, from EVENTS."""
    ops = [op for _, _, op in EVENTS]
    COUNTS["shared_forward"] = ops.count("shared")
    COUNTS["shared_backward"] = ops.count("shared_bwd")
    COUNTS["wgrad_not_after_dispatch_backward"] = sum(
        1 for i, op in enumerate(ops)
        if op == "experts_wgrad" and (i == 0 or ops[i - 1] != "dispatch_bwd"))


def train(args, cfg, full, overlap):
    model_parallel_cuda_manual_seed(123)
    tc = cfg.to_transformer_config(**layout_sizes(args), sequence_parallel=args.sp,
                                   pipeline_dtype=torch.float32, params_dtype=torch.float32,
                                   batch_p2p_comm=False)
    if overlap:
        enable_a2a_overlap(tc, delay_wgrad=args.delay_wgrad)
    chunks, optimizer = ddp_model_and_sgd(cfg, tc, full, args.backend)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    records = []
    for iteration in range(args.iters):
        new_iteration()
        gen = torch.Generator().manual_seed(1000 + iteration)
        batch = torch.randint(0, cfg.vocab_size, (args.micro_batches * dp_size, MICRO_BATCH_SIZE,
                                                  SEQ_LENGTH + 1), generator=gen)
        mine = batch[dp_rank * args.micro_batches:(dp_rank + 1) * args.micro_batches]
        records.append(train_iteration(chunks, optimizer, mine, SEQ_LENGTH, MICRO_BATCH_SIZE))
    # Evaluation runs the plain forward-only schedule, also on a model set up for the overlap.
    records[-1]["eval_loss"] = forward_backward(chunks, mine, SEQ_LENGTH, MICRO_BATCH_SIZE,
                                                forward_only=True)
    return records


def main():
    args = parse_args()
    init_distributed()
    parallel_state.initialize_model_parallel(**layout_sizes(args))
    # 1 dense + 3 MoE layers (PP=2 x VPP=2: one per chunk); strong aux loss and bias rate.
    cfg = tiny_config(num_layers=4, seq_aux_loss_coeff=1e-2, bias_update_rate=1e-2,
                      first_k_dense=args.first_k_dense)
    full = mcore_full_state(make_hf_model(cfg, seed=31, bias_scale=0.05), cfg, tp=args.tp)
    plain = train(args, cfg, full, overlap=False)
    instrument()
    ours = train(args, cfg, full, overlap=True)
    event_counts()
    if args.trace and torch.distributed.get_rank() == 0:
        with open(args.trace, "w") as handle:
            json.dump(EVENTS[EVENTS_START[-1]:], handle)  # the last iteration

    worst = {"loss": 0.0, "grad": 0.0, "bias": 0.0}
    failures = []
    worst["eval_loss"] = abs(ours[-1]["eval_loss"] - plain[-1]["eval_loss"])
    if worst["eval_loss"] > 1e-6 * max(1.0, abs(plain[-1]["eval_loss"])):
        failures.append(f"eval loss {ours[-1]['eval_loss']} != plain {plain[-1]['eval_loss']}")
    for it, (a, b) in enumerate(zip(ours, plain)):
        worst["loss"] = max(worst["loss"], abs(a["loss"] - b["loss"]))
        if abs(a["loss"] - b["loss"]) > 1e-6 * max(1.0, abs(b["loss"])):
            failures.append(f"iteration {it}: loss {a['loss']} != plain {b['loss']}")
        for kind, field in (("grads", "grad"), ("bias", "bias")):
            if set(a[kind]) != set(b[kind]):
                failures.append(f"iteration {it}: {kind} keys differ")
                continue
            for key, value in a[kind].items():
                diff = (value - b[kind][key]).abs().max().item()
                worst[field] = max(worst[field], diff)
                if not torch.allclose(value, b[kind][key], rtol=1e-5, atol=5e-7):
                    failures.append(f"iteration {it}: {kind} of {key} differ by {diff:.3g}")
    for line in failures[:20]:
        print(f"[rank {torch.distributed.get_rank()}] {line}", file=sys.stderr)
    totals = torch.tensor([len(failures), len(plain[0]["grads"]), len(plain[0]["bias"]),
                           COUNTS["paired_steps"], COUNTS["single_steps"],
                           COUNTS["shared_forward"], COUNTS["shared_backward"],
                           COUNTS["delayed_wgrads"], COUNTS["wgrad_not_after_dispatch_backward"]])
    torch.distributed.all_reduce(totals)
    names = ("failures", "grad_tensors_checked", "bias_tensors_checked", "paired_steps",
             "single_steps", "shared_forward", "shared_backward", "delayed_wgrads",
             "wgrad_not_after_dispatch_backward")
    summary = dict(zip(names, (int(v) for v in totals)))
    if torch.distributed.get_rank() == 0:
        summary.update(worst=worst, losses=[r["loss"] for r in ours],
                       plain_losses=[r["loss"] for r in plain])
        with open(args.out, "w") as handle:
            json.dump(summary, handle)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    run_and_exit(main)
