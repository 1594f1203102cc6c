"""UtK marker tokens: their names, how many a build needs, and their ids.

A knotted sample uses these special tokens (each must be ONE id):

- ``<|utk_knot|>``: starts a knot (a group of shuffled chunks of several documents);
- ``<|utk_doc_i|>``: the i-th document of the knot (i in source order), before each chunk;
- ``<|utk_chunk_j|>``: the chunk's label, a random permutation of the document's chunk
  positions, so the label does not tell the chunk's place in the document;
- ``<|utk_trace|>`` ... ``<|utk_trace_end|>``: the backtracing target, right after a document's
  last chunk in the sequence: the document's chunk labels in their original order;
- ``<|utk_pad|>``: fills the rest of a sample that cannot be filled with source tokens.

Ids come from a tokenizer (`marker_ids_from_tokenizer`) or, for vocabularies without a
tokenizer directory, are laid out consecutively from a base id (`marker_ids_from_base`).
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

KNOT = "<|utk_knot|>"
TRACE = "<|utk_trace|>"
TRACE_END = "<|utk_trace_end|>"
PAD = "<|utk_pad|>"
FIXED = (KNOT, TRACE, TRACE_END, PAD)

DEFAULT_DOC_MARKERS = 16
DEFAULT_CHUNK_MARKERS = 8


class MarkerError(ValueError):
    """Marker tokens that are missing from the tokenizer or cannot be used."""


def doc_marker(index: int) -> str:
    return f"<|utk_doc_{index}|>"


def chunk_marker(index: int) -> str:
    return f"<|utk_chunk_{index}|>"


def marker_names(doc_markers: int = DEFAULT_DOC_MARKERS,
                 chunk_markers: int = DEFAULT_CHUNK_MARKERS) -> List[str]:
    """All marker strings in their fixed order: the four fixed ones, documents, chunks."""
    return (list(FIXED) + [doc_marker(i) for i in range(doc_markers)]
            + [chunk_marker(j) for j in range(chunk_markers)])


@dataclass(frozen=True)
class MarkerIds:
    """Token ids of the markers a build uses."""

    knot: int
    trace: int
    trace_end: int
    pad: int
    docs: Tuple[int, ...]    # docs[i]: <|utk_doc_i|>
    chunks: Tuple[int, ...]  # chunks[j]: <|utk_chunk_j|>

    def all_ids(self) -> List[int]:
        return [self.knot, self.trace, self.trace_end, self.pad, *self.docs, *self.chunks]

    def check_distinct(self, eod: int = None, where: str = "markers") -> None:
        ids = self.all_ids()
        if len(set(ids)) != len(ids):
            raise MarkerError(f"{where}: two UtK markers share a token id")
        if min(ids) < 0:
            raise MarkerError(f"{where}: negative marker token id {min(ids)}")
        if eod is not None and eod in ids:
            raise MarkerError(f"{where}: a UtK marker has the end-of-document id {eod}")


def marker_ids_from_base(base: int, doc_markers: int, chunk_markers: int) -> MarkerIds:
    """Consecutive ids from `base` in `marker_names` order."""
    ids = list(range(base, base + 4 + doc_markers + chunk_markers))
    return MarkerIds(*ids[:4], docs=tuple(ids[4:4 + doc_markers]),
                     chunks=tuple(ids[4 + doc_markers:]))


def marker_ids_from_tokenizer(tokenizer, doc_markers: int, chunk_markers: int) -> MarkerIds:
    """Resolve the marker strings in a `DotsTokenizer`; `MarkerError` names the tokenizer and
    every missing (or multi-token) marker, and says how to add them."""
    names = marker_names(doc_markers, chunk_markers)
    found: Dict[str, int] = {}
    missing = []
    for name in names:
        ids = tokenizer.encode(name)
        if len(ids) == 1 and tokenizer.decode(ids) == name:
            found[name] = int(ids[0])
        else:
            missing.append(name)
    if missing:
        raise MarkerError(missing_markers_message(tokenizer.path, missing, doc_markers,
                                                  chunk_markers))
    return MarkerIds(found[KNOT], found[TRACE], found[TRACE_END], found[PAD],
                     docs=tuple(found[doc_marker(i)] for i in range(doc_markers)),
                     chunks=tuple(found[chunk_marker(j)] for j in range(chunk_markers)))


def missing_markers_message(path: str, missing: Sequence[str], doc_markers: int,
                            chunk_markers: int) -> str:
    needed = len(marker_names(doc_markers, chunk_markers))
    shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
    return (f"{path}: the tokenizer lacks {len(missing)} of the {needed} UtK marker tokens this "
            f"build needs (each must be one special token): {shown}. Add them, e.g. in Python: "
            f"tok = AutoTokenizer.from_pretrained({path!r}); tok.add_special_tokens("
            "{'additional_special_tokens': megatron_dots.utk.markers.marker_names("
            f"{doc_markers}, {chunk_markers})}}); "
            f"tok.save_pretrained({path!r}) (added tokens get new ids, so data already "
            "tokenised stays valid). The new ids must stay below the model's padded vocabulary (dots.llm1 has "
            "152064 embedding rows, more than its tokenizer's ids); or pass --marker-base ID "
            "instead of --tokenizer.")
