"""The evaluation tokens of one domain: documents read from a JSONL file or a Megatron indexed
dataset and cut into windows, by one stated protocol.

Protocol (the same windows feed `analyze experts` and `analyze ablate-shared`):
each document is tokenized on its own with the tokenizer's defaults (`tokenizer(text)`, so a
tokenizer that adds BOS/EOS adds them); an indexed dataset's documents are used as stored.
Documents are taken whole in file order until the domain has `tokens` tokens; the document that
crosses the limit is cut there. Each document is cut into consecutive windows of `seq_length`
tokens; a shorter last window is kept and one-token windows (nothing to predict) are dropped.
A window's tokens are all routed; its loss is the next-token cross entropy over its first
`len - 1` positions.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..storage.errors import DataFileError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.txt")
TEXT_KEY = "text"


class AnalysisInputError(DataFileError):
    """A domain file, tokenizer or flag value the analyses cannot use; names the file."""


@dataclass(frozen=True)
class DomainSource:
    """`--data NAME=PATH`: a JSONL file with a `text` field or an indexed-dataset prefix."""

    name: str
    path: str

    @property
    def is_indexed(self) -> bool:
        return (not self.path.endswith(JSONL_SUFFIXES)
                and os.path.isfile(self.path + ".idx") and os.path.isfile(self.path + ".bin"))

    @property
    def display_path(self) -> str:
        return self.path + ".bin" if self.is_indexed else self.path


def parse_domains(values: Sequence[str]) -> List[DomainSource]:
    """`NAME=PATH` strings -> sources (names unique, non-empty; a path that is neither a file
    nor an indexed-dataset prefix is refused here, naming it)."""
    sources, seen = [], set()
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ValueError(f"--data {value!r}: expected NAME=PATH (a JSONL file with a "
                             f"'{TEXT_KEY}' field, or an indexed-dataset prefix PATH.bin/.idx)")
        if name in seen:
            raise ValueError(f"--data: domain name {name!r} is given twice")
        if "," in name:
            raise ValueError(f"--data {value!r}: a domain name may not contain ','")
        seen.add(name)
        source = DomainSource(name, path)
        if not source.is_indexed and not os.path.isfile(path):
            raise AnalysisInputError(path, f"domain {name!r}: no such file (nor {path}.bin and "
                                     f"{path}.idx of an indexed dataset)")
        sources.append(source)
    if not sources:
        raise ValueError("give at least one --data NAME=PATH")
    return sources


@dataclass
class DomainWindows:
    """The windows of one domain and how many tokens they hold."""

    name: str
    path: str
    windows: List[np.ndarray] = field(default_factory=list)
    documents: int = 0
    tokens_asked: int = 0
    tokens_taken: int = 0  # before one-token windows are dropped

    @property
    def tokens(self) -> int:
        """Tokens routed (all tokens of all windows)."""
        return int(sum(len(w) for w in self.windows))

    @property
    def predicted(self) -> int:
        """Next-token predictions (each window's length minus one)."""
        return int(sum(len(w) - 1 for w in self.windows))

    @property
    def short(self) -> bool:
        """The file ran out before `tokens_asked` tokens."""
        return self.tokens_taken < self.tokens_asked


def _jsonl_texts(path: str) -> Iterator[Tuple[int, str]]:
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise AnalysisInputError(path, f"cannot be read ({err.strerror or err})") from None
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AnalysisInputError(path, f"line {lineno}: not JSON ({err.msg})") from None
                text = record.get(TEXT_KEY) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise AnalysisInputError(path, f"line {lineno}: no string field "
                                             f"'{TEXT_KEY}'")
                yield lineno, text
        except UnicodeDecodeError as err:
            raise AnalysisInputError(path, f"not UTF-8 text ({err.reason} at byte "
                                     f"{err.start} of a line)") from None


def _jsonl_documents(path: str, tokenizer, vocab_size: int) -> Iterator[np.ndarray]:
    for lineno, text in _jsonl_texts(path):
        ids = np.asarray(tokenizer.encode_document(text), dtype=np.int64)
        if ids.size and int(ids.max()) >= vocab_size:
            raise AnalysisInputError(tokenizer.path, f"gives token id {int(ids.max())} for line "
                                     f"{lineno} of {path}, outside the model's vocabulary of "
                                     f"{vocab_size} ids: not the model's tokenizer")
        yield ids


def _indexed_documents(prefix: str, vocab_size: int) -> Iterator[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from ..data.indexed_check import check_indexed_dataset

    check_indexed_dataset(prefix)
    dataset = IndexedDataset(prefix, mmap=True)
    bounds = dataset.document_indices
    for doc in range(len(bounds) - 1):
        parts = [np.asarray(dataset[i], dtype=np.int64) for i in range(bounds[doc], bounds[doc + 1])]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise AnalysisInputError(prefix + ".bin", f"document {doc} holds token id {bad}, "
                                     f"outside the model's vocabulary of {vocab_size} ids (data "
                                     "tokenized for another vocabulary, or damaged)")
        yield ids


def cut_windows(ids: np.ndarray, seq_length: int) -> List[np.ndarray]:
    """Consecutive windows of `seq_length` tokens; a shorter last one is kept, one-token windows
    are dropped."""
    return [ids[i:i + seq_length] for i in range(0, len(ids), seq_length)
            if len(ids) - i >= 2]


def domain_windows(source: DomainSource, tokens: int, seq_length: int, vocab_size: int,
                   tokenizer=None) -> DomainWindows:
    """The windows of the first `tokens` tokens of `source` (fewer when the file has fewer:
    see `DomainWindows.short`)."""
    if source.is_indexed:
        documents = _indexed_documents(source.path, vocab_size)
    else:
        if tokenizer is None:
            raise AnalysisInputError(source.path, f"domain {source.name!r} is JSONL text: give "
                                     "--tokenizer (no tokenizer was found next to the model)")
        documents = _jsonl_documents(source.path, tokenizer, vocab_size)
    result = DomainWindows(source.name, source.display_path, tokens_asked=tokens)
    taken = 0
    for ids in documents:
        if taken >= tokens:
            break
        ids = ids[: tokens - taken]
        taken += len(ids)
        result.tokens_taken = taken
        result.documents += 1
        result.windows.extend(cut_windows(ids, seq_length))
    if not result.windows:
        raise AnalysisInputError(source.display_path, f"domain {source.name!r} holds no "
                                 "window of two or more tokens (empty file?)")
    return result


def default_tokenizer_dir(hf_dir: Optional[str], ckpt: Optional[str]) -> Optional[str]:
    """The tokenizer next to the model: the HF directory itself, or the checkpoint root's
    `hf_assets/` (what `convert hf-to-mcore` and the demo leave there)."""
    candidates = [hf_dir] if hf_dir else []
    if ckpt:
        root = os.path.abspath(ckpt)
        candidates += [os.path.join(root, "hf_assets"),
                       os.path.join(os.path.dirname(root), "hf_assets")]
    for directory in candidates:
        if directory and any(os.path.isfile(os.path.join(directory, name))
                             for name in ("tokenizer.json", "tokenizer.model",
                                          "tokenizer_config.json")):
            return directory
    return None
