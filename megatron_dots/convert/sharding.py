"""Between full (unsharded, global-index) Megatron tensors and one rank's model chunk.

A model chunk's state dict uses local layer and expert indices and holds TP / expert-TP shards.
`global_key` renames a local key to the full key of `hf_mapping`; `shard` cuts a full tensor
down to this rank's piece using the partition attributes Megatron-Core puts on parameters
(`tensor_model_parallel`, `partition_dim`; expert parameters use the expert-TP rank).
`load_shards` fills a chunk from full tensors made on demand (`load_full_state_dict`: from a
full state dict); tests use `shard` to compare
gradients of any layout against a single-process run. The stacked weights of grouped experts
(``mlp.experts.weight{1,2}`` [E_local, ...]) appear as one entry per expert under
`SequentialMLP`'s full keys, so every backend maps to the same full state dict.
"""

import re
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\.)")
_TE_EXPERT = re.compile(r"(mlp\.experts\.linear_fc[12]\.weight)(\d+)$")
_GROUPED_EXPERT = re.compile(r"(mlp\.experts\.)weight([12])$")
_GLU = re.compile(r"linear_fc1\.weight\d*$")


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def global_key(chunk: torch.nn.Module, local_key: str) -> str:
    """Full key (global layer / expert indices) of a key of `chunk.state_dict()`."""
    m = _LAYER.match(local_key)
    if not m:
        return local_key
    layer = unwrap_model(chunk).decoder.layers[int(m.group(1))]
    key = f"decoder.layers.{layer.layer_number - 1}." + local_key[m.end():]
    indices = getattr(layer.mlp, "local_expert_indices", None)
    if indices is not None:
        key = _LOCAL_EXPERT.sub(lambda e: f"{e.group(1)}{indices[int(e.group(2))]}{e.group(3)}", key)
        key = _TE_EXPERT.sub(lambda e: f"{e.group(1)}{indices[int(e.group(2))]}", key)
    return key


def _tp_rank_and_size(tensor: torch.Tensor) -> Tuple[int, int]:
    if getattr(tensor, "allreduce", True) is False:  # expert parameter
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def shard(full: torch.Tensor, local: torch.Tensor, key: str) -> torch.Tensor:
    """This rank's piece of `full`, laid out like the local tensor `local` (a parameter)."""
    if not getattr(local, "tensor_model_parallel", False):
        return full
    rank, size = _tp_rank_and_size(local)
    dim = local.partition_dim
    if _GLU.search(key):  # [gate; up]: each rank holds [gate_r; up_r]
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, size, dim)[rank], torch.chunk(up, size, dim)[rank]], dim)
    return torch.chunk(full, size, dim=dim)[rank]


def _expert_view(stacked: torch.Tensor, e: int) -> torch.Tensor:
    """Expert `e` of a stacked grouped-experts weight, with the partition attributes of the
    per-expert linear weight it equals."""
    view = stacked[e]
    view.tensor_model_parallel = True
    view.partition_dim = stacked.partition_dim - 1
    view.allreduce = stacked.allreduce
    return view


def _entries(chunk: torch.nn.Module) -> Iterator[Tuple[str, str, torch.Tensor, Optional[int]]]:
    """(local key, full key, tensor, expert row of a stacked weight or None)."""
    chunk = unwrap_model(chunk)
    for key, tensor in chunk.state_dict(keep_vars=True).items():
        if key.endswith("_extra_state"):
            continue
        grouped = _GROUPED_EXPERT.search(key)
        if grouped is None:
            yield key, global_key(chunk, key), tensor, None
            continue
        fc = "linear_fc" + grouped.group(2)
        for e in range(tensor.shape[0]):
            per_expert = key[:grouped.start()] + f"{grouped.group(1)}local_experts.{e}.{fc}.weight"
            yield key, global_key(chunk, per_expert), _expert_view(tensor, e), e


def local_tensors(chunk: torch.nn.Module) -> Iterator[Tuple[str, str, torch.Tensor]]:
    """(local key, full key, tensor) for every persistent tensor of the chunk (DDP unwrapped);
    a grouped-experts weight gives one view per expert."""
    for key, full, tensor, _ in _entries(chunk):
        yield key, full, tensor


def load_shards(chunk: torch.nn.Module, full_tensor: Callable[[str, str], torch.Tensor]) -> None:
    """Copy into every tensor of `chunk` its shard of `full_tensor(full key, local key)`, one
    full tensor at a time; a shard of another shape is a ValueError naming the key."""
    with torch.no_grad():
        for local_key, key, tensor in local_tensors(chunk):
            piece = shard(full_tensor(key, local_key), tensor, key)
            if piece.shape != tensor.shape:
                raise ValueError(
                    f"{key}: shard shape {tuple(piece.shape)} != parameter {tuple(tensor.shape)}"
                )
            tensor.copy_(piece)


def load_full_state_dict(chunk: torch.nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Copy the matching shards of a full state dict into `chunk`; every tensor must be found."""
    def lookup(key: str, local_key: str) -> torch.Tensor:
        if key not in full:
            raise KeyError(f"full state dict has no {key!r} (needed for {local_key!r})")
        return full[key]

    load_shards(chunk, lookup)


def local_grads(chunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """{full key: gradient shard} of the chunk's parameters (DDP's `main_grad` when present)."""
    named = dict(unwrap_model(chunk).named_parameters())
    out = {}
    for local_key, key, _, expert in _entries(chunk):
        param = named.get(local_key)
        if param is None:  # a buffer, e.g. the router's expert bias
            continue
        grad = getattr(param, "main_grad", param.grad)
        if grad is not None and expert is not None:
            grad = grad[expert]
        out[key] = None if grad is None else grad.detach().clone()
    return out
