"""Streaming writer of Megatron-Core ``torch_dist`` checkpoints (one tensor in memory at a time).

Megatron-Core's ``dist_checkpointing.save`` needs the whole sharded state dict in memory. This
writer produces the same on-disk format (PyTorch Distributed Checkpoint files + ``.metadata``,
Megatron's ``metadata.json`` and ``common.pt``) from *producers*: callables that return one
chunk of a global tensor when the file writer asks for it. Each group of chunks becomes one
``__{g}_0.distcp`` file, as if a rank had written it, so a 280 GB model is not one huge file.

Only public PyTorch DCP pieces are used: ``FileSystemWriter`` (``prepare_global_plan``,
``write_data``, ``finish``), ``SavePlan``/``WriteItem`` and ``create_default_global_save_plan``.
"""

import io
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

# What Megatron-Core writes to metadata.json for a torch_dist checkpoint (0.16 and 0.19).
MCORE_CHECKPOINT_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass
class Chunk:
    """One chunk of a stored tensor: its place in the global tensor and how to make it."""

    key: str
    global_shape: Tuple[int, ...]
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


@dataclass
class PickledObject:
    """A ShardedObject-style entry (pickled with torch.save), e.g. `_extra_state`."""

    key: str
    value: Any


class _LazyPlanner(SavePlanner):
    """Hands the file writer each chunk only when it writes it."""

    def __init__(self, producers: Dict[Tuple[str, Tuple[int, ...]], Callable], objects: Dict):
        self._producers = producers
        self._objects = objects

    def set_up_planner(self, *args, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    def create_local_plan(self):  # pragma: no cover
        raise NotImplementedError

    def create_global_plan(self, all_plans):  # pragma: no cover
        raise NotImplementedError

    def finish_plan(self, new_plan):
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            # Megatron-Core stores the list of the (same-key) ShardedObjects' data.
            torch.save([self._objects[write_item.index.fqn]], buffer)
            buffer.seek(0)
            return buffer
        key = (write_item.index.fqn, tuple(write_item.index.offset))
        tensor = self._producers.pop(key)()
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{write_item.index.fqn}: produced shape {tuple(tensor.shape)} at "
                             f"offset {key[1]}, expected {expected}")
        return tensor.to(write_item.tensor_data.properties.dtype).contiguous()


def _tensor_item(chunk: Chunk) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(chunk.key, torch.Size(chunk.offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(chunk.offsets),
                                       sizes=torch.Size(chunk.sizes)),
            properties=TensorProperties(dtype=chunk.dtype),
            size=torch.Size(chunk.global_shape),
        ),
    )


def _object_item(obj: PickledObject) -> WriteItem:
    return WriteItem(index=MetadataIndex(obj.key), type=WriteItemType.BYTE_IO,
                     bytes_io_data=BytesIOWriteData(nbytes=0))


def write_dist_checkpoint(
    directory: str,
    groups: Sequence[Sequence[Chunk]],
    objects: Sequence[PickledObject],
    common_state: Dict[str, Any],
    on_chunk: Optional[Callable[[Chunk], None]] = None,
) -> None:
    """Write a torch_dist checkpoint into the (existing, empty) `directory`.

    groups: chunks per data file; each file is written chunk by chunk, in order.
    objects: pickled entries, written with the first group.
    common_state: what Megatron-Core's `load_common` returns (saved as common.pt).
    on_chunk: called after each chunk is produced (progress reporting).
    """
    plans = []
    for g, group in enumerate(groups):
        items = [_tensor_item(c) for c in group]
        if g == 0:
            items += [_object_item(o) for o in objects]
        plans.append(SavePlan(items))
    global_plans, metadata = create_default_global_save_plan(plans)
    writer = FileSystemWriter(directory, single_file_per_rank=True, sync_files=True,
                              thread_count=1, overwrite=False)
    writer.set_up_storage_writer(True)
    global_plans = writer.prepare_global_plan(global_plans)
    object_values = {o.key: o.value for o in objects}
    results = []
    for group, plan in zip(groups, global_plans):
        producers = {}
        for chunk in group:
            producers[(chunk.key, tuple(chunk.offsets))] = _reporting(chunk, on_chunk)
        results.append(writer.write_data(plan, _LazyPlanner(producers, object_values)).wait())
    torch.save(common_state, f"{directory}/common.pt")
    with open(f"{directory}/metadata.json", "w") as f:
        json.dump(MCORE_CHECKPOINT_METADATA, f)
    writer.finish(metadata, results)  # .metadata last: its presence marks the data complete


def _reporting(chunk: Chunk, on_chunk):
    def produce():
        tensor = chunk.produce()
        if on_chunk is not None:
            on_chunk(chunk)
        return tensor

    return produce
