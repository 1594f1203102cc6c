"""Load a converted checkpoint under one parallel layout, check the loss, save it again
(torchrun worker).

Every rank builds its chunks of the model described by the checkpoint, loads them with
Megatron-Core dist_checkpointing (``training.checkpointing.load_checkpoint``), computes the
forward loss of a fixed batch through the pipeline schedule and saves the model under its own
layout (``save_checkpoint``). Rank 0 writes {"loss": ...} to --out.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_dots  # noqa: E402,F401  (compat patches first)
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.convert.mcore_to_hf import open_checkpoint  # noqa: E402
from megatron_dots.model import build_dots_model_chunks  # noqa: E402
from megatron_dots.training import forward_backward  # noqa: E402
from megatron_dots.training.checkpointing import load_checkpoint, save_checkpoint  # noqa: E402

MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ_LENGTH = 4, 2, 16


def fixed_batch(vocab: int) -> torch.Tensor:
    """The batch the test also feeds transformers: [micro-batches, mbs, seq + 1]."""
    gen = torch.Generator().manual_seed(77)
    return torch.randint(0, vocab, (MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ_LENGTH + 1),
                         generator=gen)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--tp", "--pp", "--ep"):
        parser.add_argument(flag, type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    init_distributed()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep)
    model_parallel_cuda_manual_seed(1)
    cfg = open_checkpoint(args.load).cfg
    tc = cfg.to_transformer_config(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep,
        sequence_parallel=args.tp > 1, pipeline_dtype=torch.float32,
        params_dtype=torch.float32, batch_p2p_comm=False)
    chunks = build_dots_model_chunks(cfg, tc, backend="sequential")
    load_checkpoint(chunks, args.load)

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = MICRO_BATCHES // dp_size
    mine = fixed_batch(cfg.vocab_size)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    with torch.no_grad():
        loss = forward_backward(chunks, mine, SEQ_LENGTH, MICRO_BATCH_SIZE, forward_only=True)
    save_checkpoint(chunks, args.save, iteration=7, cfg=cfg)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"loss": loss}, f)


if __name__ == "__main__":
    main()
