"""Synthetic Megatron indexed datasets for training tests (no tokenizer needed).

Documents are arithmetic progressions modulo the vocabulary (random start, step 1..3), so the
next token follows from the previous two: a tiny model's loss falls within a few steps.
"""

import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path


def write_progressions(prefix: str, vocab: int, documents: int = 400, seed: int = 0,
                       eod: int = None) -> str:
    """Write PREFIX.bin/.idx; token ids lie in [0, vocab); `eod` (default vocab) ends each
    document. Returns the prefix."""
    rng = numpy.random.default_rng(seed)
    eod = vocab if eod is None else eod
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=numpy.uint16)
    for _ in range(documents):
        length = int(rng.integers(20, 120))
        start, step = int(rng.integers(0, vocab)), int(rng.integers(1, 4))
        doc = (start + step * numpy.arange(length)) % vocab
        builder.add_item(torch.from_numpy(numpy.append(doc, eod).astype(numpy.int64)))
        builder.end_document()
    builder.finalize(get_idx_path(prefix))
    return prefix
