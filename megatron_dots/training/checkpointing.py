"""Save and load training checkpoints with Megatron-Core dist_checkpointing (torch_dist).

Directory layout and common state as in ``storage.checkpoint_format`` (Megatron-LM's). Saves are
atomic: all ranks write into ``ROOT/.iter_N.partial``; rank 0 renames it to ``ROOT/iter_N``
and then rewrites the tracker file, so a crash mid-save leaves the previous checkpoint and the
tracker untouched. Before the rename each rank checksums the data files it wrote and rank 0
writes the integrity manifest (``storage.manifest``). Entries, as in Megatron-LM: ``model``
(one chunk) or ``model0``, ``model1`` ... (virtual pipeline chunks); ``optimizer`` (Megatron-Core's sharded optimizer
state, the distributed optimizer's in the fully reshardable format: it reshards to any
data-parallel or expert-parallel size and loads into the plain optimizer and back, see
``optimizer_checkpoint``); ``opt_param_scheduler``; ``rng_state`` (one object per rank, restored
when the layout is unchanged). Model-only checkpoints (converted, or saved without an
optimizer) load with ``optimizer=None``.
"""

import contextlib
import os
import pickle
import random
import re
import zipfile
import shutil
from typing import Any, Dict, Sequence

import numpy
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from ..config import DotsConfig
from ..convert.sharding import unwrap_model
from ..storage.atomic import atomic_write_text, promote_directory
from ..storage.errors import CheckpointError, last_line
from ..storage.manifest import checkpoint_files, file_records, write_manifest
from ..storage.checkpoint_format import (
    TRACKER,
    dots_common_state,
    iteration_dir,
    resolve_checkpoint_dir,
)
from .optimizer_checkpoint import OptimizerLoadPlan


def _model_keys(num_chunks: int):
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _model_entries(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    return {key: unwrap_model(chunk).sharded_state_dict()
            for key, chunk in zip(_model_keys(len(chunks)), chunks)}


# Megatron-LM's metadata for new checkpoints: optimizer keys without chain prefixes.
_OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True,
                       "distrib_optim_sharding_type": "fully_reshardable"}


def parallel_layout(num_chunks: int) -> Dict[str, int]:
    """This process's parallel sizes, as stored in the common state."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "vpp": num_chunks,
    }


def _rng_state() -> Dict[str, Any]:
    state = {"random": random.getstate(), "numpy": numpy.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_entry(data=None) -> ShardedObject:
    """One RNG object per (pp, tp, dp) rank: identical layouts restore every rank's streams."""
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_data_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


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


_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")


def _write_manifest(directory: str, rank: int) -> None:
    """The checkpoint's integrity manifest: each rank checksums the data files it wrote
    (``__{rank}_*.distcp``), rank 0 the rest, and rank 0 writes the manifest."""
    files = checkpoint_files(directory)
    owner = {f: int(m.group(1)) if (m := _RANK_FILE.match(f)) else 0 for f in files}
    records = file_records(directory, [f for f in files if owner[f] == rank])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size() if rank == 0 else None
        torch.distributed.gather_object(records, gathered, dst=0)
        if rank == 0:
            records = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        write_manifest(directory, records)


def save_checkpoint(
    chunks: Sequence[torch.nn.Module], root: str, iteration: int, cfg: DotsConfig,
    optimizer=None, scheduler=None, **extra
) -> str:
    """Save every rank's model chunks (and optimizer, scheduler, RNG state when given) as
    ROOT/iter_{iteration:07d}; returns that path.

    `extra` goes into the common state's `dots` entry (e.g. consumed samples).
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
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_OPTIMIZER_METADATA)
        state["rng_state"] = _rng_entry(_rng_state())
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    padded = unwrap_model(chunks[0]).vocab_size
    extra.setdefault("training_state", optimizer is not None)
    state.update(dots_common_state(cfg, padded, parallel_layout(len(chunks)), iteration, **extra))
    dist_checkpointing.save(state, partial)
    _barrier()
    _write_manifest(partial, rank)
    if rank == 0:
        promote_directory(partial, final)
        atomic_write_text(os.path.join(root, TRACKER), str(iteration))
    _barrier()
    return final


@contextlib.contextmanager
def _damage_named(directory: str):
    """Reading errors of damaged files (what the size and structure checks cannot see, such as
    changed bytes in a checkpoint without a manifest) as a `CheckpointError` naming the
    directory and the cause, not a traceback from inside PyTorch's checkpoint reader."""
    try:
        yield
    except (CheckpointException, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            RuntimeError) as err:
        if isinstance(err, RuntimeError) and not isinstance(err, CheckpointException) and (
                "PytorchStreamReader" not in str(err)):
            raise
        raise CheckpointError(directory, f"damaged: reading it failed ({type(err).__name__}: "
                              f"{last_line(err)}); verify it with `megatron-dots "
                              f"verify --ckpt {directory} --full`") from err


def load_common_state(directory: str) -> Dict[str, Any]:
    """The common (non-sharded) state of the torch_dist checkpoint `directory`."""
    with _damage_named(directory):
        return dist_checkpointing.load_common_state_dict(directory)


def load_checkpoint(
    chunks: Sequence[torch.nn.Module], path: str, optimizer=None, scheduler=None,
    load_rng: bool = True,
) -> Dict[str, Any]:
    """Load a checkpoint saved under any layout into these chunks (and the optimizer and
    scheduler when given; RNG streams when the layout is unchanged); returns the common state.

    path: a checkpoint root (its tracker file picks the iteration) or a torch_dist directory.
    """
    directory = resolve_checkpoint_dir(path)
    common = load_common_state(directory)
    dots = common.get("dots", {})
    if optimizer is not None and not dots.get("training_state", False):
        raise CheckpointError(directory, "holds model weights only (no optimizer state); load "
                              "it with --finetune or --no-load-optim")
    state = _model_entries(chunks)
    plan = None
    if optimizer is not None:
        plan = OptimizerLoadPlan(optimizer, state, common.get("optimizer"), _OPTIMIZER_METADATA)
        state["optimizer"] = plan.request
        same_layout = dots.get("parallel") == parallel_layout(len(chunks))
        if load_rng and same_layout:
            state["rng_state"] = _rng_entry()
    with _damage_named(directory):
        loaded = dist_checkpointing.load(state, directory)
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        unwrap_model(chunk).load_state_dict(loaded.pop(key))
    if plan is not None:
        optimizer.load_state_dict(plan.finish(loaded.pop("optimizer")))
        if plan.translated:
            loaded["optimizer_translation"] = plan.describe()
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded.pop("opt_param_scheduler"))
    if "rng_state" in loaded:
        _set_rng_state(loaded.pop("rng_state"))
    return loaded
