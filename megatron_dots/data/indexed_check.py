"""Structural check of a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) before
Megatron-Core opens it.

Megatron-Core's reader asserts on a bad magic number and otherwise trusts the index: a
truncated ``.idx`` fails inside numpy, a truncated ``.bin`` or wrong pointers read past the
data or yield garbage samples much later. Here the ``.idx`` header (magic, version, dtype
code), its exact size for the counts it declares, the sequence lengths and pointers (contiguous
in ``.bin``, ending at its size) and the document indices (0 .. sequence count, ascending) are
checked with vectorised numpy over the memory-mapped index: one `DataFileError` naming the file.
Token values are not scanned (that would read the whole ``.bin``).
"""

import os
import struct

import numpy

from ..storage.errors import DataFileError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
# Megatron-Core's indexed_dataset.DType codes.
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
_INTEGER_CODES = {1, 2, 3, 4, 5, 8}
_HEADER = 9 + 8 + 1 + 8 + 8


def check_indexed_dataset(prefix: str) -> int:
    """Raise `DataFileError` unless PREFIX.idx / PREFIX.bin form a readable dataset; returns
    its number of documents."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_path):
        if not os.path.isfile(path):
            raise DataFileError(path, "missing")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER)
    if len(head) < _HEADER or head[:9] != INDEX_MAGIC:
        raise DataFileError(idx, "not a Megatron indexed-dataset index (bad magic number)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise DataFileError(idx, f"index version {version}; only version 1 is supported")
    if code not in _INTEGER_CODES:
        raise DataFileError(idx, f"token dtype code {code} is not an integer type "
                            f"(codes {sorted(_INTEGER_CODES)})")
    expected = _HEADER + 12 * sequences + 8 * documents
    if size not in (expected, expected + sequences):  # + one mode byte each when multimodal
        raise DataFileError(idx, f"{size} bytes, but {sequences} sequences and {documents} "
                            f"document boundaries need {expected} (truncated or damaged)")
    index = numpy.memmap(idx, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(index, numpy.int32, sequences, _HEADER).astype(numpy.int64)
    pointers = numpy.frombuffer(index, numpy.int64, sequences, _HEADER + 4 * sequences)
    bounds = numpy.frombuffer(index, numpy.int64, documents, _HEADER + 12 * sequences)
    itemsize = _DTYPE_SIZES[code]
    if sequences and (lengths < 0).any():
        raise DataFileError(idx, "a sequence length is negative")
    starts = numpy.concatenate(([0], numpy.cumsum(lengths)[:-1])) * itemsize
    if sequences and not numpy.array_equal(pointers, starts):
        bad = int(numpy.argmax(pointers != starts))
        raise DataFileError(idx, f"sequence {bad} points to byte {int(pointers[bad])}, "
                            f"its predecessors end at {int(starts[bad])}")
    data_bytes = int(lengths.sum()) * itemsize
    if data_bytes != os.path.getsize(bin_path):
        raise DataFileError(bin_path, f"{os.path.getsize(bin_path)} bytes, its index {idx} "
                            f"describes {data_bytes} (truncated, or not this index's data)")
    if (documents < 1 or bounds[0] != 0 or bounds[-1] != sequences
            or (numpy.diff(bounds) < 0).any()):
        raise DataFileError(idx, "document boundaries are not 0 ... sequence count, ascending")
    return documents - 1
