"""Train a tiny dots model for a few iterations under one parallel layout (torchrun worker).

Each iteration: Megatron-Core's forward_backward_func (1F1B / interleaved 1F1B under PP) over
the global batch's micro-batches, DDP gradient reduction and finalize_model_grads (which also
updates the router bias), then a Megatron-Core optimizer step. Every rank records, per
iteration, the loss, its gradient shards (full-model keys) and the router biases.

Without --reference (run it as one process) the records are the single-process reference and
rank 0 writes them to --out. With --reference, each rank cuts its shards out of the reference's
full tensors and compares; rank 0 writes a JSON summary of the worst differences to --out, and
the process exits 1 if anything is off.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_dots  # noqa: E402  (compat patches first)
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.convert.sharding import local_tensors, shard  # noqa: E402
from layout_flags import add_layout_flags, layout_sizes  # noqa: E402
from worker_common import ddp_model_and_sgd, run_and_exit, train_iteration  # noqa: E402
from reference import make_hf_model, mcore_full_state, tiny_config  # noqa: E402

GLOBAL_MICRO_BATCHES = 4
MICRO_BATCH_SIZE = 2
SEQ_LENGTH = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    add_layout_flags(parser)
    parser.add_argument("--batch-p2p-comm", action="store_true",
                        help="batched pipeline p2p (refused by the CPU backend under PP>1)")
    parser.add_argument("--no-batch-p2p-guard", action="store_true",
                        help="lift that refusal, to show why it exists")
    parser.add_argument("--backend", default="sequential", choices=("sequential", "grouped"),
                        help="expert / attention backend (the reference is always sequential)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--reference", default=None)
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def dots_config():
    # 4 layers (1 dense + 3 MoE) split as PP=2 x VPP=2; a strong aux loss and bias rate so
    # both visibly act within a few iterations.
    return tiny_config(num_layers=4, seq_aux_loss_coeff=1e-2, bias_update_rate=1e-2)


def global_batch(iteration, vocab):
    gen = torch.Generator().manual_seed(1000 + iteration)
    return torch.randint(0, vocab, (GLOBAL_MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ_LENGTH + 1),
                         generator=gen)


def main():
    args = parse_args()
    init_distributed()
    if args.no_batch_p2p_guard:
        from megatron.core.pipeline_parallel import p2p_communication

        cls = p2p_communication.P2PCommunicator
        cls.__init__ = getattr(cls.__init__, "__wrapped_original__", cls.__init__)
    parallel_state.initialize_model_parallel(**layout_sizes(args))
    model_parallel_cuda_manual_seed(123)
    cfg = dots_config()
    tc = cfg.to_transformer_config(
        **layout_sizes(args),
        sequence_parallel=args.sp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        batch_p2p_comm=args.batch_p2p_comm,
    )
    full = mcore_full_state(make_hf_model(cfg, seed=31, bias_scale=0.05), cfg, tp=args.tp)
    chunks, optimizer = ddp_model_and_sgd(cfg, tc, full, args.backend)

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    micro_batches = GLOBAL_MICRO_BATCHES // dp_size
    records = []
    for iteration in range(args.iters):
        batch = global_batch(iteration, cfg.vocab_size)
        mine = batch[dp_rank * micro_batches: (dp_rank + 1) * micro_batches]
        records.append(train_iteration(chunks, optimizer, mine, SEQ_LENGTH, MICRO_BATCH_SIZE))

    if args.reference is None:
        if torch.distributed.get_rank() == 0:
            torch.save(records, args.out)
        return 0
    return compare(records, torch.load(args.reference), chunks, args.out)


def compare(records, reference, chunks, out):
    params = {}
    for chunk in chunks:
        params.update({key: t for _, key, t in local_tensors(chunk)})
    worst = {"loss": 0.0, "grad": 0.0, "bias": 0.0}
    failures = []
    for it, (mine, ref) in enumerate(zip(records, reference)):
        worst["loss"] = max(worst["loss"], abs(mine["loss"] - ref["loss"]))
        if abs(mine["loss"] - ref["loss"]) > 1e-5 * max(1.0, abs(ref["loss"])):
            failures.append(f"iteration {it}: loss {mine['loss']} != reference {ref['loss']}")
        for kind, tol in (("grads", (1e-4, 1e-6)), ("bias", (0.0, 1e-7))):
            for key, value in mine[kind].items():
                expected = shard(ref[kind][key], params[key], key)
                diff = (value - expected).abs().max().item()
                worst["grad" if kind == "grads" else "bias"] = max(
                    worst["grad" if kind == "grads" else "bias"], diff)
                if not torch.allclose(value, expected, rtol=tol[0], atol=tol[1]):
                    failures.append(f"iteration {it}: {kind} of {key} differ by {diff:.3g}")
    experts = sorted({type(m).__name__ for chunk in chunks for m in chunk.modules()
                      if type(m).__name__ in ("SequentialMLP", "TorchGroupedExperts")})
    checked = torch.tensor([len(records[0]["grads"])])
    torch.distributed.all_reduce(checked)
    failed = torch.tensor([len(failures)])
    torch.distributed.all_reduce(failed)
    for line in failures[:20]:
        print(f"[rank {torch.distributed.get_rank()}] {line}", file=sys.stderr)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump({"worst": worst, "failures": int(failed), "grad_tensors_checked": int(checked),
                       "experts": experts, "losses": [r["loss"] for r in records]}, handle)
    return 1 if int(failed) else 0


if __name__ == "__main__":
    run_and_exit(main)
