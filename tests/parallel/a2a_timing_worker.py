"""--dots-a2a-timing's probes on the real schedules (torchrun worker, EP over all ranks).

Each rank builds tiny dots, plain and with the all-to-all overlap schedule (Megatron-Core's
combined 1F1B), installs `A2ATiming` with a clock that advances 1 ms per mark, runs one
forward + backward of --micro-batches micro-batches and writes its per-layer sums to
OUT.rank<N>.json. With that clock every stage lasts exactly 1 ms and so does every probed
stream wait, so the sums count what ran. The overlap run forces the GPU's stream-wait probes
(on CPU the waits are no-ops), so the probes meet the real layer plans of this megatron-core.
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
from megatron_dots.model import build_dots_model_chunks  # noqa: E402
from megatron_dots.schedule.a2a_overlap import enable_a2a_overlap  # noqa: E402
from megatron_dots.telemetry.a2a_timing import A2ATiming, WallClock  # noqa: E402
from megatron_dots.training.step import forward_backward, wrap_with_ddp  # noqa: E402
from reference import tiny_config  # noqa: E402
from worker_common import run_and_exit  # noqa: E402

MICRO_BATCH_SIZE, SEQ_LENGTH = 2, 16


class TickClock(WallClock):
    def __init__(self):
        self.ticks = 0
        super().__init__(now=self._tick)

    def _tick(self):
        self.ticks += 1
        return self.ticks * 1e-3


def sums(overlap: bool, micro_batches: int):
    model_parallel_cuda_manual_seed(123)
    cfg = tiny_config()
    tc = cfg.to_transformer_config(
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size())
    if overlap:
        enable_a2a_overlap(tc)
    chunks = wrap_with_ddp(build_dots_model_chunks(cfg, tc), tc)
    timing = A2ATiming(chunks, clock=TickClock(), probe_waits=overlap)
    gen = torch.Generator().manual_seed(7 + torch.distributed.get_rank())
    batch = torch.randint(0, cfg.vocab_size, (micro_batches, MICRO_BATCH_SIZE, SEQ_LENGTH + 1),
                          generator=gen)
    forward_backward(chunks, list(batch), SEQ_LENGTH, MICRO_BATCH_SIZE)
    ms, forwards = timing.take()
    timing.remove()
    return {layer: {"ms": ms[layer], "forwards": forwards.get(layer, 0)} for layer in ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=torch.distributed.get_world_size())
    result = {name: sums(overlap, args.micro_batches)
              for name, overlap in (("plain", False), ("overlap", True))}
    with open(f"{args.out}.rank{torch.distributed.get_rank()}.json", "w") as handle:
        json.dump(result, handle)
    parallel_state.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    run_and_exit(main)
