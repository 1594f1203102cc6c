"""Gather expert-load telemetry from every rank's dots routers.

Each `DotsRouter` counts the tokens it sent to every (global) expert since it was last read.
`gather_expert_load` reads and resets those counters on every rank and sums them over the
world into one `[moe_layers, experts]` table (every rank must call it): data-parallel and
expert-parallel ranks route different tokens, pipeline stages hold different layers, and
tensor-parallel ranks route the same tokens unless sequence parallelism splits them (then
they are summed, else counted once). The router biases come along, one row per layer.
"""

from typing import List, Tuple

import torch

from ..model.router import DotsRouter


def _routers(chunks) -> List[DotsRouter]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, DotsRouter)]


def gather_expert_load(chunks, config) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """(counts [L, E] float64, bias [L, E] float64, 1-based global layer numbers), the same
    on every rank; L counts the model's MoE layers."""
    from megatron.core import parallel_state

    layers = [i + 1 for i, moe in enumerate(config.moe_layer_freq) if moe]
    row = {layer: i for i, layer in enumerate(layers)}
    experts = config.num_moe_experts
    routers = _routers(chunks)
    device = routers[0].expert_load.device if routers else torch.device("cpu")
    counts = torch.zeros(len(layers), experts, dtype=torch.float64, device=device)
    bias = torch.zeros_like(counts)
    for router in routers:
        counts[row[router.layer_number]] += router.take_expert_load().double()
        bias[row[router.layer_number]] += router.expert_bias.detach().double()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(bias)
        holders = (torch.distributed.get_world_size()
                   // parallel_state.get_pipeline_model_parallel_world_size())
        bias /= holders
        if not config.sequence_parallel:
            counts /= parallel_state.get_tensor_model_parallel_world_size()
    return counts.cpu(), bias.cpu(), layers
