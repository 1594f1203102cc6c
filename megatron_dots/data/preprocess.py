"""JSONL -> Megatron indexed datasets: the job of Megatron-LM's tools/preprocess_data.py.

Each non-blank line of the inputs (``.jsonl`` or ``.jsonl.gz``, read in the order given) is one
JSON object, one document. The string under every json key is tokenised, the end-of-document
token appended, and written as one sequence (one document) of
``{output_prefix}_{key}_document.bin/.idx``. Documents with no tokens are skipped and counted.
Worker processes tokenise; results come back in input order, so the files do not depend on the
worker count. Both files are written under hidden names and renamed into place at the end: a
failed or killed run leaves nothing under the final names.
"""

import argparse
import contextlib
import gzip
import json
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy

from ..storage.atomic import fsync_path
from .tokenizer import TokenizerError, load_tokenizer
from .worker_pool import worker_pool

CHUNKSIZE = 64  # lines per task sent to a worker


class PreprocessError(ValueError):
    """Input that cannot become a dataset; the message names the file (and line)."""


@dataclass
class DatasetStats:
    """What one json key's dataset received."""

    prefix: str
    documents: int = 0
    tokens: int = 0  # end-of-document tokens included
    skipped: int = 0  # documents with no tokens


class PreprocessResult(dict):
    """json key -> dataset prefix; `stats` holds each key's `DatasetStats`."""

    def __init__(self, stats: Dict[str, DatasetStats]):
        super().__init__({key: s.prefix for key, s in stats.items()})
        self.stats = stats


def preprocess(inputs: Sequence[str], tokenizer: str, output_prefix: str,
               json_keys: Sequence[str] = ("text",), workers: int = 1, append_eod: bool = True,
               progress: bool = True) -> Dict[str, str]:
    """Tokenise JSONL `inputs` into ``{output_prefix}_{key}_document`` datasets, one per key.

    `tokenizer` is a HF tokenizer directory or a sentencepiece ``.model`` file. Returns a
    `PreprocessResult` (key -> prefix, plus `.stats`) and prints a summary per key.
    """
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    json_keys = [json_keys] if isinstance(json_keys, str) else list(json_keys)
    _check_inputs(inputs)
    _check_keys(json_keys)
    if workers < 1:
        raise PreprocessError(f"workers must be at least 1, got {workers}")
    directory = check_output_prefix(output_prefix)
    tok = load_tokenizer(tokenizer)
    if append_eod:
        tok.eod  # raises TokenizerError, naming the tokenizer, when it has none

    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(tok.vocab_size)
    stats = {key: DatasetStats(f"{output_prefix}_{key}_document") for key in json_keys}
    partial = {key: partial_dataset_prefix(directory, s.prefix) for key, s in stats.items()}
    encoder_args = (tok.path, inputs, json_keys, append_eod)
    try:
        _write(inputs, encoder_args, workers, dtype, stats, partial, progress)
        for key, s in stats.items():
            if s.documents == 0:
                raise PreprocessError(f"{', '.join(inputs)}: no documents with tokens under json "
                                      f"key {key!r} ({s.skipped} empty)")
        promote_datasets(partial, {key: s.prefix for key, s in stats.items()})
    finally:
        remove_partial_datasets(partial.values())
    for key, s in stats.items():
        print(f"preprocess: {key!r}: {s.documents:,} documents, {s.tokens:,} tokens "
              f"({numpy.dtype(dtype).name}), {s.skipped:,} empty documents skipped -> "
              f"{s.prefix}.bin/.idx", flush=True)
    return PreprocessResult(stats)


def _check_inputs(inputs: List[str]) -> None:
    if not inputs:
        raise PreprocessError("no input files given")
    for path in inputs:
        if not os.path.exists(path):
            raise PreprocessError(f"{path}: input file not found")
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: input is not a file")


def _check_keys(json_keys: List[str]) -> None:
    if not json_keys:
        raise PreprocessError("no json keys given")
    for key in json_keys:
        if not isinstance(key, str) or not key or os.sep in key or key.startswith("."):
            raise PreprocessError(f"json key {key!r} cannot be part of a file name")
    if len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"json keys repeat: {json_keys}")


