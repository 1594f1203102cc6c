"""A transformers `Dots1ForCausalLM` from a Megatron dots model held whole by one process.

For demos and tests; multi-rank checkpoints go through the streaming converter instead.
"""

from typing import Dict, Sequence

import torch

from megatron.core import parallel_state

from ..config import DotsConfig
from . import hf_mapping
from .sharding import local_tensors


def full_state_of_single_rank(chunks: Sequence[torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """Full Megatron state dict of a model that is not split across ranks."""
    sizes = {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert": parallel_state.get_expert_model_parallel_world_size(),
    }
    split = {name: size for name, size in sizes.items() if size > 1}
    if split:
        raise ValueError(
            f"the model is split across ranks ({split} model-parallel sizes); in-memory export "
            "needs the whole model in one process (TP = PP = EP = 1)"
        )
    state = {}
    for chunk in chunks:
        state.update({key: t.detach().clone() for _, key, t in local_tensors(chunk)})
    return state


def to_hf_model(chunks: Sequence[torch.nn.Module], cfg: DotsConfig, dtype=torch.float32):
    """transformers Dots1ForCausalLM with the weights (and expert bias) of `chunks`."""
    from transformers import Dots1Config, Dots1ForCausalLM

    hf_cfg = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    model = Dots1ForCausalLM(Dots1Config(**hf_cfg)).to(dtype).eval()
    hf_state = hf_mapping.mcore_to_hf(full_state_of_single_rank(chunks), cfg)
    missing, unexpected = model.load_state_dict(hf_mapping.fuse_hf_experts(hf_state), strict=False)
    if missing or unexpected:
        raise KeyError(f"export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
