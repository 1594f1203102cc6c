"""Tokenizers for data preparation: one small interface over a local Hugging Face tokenizer
directory or a sentencepiece ``.model`` file, and a byte-level BPE trainer for local text.

Nothing here touches the network: Hugging Face directories are loaded with
``local_files_only=True`` and a name that is not a local path is an error.
"""

import json
import os
from typing import Iterable, Iterator, List, Sequence

from ..storage.atomic import atomic_directory

EOD_TOKEN = "<|endoftext|>"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ValueError):
    """A tokenizer path that cannot be loaded, or a tokenizer that lacks what is asked of it."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message

    def __reduce__(self):  # picklable, so that it can come back from a worker process
        return (type(self), (self.path, self.message))


class DotsTokenizer:
    """`encode` / `decode` / `eod` / `vocab_size` over a HF or sentencepiece tokenizer.

    Pickles as its path and kind: a copy sent to another process re-loads the files.
    """

    def __init__(self, path: str, kind: str, backend):
        self.path = path
        self.kind = kind  # "hf" or "sentencepiece"
        self._backend = backend

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, without special tokens (no BOS/EOS)."""
        if self.kind == "hf":
            return self._backend.encode(text, add_special_tokens=False, verbose=False)
        return self._backend.encode(text)

    def encode_document(self, text: str) -> List[int]:
        """Token ids of `text` with the tokenizer's defaults (HF `tokenizer(text)`: the special
        tokens its post-processor adds, if any), as evaluation tools tokenize a document."""
        if self.kind == "hf":
            return list(self._backend(text, verbose=False)["input_ids"])
        return self._backend.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    @property
    def eod(self) -> int:
        """End-of-document id (HF eos_token_id, sentencepiece eos_id())."""
        eod = self._backend.eos_token_id if self.kind == "hf" else self._backend.eos_id()
        if eod is None or eod < 0:
            what = "eos_token" if self.kind == "hf" else "eos piece (eos_id)"
            raise TokenizerError(self.path, f"the tokenizer has no {what} to use as "
                                 "end-of-document token")
        return int(eod)

    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary, added/special tokens included."""
        if self.kind == "hf":
            return len(self._backend)
        return int(self._backend.get_piece_size())

    def __reduce__(self):
        return (load_tokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"DotsTokenizer({self.path!r}, kind={self.kind!r})"


def load_tokenizer(path: str) -> DotsTokenizer:
    """A HF tokenizer directory (AutoTokenizer, local files only) or a sentencepiece file."""
    if os.path.isdir(path):
        return DotsTokenizer(path, "hf", _load_hf(path))
    if os.path.isfile(path):
        return DotsTokenizer(path, "sentencepiece", _load_sentencepiece(path))
    raise TokenizerError(path, "no such tokenizer: expected a local Hugging Face tokenizer "
                         "directory or a sentencepiece .model file (names on the Hub are not "
                         "downloaded)")


def _load_hf(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers/tokenizers raise OSError, ValueError, Exception
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerError(path, f"not a loadable Hugging Face tokenizer directory (need "
                             f"tokenizer.json or tokenizer_config.json with its files): "
                             f"{first_line}") from err


def _load_sentencepiece(path: str):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (OSError, RuntimeError) as err:  # RuntimeError: "could not parse ModelProto"
        raise TokenizerError(path, "not a sentencepiece model file (and not a directory, so not "
                             f"a Hugging Face tokenizer either): {err}") from err
    return processor


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int, *,
                        model_max_length: int = 2048, overwrite: bool = False,
                        special_tokens: Sequence[str] = ()) -> str:
    """Train a byte-level BPE on `texts` and save it as a HF tokenizer directory.

    Id 0 is ``<|endoftext|>``, the eos (end-of-document) and pad token; `special_tokens` (e.g.
    `megatron_dots.utk.markers.marker_names()`) get ids 1, 2, ... and always encode to one id.
    Any text round-trips through encode/decode. Deterministic for the same texts and
    vocab_size. The directory is written under a hidden name and renamed into place when
    complete; a non-empty `out_dir` is refused (FileExistsError) unless `overwrite`. Returns
    `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    special = [EOD_TOKEN, *[t for t in special_tokens if t != EOD_TOKEN]]
    if len(set(special)) != len(special):
        raise TokenizerError(out_dir, f"special tokens repeat: {list(special_tokens)}")
    if vocab_size < len(alphabet) + len(special):
        raise TokenizerError(out_dir, f"vocab_size {vocab_size} is too small: a byte-level BPE "
                             f"needs at least {len(alphabet) + len(special)} (256 bytes + "
                             f"{len(special)} special tokens)")
    counted = _Counted(texts)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(counted, trainer)
    if counted.count == 0:
        raise TokenizerError(out_dir, "no text to train the tokenizer on")
    assert tokenizer.token_to_id(EOD_TOKEN) == 0

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(os.path.join(tmp, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOD_TOKEN,
            "pad_token": EOD_TOKEN,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,  # keeps decode(encode(text)) == text
        })
        _write_json(os.path.join(tmp, "special_tokens_map.json"),
                    {"eos_token": EOD_TOKEN, "pad_token": EOD_TOKEN})
    return out_dir


class _Counted:
    """Iterate `texts` once, counting the strings and refusing non-strings."""

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if not isinstance(text, str):
                raise TypeError(f"train_bpe_tokenizer: texts must be str, got "
                                f"{type(text).__name__} (item {self.count})")
            self.count += 1
            yield text


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
