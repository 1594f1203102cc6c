"""Save and load model checkpoints with Megatron-Core dist_checkpointing (torch_dist format).

Directory layout and common state as in ``checkpoint_format`` (Megatron-LM's). Saves are
atomic: all ranks write into ``ROOT/.iter_N.partial``; rank 0 renames it to ``ROOT/iter_N``
and then rewrites the tracker file, so a crash mid-save leaves the previous checkpoint and the
tracker untouched. The model entries are ``model`` (one chunk) or ``model0``, ``model1`` ...
(virtual pipeline chunks), as in Megatron-LM.
"""

import os
import shutil
from typing import Any, Dict, Sequence

import torch
from megatron.core import dist_checkpointing, parallel_state

from ..config import DotsConfig
from ..convert.atomic import atomic_write_text, promote_directory
from ..convert.sharding import unwrap_model
from .checkpoint_format import (
    TRACKER,
    dots_common_state,
    iteration_dir,
    resolve_checkpoint_dir,
)


def _model_entries(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    if len(chunks) == 1:
        return {"model": unwrap_model(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(chunk).sharded_state_dict()
            for i, chunk in enumerate(chunks)}


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _require_psutil() -> None:
    # megatron-core 0.16.1 / 0.19.2 dist_checkpointing/strategies/filesystem_async.py: the
    # writer's worker process calls psutil before its try block; without psutil it dies
    # silently and the parent waits on its queue forever.
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise RuntimeError("saving a torch_dist checkpoint needs psutil (pip install psutil): "
                           "megatron-core's writer hangs without it") from None


def save_checkpoint(
    chunks: Sequence[torch.nn.Module], root: str, iteration: int, cfg: DotsConfig, **extra
) -> str:
    """Save the model chunks of every rank as ROOT/iter_{iteration:07d}; returns that path.

    `extra` goes into the common state's `dots` entry (e.g. consumed tokens).
    """
    _require_psutil()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    final = iteration_dir(root, iteration)
    partial = os.path.join(root, f".{os.path.basename(final)}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    state = _model_entries(chunks)
    parallel = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "vpp": len(chunks),
    }
    padded = unwrap_model(chunks[0]).vocab_size
    state.update(dots_common_state(cfg, padded, parallel, iteration, **extra))
    dist_checkpointing.save(state, partial)
    _barrier()
    if rank == 0:
        promote_directory(partial, final)
        atomic_write_text(os.path.join(root, TRACKER), str(iteration))
    _barrier()
    return final


def load_checkpoint(chunks: Sequence[torch.nn.Module], path: str) -> Dict[str, Any]:
    """Load model weights saved under any layout into these chunks; returns the common state.

    path: a checkpoint root (its tracker file picks the iteration) or a torch_dist directory.
    """
    directory = resolve_checkpoint_dir(path)
    loaded = dist_checkpointing.load(_model_entries(chunks), directory)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        unwrap_model(chunk).load_state_dict(loaded.pop(key))
    return loaded
