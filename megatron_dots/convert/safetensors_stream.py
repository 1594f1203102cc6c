"""Write sharded safetensors files tensor by tensor, without holding a shard in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte range) and the raw little-endian tensor bytes in header order. When every tensor's
name, shape and dtype is known in advance (as in a conversion plan), the header can be written
first and each tensor appended as soon as it is produced.
"""

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from ..storage.safetensors_file import DTYPES

# torch dtype -> safetensors code, from the one table of codes (the reader's).
_DTYPES = {dtype: code for code, (_, dtype) in DTYPES.items() if dtype is not None}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units like transformers)."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40,
             "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            number = upper[: -len(unit)].strip()
            break
    else:
        number, factor = upper, 1
    try:
        value = float(number) * factor
    except ValueError:
        raise ValueError(f"cannot read the size {text!r} (use e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> List[List[TensorSpec]]:
    """Cut the ordered tensors into shards of at most max_shard_bytes (a bigger tensor alone)."""
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> List[str]:
    """transformers' shard file names (numbered even for one shard: the index lists it)."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsStreamWriter:
    """One safetensors file whose tensors arrive in the declared order."""

    def __init__(self, path: str, specs: Sequence[TensorSpec], metadata: Dict[str, str] = None):
        self.path = path
        self._pending = list(specs)
        header, offset = {}, 0
        for spec in specs:
            if spec.dtype not in _DTYPES:
                raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors code")
            header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        header["__metadata__"] = dict(metadata or {"format": "pt"})
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._pending:
            raise ValueError(f"{self.path}: unexpected tensor {name!r}; the file is complete")
        spec = self._pending.pop(0)
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{self.path}: got {name!r} {tuple(tensor.shape)} {tensor.dtype}, "
                             f"expected {spec.name!r} {spec.shape} {spec.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))

    @property
    def next_spec(self) -> TensorSpec:
        """The tensor the file expects next."""
        return self._pending[0]

    @property
    def complete(self) -> bool:
        return not self._pending

    def close(self) -> None:
        if self._pending:
            self._file.close()
            raise ValueError(f"{self.path}: closed before {self._pending[0].name!r} was written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
