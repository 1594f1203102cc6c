"""Structural checks of checkpoints that need no manifest (foreign ones included).

torch_dist (Megatron-Core / PyTorch DCP): ``metadata.json`` names the torch_dist backend,
``.metadata`` unpickles, every storage item's file exists and holds the item's byte range, and
every tensor's chunks lie inside its global shape and add up to it. Hugging Face: config.json
is a JSON object, the index maps each tensor to a shard that exists and holds it, and every
safetensors header is valid (see `safetensors_file`). With `deep`, the CRC-32s that the zip
records of ``torch.save`` carry are checked too (DCP stores each item that way), which finds
changed bytes in a checkpoint without a manifest; safetensors carry no checksum.

`read_dcp_metadata` raises a `CheckpointError` naming the file; the others return the damage
found as `CheckpointError`s naming the files and do not raise.
"""

import io
import json
import os
import zipfile
import zlib
from typing import Callable, Dict, List, Optional

from .errors import CheckpointError
from .safetensors_file import read_header

DCP_METADATA = ".metadata"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"


def _json_object(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(path, f"not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "not a JSON object")
    return data


def read_dcp_metadata(directory: str):
    """The DCP `Metadata` of a torch_dist directory, or `CheckpointError` naming the file."""
    meta_json = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta_json):
        raise CheckpointError(meta_json, "missing: not a Megatron-Core distributed checkpoint "
                              "directory (or an incomplete one)")
    backend = _json_object(meta_json).get("sharded_backend")
    if backend != "torch_dist":
        raise CheckpointError(meta_json, f"sharded_backend is {backend!r}; only 'torch_dist' "
                              "checkpoints can be read")
    path = os.path.join(directory, DCP_METADATA)
    if not os.path.isfile(path):
        raise CheckpointError(path, "missing: the checkpoint was not finished (a save that "
                              "crashed leaves no .metadata)")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(directory).read_metadata()
        metadata.state_dict_metadata.items()
        storage = dict(metadata.storage_data)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is damage to report
        raise CheckpointError(path, f"unreadable ({type(err).__name__}: {err})") from None
    if not storage:
        raise CheckpointError(path, "lists no stored data")
    return metadata


def dist_checkpoint_damage(directory: str, metadata, deep: bool = False,
                           on_bytes: Optional[Callable[[int], None]] = None
                           ) -> List[CheckpointError]:
    """Structural damage of the torch_dist checkpoint in `directory` whose `.metadata` is
    `metadata` (from `read_dcp_metadata`; see the module docstring)."""
    damage: List[CheckpointError] = []
    sizes: Dict[str, Optional[int]] = {}
    by_file: Dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        rel = getattr(info, "relative_path", None)
        path = os.path.join(directory, str(rel))
        if not isinstance(rel, str) or os.path.basename(rel) != rel:
            return [CheckpointError(os.path.join(directory, DCP_METADATA),
                                    f"{index.fqn!r} is stored in {rel!r}, not a file of the "
                                    "checkpoint directory")]
        if rel not in sizes:
            sizes[rel] = os.path.getsize(path) if os.path.isfile(path) else None
            if sizes[rel] is None:
                damage.append(CheckpointError(path, f"missing (listed in {DCP_METADATA})"))
        end = info.offset + info.length
        if sizes[rel] is not None and end > sizes[rel]:
            if not any(d.path == path for d in damage):
                damage.append(CheckpointError(path, f"{sizes[rel]} bytes, but {index.fqn!r} "
                                              f"is stored up to byte {end} (truncated)"))
        by_file.setdefault(rel, []).append((info.offset, info.length, index.fqn))
    damage += _chunk_damage(directory, metadata)
    if deep and not damage:
        for rel, items in sorted(by_file.items()):
            damage += _zip_crc_damage(os.path.join(directory, rel), sorted(items), on_bytes)
        common = os.path.join(directory, "common.pt")
        if os.path.isfile(common):
            damage += _zip_crc_damage(common, [(0, os.path.getsize(common), "common.pt")],
                                      on_bytes)
    return damage


def _chunk_damage(directory: str, metadata) -> List[CheckpointError]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = os.path.join(directory, DCP_METADATA)
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        size = tuple(md.size)
        total, covered = 1, 0
        for dim in size:
            total *= dim
        for chunk in md.chunks:
            if len(chunk.offsets) != len(size) or any(
                    o < 0 or o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, size)):
                return [CheckpointError(path, f"tensor {fqn!r}: a chunk at {list(chunk.offsets)}"
                                        f" of {list(chunk.sizes)} lies outside its shape "
                                        f"{list(size)}")]
            n = 1
            for dim in chunk.sizes:
                n *= dim
            covered += n
        if covered != total:
            return [CheckpointError(path, f"tensor {fqn!r}: its chunks hold {covered} of its "
                                    f"{total} elements")]
    return []


def _zip_crc_damage(path: str, items, on_bytes) -> List[CheckpointError]:
    """CRC-32 check of each torch.save (zip) record among the byte ranges `items` of `path`."""
    with open(path, "rb") as f:
        for offset, length, fqn in items:
            f.seek(offset)
            data = f.read(length)
            if on_bytes is not None:
                on_bytes(len(data))
            if not data.startswith(b"PK\x03\x04"):
                continue  # raw bytes (not a torch.save record): nothing to check against
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
                return [CheckpointError(path, f"{fqn!r}: damaged record ({err})")]
            if bad is not None:
                return [CheckpointError(path, f"{fqn!r}: CRC-32 mismatch in {bad} (its bytes "
                                        "changed)")]
    return []


def read_hf_weight_map(index: str) -> Dict[str, str]:
    """The `weight_map` of an HF `model.safetensors.index.json`: tensor name -> shard file name
    in the same directory; `CheckpointError` naming the index otherwise."""
    try:
        weight_map = _json_object(index)["weight_map"]
    except KeyError:
        raise CheckpointError(index, "has no 'weight_map'") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(index, "'weight_map' is not an object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise CheckpointError(index, f"{name!r} maps to {shard!r}, not a file name in the "
                                  "model directory")
    return weight_map


def hf_directory_damage(directory: str) -> List[CheckpointError]:
    """Structural damage of the Hugging Face model directory `directory`."""
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
        return [CheckpointError(config, "missing: not a Hugging Face model directory")]
    damage: List[CheckpointError] = []
    try:
        _json_object(config)
    except CheckpointError as err:
        damage.append(err)
    index = os.path.join(directory, HF_INDEX)
    weight_map = None
    if os.path.isfile(index):
        try:
            weight_map = read_hf_weight_map(index)
        except CheckpointError as err:
            return damage + [err]
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, HF_SINGLE)):
        shards = [HF_SINGLE]
    else:
        return damage + [CheckpointError(directory, f"has neither {HF_INDEX} nor {HF_SINGLE}")]
    names: Dict[str, set] = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            damage.append(CheckpointError(index, f"names shard {shard!r}, which is missing"))
            continue
        try:
            names[shard] = set(read_header(path)[0])
        except CheckpointError as err:
            damage.append(err)
    for name, shard in (weight_map or {}).items():
        if shard in names and name not in names[shard]:
            damage.append(CheckpointError(os.path.join(directory, shard),
                                          f"tensor {name!r} is missing ({HF_INDEX} places it "
                                          "here)"))
            break
    return damage
