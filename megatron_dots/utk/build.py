"""`utk` build: indexed dataset in -> UtK samples out (``.bin/.idx``, one document of exactly
``seq_length`` tokens per sample), in worker processes.

The input's documents (its sequences, as Megatron's GPTDataset counts them) are split into
groups of consecutive documents of about ``group_samples * seq_length`` tokens, fixed by the
document lengths alone. Each group is built by `knotting.build_samples` with its own generator,
``numpy.random.default_rng([seed, group])``, and its last sample is padded: the output depends
on the seed and the flags, never on the number of workers. Results are written in group order
under hidden partial names and renamed into place at the end (`data.preprocess`'s helpers), so a
failed run leaves nothing under the final names.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy

from ..data.indexed_check import check_indexed_dataset
from ..data.preprocess import (check_output_prefix, partial_dataset_prefix, promote_datasets,
                                remove_partial_datasets)
from ..data.worker_pool import worker_pool
from ..storage.progress import progress_bar
from .knotting import KnotConfig, KnotStats, build_samples
from .markers import MarkerIds


class UtkError(ValueError):
    """Input that cannot become UtK samples; the message names the file (and document).
    `flag` is set when the error is a bad flag value (the CLI exits 2, otherwise 1)."""

    def __init__(self, message: str, flag: Optional[str] = None):
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class BuildPlan:
    """Everything a worker needs to build any group."""

    input_prefix: str
    config: KnotConfig
    markers: MarkerIds
    seed: int
    dtype: type


def plan_groups(lengths: numpy.ndarray, group_tokens: int) -> List[Tuple[int, int]]:
    """[start, end) document ranges: a new group starts at the first document that begins at
    or after each multiple of `group_tokens` source tokens."""
    starts = numpy.concatenate(([0], numpy.cumsum(lengths, dtype=numpy.int64)[:-1]))
    group_of = starts // max(1, group_tokens)
    boundaries = numpy.flatnonzero(numpy.diff(group_of)) + 1
    edges = [0, *boundaries.tolist(), len(lengths)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def output_dtype(input_dtype, markers: MarkerIds, vocab_size: Optional[int]) -> type:
    """The input's token dtype, widened to int32 when a marker (or the vocabulary) needs it."""
    from megatron.core.datasets.indexed_dataset import DType

    needed = DType.optimal_dtype(max(max(markers.all_ids()) + 1, vocab_size or 0))
    return needed if numpy.dtype(needed).itemsize > numpy.dtype(input_dtype).itemsize \
        else input_dtype


def build_group(plan: BuildPlan, group: int, start: int, end: int, dataset=None
                ) -> Tuple[int, numpy.ndarray, KnotStats]:
    """Samples of documents [start, end), in the output dtype."""
    if dataset is None:
        dataset = _open(plan.input_prefix)
    documents = [numpy.asarray(dataset[i]) for i in range(start, end)]
    _check_source(plan, documents, start)
    rng = numpy.random.default_rng([plan.seed, group])
    samples, stats = build_samples(documents, plan.config, plan.markers, rng)
    return group, samples.astype(plan.dtype), stats


def _check_source(plan: BuildPlan, documents, first: int) -> None:
    marker_ids = numpy.array(plan.markers.all_ids())
    limit = numpy.iinfo(plan.dtype).max
    for offset, tokens in enumerate(documents):
        if tokens.size == 0:
            continue
        hits = numpy.isin(tokens, marker_ids)
        if hits.any():
            token = int(tokens[int(numpy.argmax(hits))])
            raise UtkError(f"{plan.input_prefix}.bin: document {first + offset} holds token id "
                           f"{token}, a UtK marker; markers must not occur in the source (was "
                           "the text tokenised with marker strings in it, or is --marker-base "
                           "inside the vocabulary?)")
        if int(tokens.min()) < 0 or int(tokens.max()) > limit:
            raise UtkError(f"{plan.input_prefix}.bin: document {first + offset} holds token ids "
                           f"outside {numpy.dtype(plan.dtype).name}")


def _open(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


_WORKER_PLAN: Optional[BuildPlan] = None
_WORKER_DATASET = None


def _init_worker(plan: BuildPlan) -> None:
    global _WORKER_PLAN, _WORKER_DATASET
    _WORKER_PLAN, _WORKER_DATASET = plan, _open(plan.input_prefix)


def _build_in_worker(task):
    return build_group(_WORKER_PLAN, *task, dataset=_WORKER_DATASET)


@contextlib.contextmanager
def _built_groups(plan: BuildPlan, groups: List[Tuple[int, int]], workers: int):
    """Yield (group, samples, stats) in group order."""
    tasks = [(g, a, b) for g, (a, b) in enumerate(groups)]
    if workers == 1:
        dataset = _open(plan.input_prefix)
        yield (build_group(plan, *task, dataset=dataset) for task in tasks)
        return
    with worker_pool(workers, _init_worker, (plan,)) as pool:
        yield pool.imap(_build_in_worker, tasks)


def input_documents(prefix: str) -> numpy.ndarray:
    """Sequence lengths of the input dataset (checked first; `UtkError` names the file)."""
    from ..storage.errors import DataFileError

    try:
        check_indexed_dataset(prefix)
    except DataFileError as err:
        raise UtkError(f"--input-prefix {prefix}: {err}", flag="--input-prefix") from None
    dataset = _open(prefix)  # keep it open while copying: its index is a closed-on-delete mmap
    lengths = numpy.array(dataset.sequence_lengths, dtype=numpy.int64)
    del dataset
    return lengths


def build_utk(plan: BuildPlan, output_prefix: str, workers: int = 1, group_samples: int = 256,
              progress: bool = True) -> KnotStats:
    """Write ``{output_prefix}.bin/.idx``; returns the summed statistics."""
    import torch
    from megatron.core.datasets.indexed_dataset import (IndexedDatasetBuilder, get_bin_path,
                                                        get_idx_path)

    lengths = input_documents(plan.input_prefix)
    if int(lengths.sum()) == 0:
        raise UtkError(f"{plan.input_prefix}: the dataset holds no tokens")
    directory = check_output_prefix(output_prefix)
    groups = plan_groups(lengths, group_samples * plan.config.seq_length)
    partial = partial_dataset_prefix(directory, output_prefix)
    total = KnotStats()
    builder = None
    try:
        builder = IndexedDatasetBuilder(get_bin_path(partial), dtype=plan.dtype)
        with _built_groups(plan, groups, workers) as results, \
                progress_bar(int(lengths.sum()), "utk", unit="tok", enabled=progress) as bar:
            for _, samples, stats in results:
                for sample in samples:
                    builder.add_item(torch.from_numpy(sample.astype(numpy.int64)))
                    builder.end_document()
                total.add(stats)
                bar.update(stats.source_tokens)
        builder.finalize(get_idx_path(partial))
        if total.source_tokens != int(lengths.sum()):  # the builder's own invariant
            raise UtkError(f"internal error: {total.source_tokens} source tokens written, "
                           f"{int(lengths.sum())} read")
        promote_datasets({"out": partial}, {"out": output_prefix})
    finally:
        if builder is not None:
            builder.data_file.close()
        remove_partial_datasets([partial])
    return total
