"""The SFT token cache: a JSONL file of conversations tokenized once into a directory, and read
back memory-mapped.

A cache directory holds ``tokens.npy`` (int32, all conversations concatenated),
``loss_mask.npy`` (uint8, 1 on assistant reply tokens, same length), ``offsets.npy`` (int64,
conversation i is ``[offsets[i], offsets[i+1])``) and ``meta.json`` (source, its sha256, the
template identity, counts). It is written under a hidden name and renamed into place when
complete: a failed or killed run leaves nothing at the target. `load_or_prepare` keys the
directory on the source's bytes and the template identity, so any change to either makes a
new one.
"""

import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..storage.atomic import atomic_directory
from ..storage.errors import DataFileError
from ..storage.progress import progress_bar
from .chat_format import ChatFormat, ChatTemplateError
from .conversations import ConversationError, ConversationReader

FORMAT = "megatron-dots-sft-cache-v1"
ARRAYS = {"tokens": np.int32, "loss_mask": np.uint8, "offsets": np.int64}
META = "meta.json"
CACHE_DIR = ".sft-cache"


class SFTCacheError(DataFileError):
    """A cache directory that is incomplete, damaged or not for this source; names the file."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Column:
    """An array written piece by piece to a raw file, then turned into a ``.npy``."""

    def __init__(self, directory: str, name: str, dtype):
        self.path = os.path.join(directory, f"{name}.npy")
        self.raw = os.path.join(directory, f".{name}.raw")
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._file = open(self.raw, "wb")

    def append(self, values) -> None:
        array = np.asarray(values, dtype=self.dtype)
        self._file.write(array.tobytes())
        self.length += array.size

    def finish(self) -> None:
        self._file.close()
        out = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                        shape=(self.length,))
        if self.length:
            out[:] = np.memmap(self.raw, dtype=self.dtype, mode="r", shape=(self.length,))
        out.flush()
        del out
        os.remove(self.raw)

    def close(self) -> None:
        self._file.close()


def prepare_sft_data(jsonl_path: str, chat_format: ChatFormat, out_dir: str,
                     progress: bool = True, overwrite: bool = False,
                     expected_sha256: Optional[str] = None) -> "SFTDataset":
    """Tokenize the conversations of `jsonl_path` into the cache directory `out_dir`.

    A non-empty `out_dir` is refused (FileExistsError) unless `overwrite`. With
    `expected_sha256`, a source whose bytes no longer hash to it (changed since) is refused.
    """
    reader = ConversationReader(jsonl_path)
    total = os.path.getsize(jsonl_path) if os.path.isfile(jsonl_path) else None
    counts = {"conversations": 0, "tokens": 0, "assistant_tokens": 0, "max_length": 0}
    offsets = [0]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        columns = [_Column(tmp, "tokens", ARRAYS["tokens"]),
                   _Column(tmp, "loss_mask", ARRAYS["loss_mask"])]
        try:
            with progress_bar(total, "sft-preprocess", unit="B", enabled=progress) as bar:
                shown = 0
                for lineno, messages in reader:
                    ids, mask = _encode(chat_format, messages, f"{jsonl_path}:{lineno}")
                    columns[0].append(ids)
                    columns[1].append(mask)
                    offsets.append(offsets[-1] + len(ids))
                    counts["conversations"] += 1
                    counts["assistant_tokens"] += sum(mask)
                    counts["max_length"] = max(counts["max_length"], len(ids))
                    bar.update(reader.bytes_read - shown)
                    shown = reader.bytes_read
        finally:
            for column in columns:
                column.close()
        source_sha256 = reader.sha256.hexdigest()
        if expected_sha256 is not None and source_sha256 != expected_sha256:
            raise ConversationError(jsonl_path, "changed while it was being read: prepare again")
        for column in columns:
            column.finish()
        np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, dtype=ARRAYS["offsets"]))
        counts["tokens"] = offsets[-1]
        meta = {"format": FORMAT, "source": os.path.abspath(jsonl_path),
                "source_sha256": source_sha256, "tokenizer": os.path.abspath(chat_format.path),
                "template": chat_format.template_name,
                "template_identity": chat_format.template_identity(),
                "eot_id": chat_format.eot_id, "pad_id": chat_format.pad_id, **counts,
                "skipped_no_assistant": reader.skipped_no_assistant,
                "skipped_no_assistant_lines": reader.skipped_lines}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    return SFTDataset(out_dir)


def _encode(chat_format: ChatFormat, messages, where: str) -> Tuple[List[int], List[bool]]:
    try:
        return chat_format.encode(messages)
    except ChatTemplateError as err:
        raise ConversationError(where, str(err)) from None


class SFTDataset:
    """A prepared cache directory: conversation i is `sample(i)` = (tokens, loss_mask)."""

    def __init__(self, cache_dir: str):
        self.path = cache_dir
        self.meta = self._read_meta()
        arrays = {name: self._load(name, dtype) for name, dtype in ARRAYS.items()}
        self.tokens, self.loss_mask, self.offsets = (arrays["tokens"], arrays["loss_mask"],
                                                     arrays["offsets"])
        self._check()

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _damaged(self, name: str, reason: str) -> SFTCacheError:
        return SFTCacheError(self._file(name), f"{reason}: the SFT cache {self.path} is damaged; "
                             "delete it and prepare again")

    def _read_meta(self) -> Dict:
        if not os.path.isdir(self.path):
            raise SFTCacheError(self.path, "no such SFT cache directory")
        try:
            with open(self._file(META)) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise self._damaged(META, "missing") from None
        except (OSError, ValueError) as err:
            raise self._damaged(META, f"unreadable ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise self._damaged(META, f"not a {FORMAT} meta file")
        return meta

    def _load(self, name: str, dtype) -> np.ndarray:
        filename = f"{name}.npy"
        if not os.path.isfile(self._file(filename)):
            raise self._damaged(filename, "missing")
        try:
            array = np.load(self._file(filename), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:  # truncated data or header
            raise self._damaged(filename, f"unreadable ({err})") from None
        if array.ndim != 1 or array.dtype != np.dtype(dtype):
            raise self._damaged(filename, f"expected a 1-D {np.dtype(dtype).name} array, got "
                                f"{array.dtype.name} of shape {array.shape}")
        return array

    def _check(self) -> None:
        offsets, n = self.offsets, self.meta.get("conversations")
        if not isinstance(n, int) or len(offsets) != n + 1:
            raise self._damaged("offsets.npy", f"{len(offsets)} offsets for {n} conversations "
                                f"in {META}")
        if len(self.loss_mask) != len(self.tokens):
            raise self._damaged("loss_mask.npy", f"{len(self.loss_mask)} entries for "
                                f"{len(self.tokens)} tokens")
        if offsets[0] != 0 or offsets[-1] != len(self.tokens) or np.any(np.diff(offsets) < 0):
            raise self._damaged("offsets.npy", f"offsets do not cut the {len(self.tokens)} "
                                "tokens into conversations")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Conversation i: its token ids (int64) and loss mask (bool, True = trained on)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"conversation {i} out of range ({len(self)} in {self.path})")
        i %= len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return (np.asarray(self.tokens[start:end], dtype=np.int64),
                np.asarray(self.loss_mask[start:end], dtype=bool))

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each conversation."""
        return np.diff(self.offsets)

    def __repr__(self) -> str:
        return f"SFTDataset({self.path!r}, conversations={len(self)})"


