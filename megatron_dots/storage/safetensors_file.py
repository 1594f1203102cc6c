"""One safetensors file: its header, validated as the safetensors library validates it, and
reads of contiguous element ranges.

The header is checked before anything is allocated from it: its length (8 bytes, little
endian) must fit the file and stay under the library's bound (100 MB); it must be a JSON object
of entries with a known dtype, a shape of non-negative integers and ``data_offsets`` that tile
the data area exactly (in bounds, no gap, no overlap, size = elements x item size). Any
violation is a `CheckpointError` naming the file (and tensor).
"""

import json
import os
import struct
from typing import Dict, Iterator, Tuple

import torch

from .errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE

# dtype code -> (item size in bytes, torch dtype or None where torch has none we read)
DTYPES: Dict[str, Tuple[int, object]] = {
    "BOOL": (1, torch.bool), "U8": (1, torch.uint8), "I8": (1, torch.int8),
    "F8_E5M2": (1, None), "F8_E4M3": (1, None), "I16": (2, torch.int16), "U16": (2, None),
    "F16": (2, torch.float16), "BF16": (2, torch.bfloat16), "I32": (4, torch.int32),
    "U32": (4, None), "F32": (4, torch.float32), "I64": (8, torch.int64), "U64": (8, None),
    "F64": (8, torch.float64),
}
# The dtypes a dots checkpoint's weights come in.
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def read_header(path: str) -> Tuple[Dict[str, dict], int, int]:
    """(entries without __metadata__, data start offset, data area length) of a safetensors
    file; raises `CheckpointError` for anything the safetensors library would refuse."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"{size} bytes: too short for a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(path, f"header length {length} is impossible (file "
                                      f"{size} bytes, limit {MAX_HEADER_BYTES}): not a "
                                      "safetensors file, or a damaged one")
            raw = f.read(length)
    except OSError as err:
        raise CheckpointError(path, f"unreadable ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(path, f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(path, "__metadata__ is not a map of strings")
    data_length = size - 8 - length
    _check_entries(path, header, data_length)
    return header, 8 + length, data_length


def _check_entries(path: str, header: Dict[str, dict], data_length: int) -> None:
    spans = []
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(path, f"{where}: header entry is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in DTYPES:
            raise CheckpointError(path, f"{where}: unknown dtype {code!r}")
        if not (isinstance(shape, list) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(path, f"{where}: shape {shape!r} is not a list of "
                                  "non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(path, f"{where}: data_offsets {offsets!r} are not "
                                  "[begin, end] with 0 <= begin <= end")
        if offsets[1] - offsets[0] != _numel(shape) * DTYPES[code][0]:
            raise CheckpointError(path, f"{where}: data_offsets span {offsets[1] - offsets[0]} "
                                  f"bytes, shape {shape} of {code} needs "
                                  f"{_numel(shape) * DTYPES[code][0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            kind = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(path, f"tensor {name!r}: data_offsets {kind}")
        end = stop
    if end > data_length:
        raise CheckpointError(path, f"tensors need {end} bytes of data, the file holds "
                              f"{data_length} (truncated?)")
    if end < data_length:
        raise CheckpointError(path, f"{data_length - end} bytes after the last tensor")


class SafetensorsFile:
    """The validated header of one safetensors file, and reads of contiguous element ranges."""

    def __init__(self, path: str):
        self.path = path
        self._entries, self._data_start, _ = read_header(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        code = self._entries[name]["dtype"]
        if code not in WEIGHT_DTYPES:
            raise CheckpointError(self.path, f"tensor {name!r} has dtype {code}; weights "
                                  f"must be one of {', '.join(WEIGHT_DTYPES)}")
        return DTYPES[code][1]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str, element_offset: int, shape: Tuple[int, ...]) -> torch.Tensor:
        """`shape` elements of tensor `name`, starting `element_offset` elements in."""
        dtype = self.dtype(name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        buffer = torch.empty(_numel(shape) * itemsize, dtype=torch.uint8)
        start = self._data_start + self._entries[name]["data_offsets"][0]
        with open(self.path, "rb") as f:
            f.seek(start + element_offset * itemsize)
            if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
                raise CheckpointError(self.path, f"tensor {name!r}: short read (the file "
                                      "changed while it was read?)")
        return buffer.view(dtype).reshape(shape)
