"""The memory a rank needs besides activations, and what that leaves of the budget for them.

Static memory is predicted from the parameters this rank holds, not read from the allocator, so
it is the same on every rank that holds the same parameters (tensor- and expert-parallel peers
must agree on recompute plans): parameters, Megatron DDP's gradient buffer (fp32 with
`grad_reduce_in_fp32`), and Adam's state (two fp32 moments, plus an fp32 master copy of
half-precision parameters), which the distributed optimizer shards over the data-parallel ranks
(expert parameters over the expert-data-parallel ranks).
"""

from typing import Iterable, Optional

import torch

GIB = float(1 << 30)


def _unique_parameters(chunks: Iterable[torch.nn.Module]):
    seen = set()
    for chunk in chunks:
        for param in chunk.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield param


def static_bytes(
    chunks: Iterable[torch.nn.Module],
    *,
    grad_reduce_in_fp32: bool = True,
    distributed_optimizer: bool = False,
    data_parallel_size: int = 1,
    expert_data_parallel_size: Optional[int] = None,
) -> int:
    """Bytes of parameters, gradients and Adam state of these chunks on this rank."""
    total = 0.0
    for param in _unique_parameters(chunks):
        n = param.numel()
        size = param.element_size()
        grad = 4 if grad_reduce_in_fp32 else size
        state = 8 + (4 if param.dtype != torch.float32 else 0)
        if distributed_optimizer:
            expert = not getattr(param, "allreduce", True)
            shards = (expert_data_parallel_size or data_parallel_size) if expert else data_parallel_size
            state /= max(shards, 1)
        total += n * (size + grad + state)
    return int(total)


def format_bytes(n: float) -> str:
    """GiB with two decimals, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def activation_budget(budget_gib: float, static: int) -> float:
    """Bytes left for activations from a per-GPU budget of `budget_gib` GiB."""
    left = budget_gib * GIB - static
    if left <= 0:
        raise ValueError(
            f"--dots-recompute-budget-gb {budget_gib:g} leaves nothing for activations: this "
            f"rank's parameters, gradients and optimizer state take {format_bytes(static)}"
        )
    return left