def check_output_prefix(output_prefix: str) -> str:
    """The (existing, writable) directory the datasets go to."""
    if not os.path.basename(output_prefix):
        raise PreprocessError(f"{output_prefix}: the output prefix must name files (e.g. "
                              "DIR/corpus), not only a directory")
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(directory):
        raise PreprocessError(f"{output_prefix}: output directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PreprocessError(f"{output_prefix}: output directory {directory} is not writable")
    return directory


# ---- reading and tokenising ------------------------------------------------------------------

Task = Tuple[int, int, bytes]  # (input index, line number from 1, raw line)


def _read_lines(inputs: List[str]) -> Iterator[Task]:
    for index, path in enumerate(inputs):
        try:
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                for lineno, raw in enumerate(f, 1):
                    yield index, lineno, raw
        except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise PreprocessError(f"{path}: cannot read: {err}") from err


class _Encoder:
    """Turns one input line into one token array per json key (empty array: no tokens)."""

    def __init__(self, tokenizer_path: str, inputs: List[str], json_keys: List[str],
                 append_eod: bool):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.inputs = inputs
        self.json_keys = json_keys
        self.eod = self.tokenizer.eod if append_eod else None

    def encode(self, task: Task) -> Tuple[int, Optional[List[numpy.ndarray]]]:
        """(bytes read, arrays), arrays None for a blank line."""
        index, lineno, raw = task
        if not raw.strip():
            return len(raw), None
        where = f"{self.inputs[index]}:{lineno}"
        try:
            doc = json.loads(raw)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise PreprocessError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise PreprocessError(f"{where}: expected a JSON object, got {_json_type(doc)}")
        arrays = []
        for key in self.json_keys:
            if key not in doc:
                raise PreprocessError(f"{where}: missing json key {key!r} (has "
                                      f"{', '.join(map(repr, list(doc)[:10])) or 'no keys'})")
            text = doc[key]
            if not isinstance(text, str):
                raise PreprocessError(f"{where}: json key {key!r} must be a string, got "
                                      f"{_json_type(text)}")
            ids = self.tokenizer.encode(text)
            if ids and self.eod is not None:
                ids.append(self.eod)
            arrays.append(numpy.asarray(ids, dtype=numpy.int64))
        return len(raw), arrays


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


_WORKER_ENCODER: Optional[_Encoder] = None


def _init_worker(*encoder_args) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(*encoder_args)


def _encode_in_worker(task: Task):
    return _WORKER_ENCODER.encode(task)


@contextlib.contextmanager
def _encoded(inputs: List[str], encoder_args, workers: int):
    """Yield an iterator of `_Encoder.encode` results in input order."""
    if workers == 1:
        yield map(_Encoder(*encoder_args).encode, _read_lines(inputs))
        return
    with _tokenizers_fork_quiet():
        pool = worker_pool(workers, _init_worker, encoder_args)
    with pool:  # terminates the workers however the block ends
        yield pool.imap(_encode_in_worker, _read_lines(inputs), chunksize=CHUNKSIZE)


@contextlib.contextmanager
def _tokenizers_fork_quiet():
    """HF tokenizers warns in every forked child once it has run in parallel (e.g. after
    training a tokenizer in this process); the workers encode one line at a time anyway."""
    had = "TOKENIZERS_PARALLELISM" in os.environ
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        yield
    finally:
        if not had:
            del os.environ["TOKENIZERS_PARALLELISM"]


# ---- writing ---------------------------------------------------------------------------------

def _write(inputs: List[str], encoder_args, workers: int, dtype, stats: Dict[str, DatasetStats],
           partial: Dict[str, str], progress: bool) -> None:
    """Tokenise everything into the partial files of each key (complete .bin and .idx)."""
    import torch
    from megatron.core.datasets.indexed_dataset import (IndexedDatasetBuilder, get_bin_path,
                                                        get_idx_path)
    from tqdm import tqdm

    keys = list(stats)
    builders = {}
    try:
        for key in keys:
            builders[key] = IndexedDatasetBuilder(get_bin_path(partial[key]), dtype=dtype)
        total = None if any(p.endswith(".gz") for p in inputs) else sum(map(os.path.getsize,
                                                                             inputs))
        with _encoded(inputs, encoder_args, workers) as results, \
                tqdm(total=total, desc="preprocess", unit="B", unit_scale=True,
                     unit_divisor=1024, dynamic_ncols=True, file=sys.stderr,
                     disable=not progress) as bar:
            for nbytes, arrays in results:
                bar.update(nbytes)
                for key, ids in zip(keys, arrays or ()):
                    if ids.size == 0:
                        stats[key].skipped += 1
                        continue
                    builders[key].add_item(torch.from_numpy(ids))
                    builders[key].end_document()
                    stats[key].documents += 1
                    stats[key].tokens += int(ids.size)
        for key in keys:
            builders[key].finalize(get_idx_path(partial[key]))
    finally:
        for builder in builders.values():
            builder.data_file.close()


def partial_dataset_prefix(directory: str, prefix: str) -> str:
    """The hidden name a dataset is written under in `directory` until `promote_datasets`."""
    return os.path.join(directory, f".{os.path.basename(prefix)}.partial-{os.getpid()}")


def promote_datasets(partial: Dict[str, str], final: Dict[str, str]) -> None:
    """Rename each key's complete partial .bin/.idx to its final name. The old .idx goes first
    and the new .idx comes last, so at no moment does a mismatched pair exist."""
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    for tmp in partial.values():
        for path in (get_bin_path(tmp), get_idx_path(tmp)):
            fsync_path(path)
    for key, tmp in partial.items():
        with contextlib.suppress(FileNotFoundError):
            os.remove(get_idx_path(final[key]))
        os.replace(get_bin_path(tmp), get_bin_path(final[key]))
        os.replace(get_idx_path(tmp), get_idx_path(final[key]))
    fsync_path(os.path.dirname(os.path.abspath(next(iter(final.values())))))


def remove_partial_datasets(prefixes) -> None:
    for prefix in prefixes:
        for path in (prefix + ".bin", prefix + ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


# ---- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dots preprocess",
        description="Tokenise JSONL documents into Megatron indexed datasets "
        "(PREFIX_KEY_document.bin/.idx) for --data-path, like Megatron-LM's "
        "tools/preprocess_data.py. The output does not depend on --workers.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="JSONL files (.jsonl, or .jsonl.gz), one JSON object (document) "
                        "per line; read in the order given")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                        metavar="DIR_OR_MODEL",
                        help="local Hugging Face tokenizer directory (tokenizer.json / "
                        "tokenizer_config.json) or sentencepiece .model file; never downloaded")
    parser.add_argument("--output-prefix", required=True, metavar="P",
                        help="writes P_KEY_document.bin and .idx for each json key (the "
                        "directory must exist; existing files of that name are replaced)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="keys of the strings to tokenise, one dataset each (default: text)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenising processes (default 1)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end each document with the tokenizer's end-of-document (eos) "
                        "token (default: on)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        preprocess(args.input, args.tokenizer, args.output_prefix, args.json_keys, args.workers,
                   args.append_eod, not args.no_progress)
    except (PreprocessError, TokenizerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
