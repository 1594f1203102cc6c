"""The recompute planner leaves training unchanged under a parallel layout (torchrun worker).

Every rank builds the same tiny dots model twice (same weights). Twin A trains with a
`RecomputeController` whose budget, once calibrated, is a share (--budget-share) of the
predicted no-recompute peak (so plans recompute); twin B trains without recompute. Both see the same micro-batches
(variable lengths per data-parallel rank without pipelining; one length under PP, whose p2p
buffers have a fixed shape), run Megatron-Core's schedule (finalize_model_grads included: the
router bias update), then an SGD update. Each rank compares losses, gradients and router biases
of the twins, checks its forward order against `schedule_order.schedule_events`, and gathers
every rank's plans so tensor- and expert-parallel peers can be checked to agree. Rank 0 writes
a JSON summary to --out.
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
from megatron_dots.config import DotsConfig  # noqa: E402
from megatron_dots.model import build_dots_model_chunks  # noqa: E402
from megatron_dots.recompute import RecomputeController  # noqa: E402
from megatron_dots.training import forward_backward, wrap_with_ddp  # noqa: E402
from layout_flags import add_layout_flags, layout_sizes  # noqa: E402

MICRO_BATCHES = 4
MICRO_BATCH_SIZE = 2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    add_layout_flags(parser)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--budget-share", type=float, default=0.55,
                        help="budget as a share of the predicted peak without recompute")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def build(cfg, tc, seed):
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return wrap_with_ddp(build_dots_model_chunks(cfg, tc, backend="sequential"), tc)


def lengths(iteration, dp_rank, pp, multiple):
    if pp > 1:
        return [32] * MICRO_BATCHES
    g = torch.Generator().manual_seed(100 * iteration + dp_rank)
    # Calibration sees 16, 48 and 40 first; later steps mix lengths up to 48.
    first = {0: [16] * 4, 1: [48] * 4, 2: [40] * 4}
    if iteration in first:
        return first[iteration]
    draws = torch.randint(12, 49, (MICRO_BATCHES,), generator=g).tolist()
    return [max(multiple, s // multiple * multiple) for s in draws]


def main():
    args = parse_args()
    init_distributed()
    parallel_state.initialize_model_parallel(**layout_sizes(args))
    cfg = DotsConfig.preset("dots-tiny")
    tc = cfg.to_transformer_config(
        **layout_sizes(args), sequence_parallel=args.sp,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, batch_p2p_comm=False)
    planned, plain = build(cfg, tc, 7), build(cfg, tc, 7)
    ctl = RecomputeController(planned, tc, budget_bytes=1e12, bucket_tokens=8)

    dp_rank = parallel_state.get_data_parallel_rank()
    worst = {"loss": 0.0, "grad": 0.0, "bias": 0.0}
    modes, plans, order_ok, calibrations = Counter(), [], True, 0
    for iteration in range(args.iters):
        g = torch.Generator().manual_seed(1000 * iteration + dp_rank)
        batches = [torch.randint(0, cfg.vocab_size, (MICRO_BATCH_SIZE, s + 1), generator=g)
                   for s in lengths(iteration, dp_rank, args.pp, args.tp)]
        seq = max(b.shape[1] - 1 for b in batches)
        losses = []
        for chunks, recompute in ((planned, ctl), (plain, None)):
            losses.append(forward_backward(chunks, batches, seq, MICRO_BATCH_SIZE,
                                           recompute=recompute))
        record = ctl.history[-1]
        if record["calibration"]:
            calibrations += 1
            # Tighten the budget to force mixed plans (for the shapes seen last).
            ctl.planner.budget = 1e12
            ctl.planner.reset()
            unlimited = ctl.planner.plan_step(ctl.buckets, ctl._events(MICRO_BATCHES))
            ctl.planner.budget = args.budget_share * unlimited.predicted_peak
            ctl.planner.reset()
        else:
            modes.update(record["modes"])
        expected = [(mb, c) for kind, mb, c in ctl._events(MICRO_BATCHES) if kind == "F"]
        order_ok &= list(ctl._counters) == expected
        plans.append(sorted(ctl.applied.items()))
        worst["loss"] = max(worst["loss"], abs(losses[0] - losses[1]))
        for a, b in zip(planned, plain):
            for (name, pa), pb in zip(a.module.named_parameters(), b.module.parameters()):
                worst["grad"] = max(worst["grad"], (pa.main_grad - pb.main_grad).abs().max().item())
                pa.data.add_(pa.main_grad, alpha=-0.5)
                pb.data.add_(pb.main_grad, alpha=-0.5)
            for (name, ba), bb in zip(a.module.named_buffers(), b.module.buffers()):
                if name.endswith("expert_bias"):
                    worst["bias"] = max(worst["bias"], (ba - bb).abs().max().item())

    everyone = [None] * torch.distributed.get_world_size()
    mine = {"tp_group": torch.distributed.get_process_group_ranks(
                parallel_state.get_tensor_model_parallel_group()),
            "ep_group": torch.distributed.get_process_group_ranks(
                parallel_state.get_expert_model_parallel_group()),
            "plans": plans, "worst": worst, "order_ok": order_ok, "modes": dict(modes),
            "calibrations": calibrations}
    torch.distributed.all_gather_object(everyone, mine)
    if torch.distributed.get_rank() == 0:
        agree = all(everyone[peer]["plans"] == rank["plans"]
                    for rank in everyone for key in ("tp_group", "ep_group")
                    for peer in rank[key])
        summary = {
            "worst": {k: max(r["worst"][k] for r in everyone) for k in worst},
            "order_ok": all(r["order_ok"] for r in everyone),
            "peers_agree": agree,
            "modes": sum((Counter(r["modes"]) for r in everyone), Counter()),
            "calibrations": [r["calibrations"] for r in everyone],
        }
        with open(args.out, "w") as handle:
            json.dump(summary, handle)
    parallel_state.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