def cache_key(source_sha256: str, template_identity: str) -> str:
    return hashlib.sha256(f"{source_sha256}\0{template_identity}".encode()).hexdigest()


def load_or_prepare(jsonl_path: str, tokenizer_dir: str, template: str = "auto",
                    cache_root: Optional[str] = None, progress: bool = True) -> SFTDataset:
    """The cache of `jsonl_path` under `cache_root` (default ``<jsonl dir>/.sft-cache``),
    prepared first when absent. Call it on one rank only; the caller synchronises."""
    if not os.path.isfile(jsonl_path):
        raise ConversationError(jsonl_path, "no such file")
    chat_format = ChatFormat(tokenizer_dir, template)
    source_sha256 = file_sha256(jsonl_path)
    identity = chat_format.template_identity()
    key = cache_key(source_sha256, identity)
    root = cache_root or os.path.join(os.path.dirname(os.path.abspath(jsonl_path)), CACHE_DIR)
    stem = os.path.splitext(os.path.basename(jsonl_path))[0]
    directory = os.path.join(root, f"{stem}-{key[:16]}")
    if not os.path.isdir(directory) or not os.listdir(directory):
        return prepare_sft_data(jsonl_path, chat_format, directory, progress,
                                expected_sha256=source_sha256)
    dataset = SFTDataset(directory)
    if (dataset.meta.get("source_sha256"), dataset.meta.get("template_identity")) != \
            (source_sha256, identity):
        raise SFTCacheError(os.path.join(directory, META), f"written for another source or "
                            f"template than {jsonl_path} with {tokenizer_dir}: delete "
                            f"{directory} and prepare again")
    return dataset
