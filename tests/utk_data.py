"""UtK test helpers: random corpora as indexed datasets, and an independent decoder that parses
UtK samples back into documents using only the marker ids (not megatron_dots.utk code)."""

from dataclasses import dataclass, field
from typing import Dict, List

import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path


def random_documents(seed: int, count: int, vocab: int, eod: int, low: int = 1,
                     high: int = 400) -> List[numpy.ndarray]:
    """`count` documents of random tokens in [0, vocab) (never eod), each ending with eod;
    lengths (eod included) uniform in [low, high]."""
    rng = numpy.random.default_rng(seed)
    docs = []
    for _ in range(count):
        length = int(rng.integers(low, high + 1))
        body = rng.integers(0, vocab, size=length - 1)
        body[body == eod] = (eod + 1) % vocab
        docs.append(numpy.append(body, eod).astype(numpy.int64))
    return docs


def write_documents(prefix: str, docs: List[numpy.ndarray], dtype=numpy.uint16) -> str:
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    for doc in docs:
        builder.add_item(torch.from_numpy(numpy.asarray(doc, dtype=numpy.int64)))
        builder.end_document()
    builder.finalize(get_idx_path(prefix))
    return prefix


def read_documents(prefix: str) -> List[numpy.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [numpy.asarray(dataset[i], dtype=numpy.int64) for i in range(len(dataset))]


@dataclass
class Decoded:
    """The source stream recovered from samples, and what the parse saw."""

    stream: List[int] = field(default_factory=list)
    knotted: int = 0
    plain: int = 0
    pads: int = 0
    markers: int = 0
    knots: List[List[List[int]]] = field(default_factory=list)  # knot -> piece -> chunk lengths
    docs_per_knot: List[int] = field(default_factory=list)


def decode(samples, ids: Dict[str, object]) -> Decoded:
    """Parse samples (rows) with marker ids `ids` (keys knot, trace, trace_end, pad, docs,
    chunks); asserts the format: every chunk headed by a document and a chunk marker, each
    document's trace right after its last chunk listing exactly its chunk labels, documents
    numbered 0.. in a knot, pads only at the end."""
    knot, trace, trace_end, pad = ids["knot"], ids["trace"], ids["trace_end"], ids["pad"]
    docs, chunks = list(ids["docs"]), list(ids["chunks"])
    marker_set = {knot, trace, trace_end, pad, *docs, *chunks}
    out = Decoded()
    for row in samples:
        row = [int(t) for t in row]
        end = len(row)
        while end and row[end - 1] == pad:
            end -= 1
        out.pads += len(row) - end
        body = row[:end]
        assert pad not in body, "padding before the end of a sample"
        if not body or body[0] != knot:
            assert not marker_set.intersection(body), "a marker in a plain sample"
            out.plain += 1
            out.stream.extend(body)
            continue
        out.knotted += 1
        i = 0
        while i < len(body):
            assert body[i] == knot, f"expected a knot marker at {i}"
            out.markers += 1
            i += 1
            pieces: Dict[int, Dict[int, List[int]]] = {}
            traces: Dict[int, List[int]] = {}
            while i < len(body) and body[i] != knot:
                doc = docs.index(body[i])
                label = chunks.index(body[i + 1])
                out.markers += 2
                i += 2
                j = i
                while j < len(body) and body[j] not in marker_set:
                    j += 1
                assert j > i, "an empty chunk"
                assert doc not in traces, "a chunk after its document's trace"
                assert label not in pieces.setdefault(doc, {}), "a chunk label repeats"
                pieces[doc][label] = body[i:j]
                i = j
                if i < len(body) and body[i] == trace:
                    k = body.index(trace_end, i)
                    labels = [chunks.index(t) for t in body[i + 1:k]]
                    out.markers += k - i + 1
                    assert sorted(labels) == sorted(pieces[doc]), "trace != the chunks seen"
                    traces[doc] = labels
                    i = k + 1
            assert sorted(traces) == sorted(pieces) == list(range(len(pieces))), \
                "documents of a knot are not 0..n-1, each traced"
            out.docs_per_knot.append(len(pieces))
            out.knots.append([[len(pieces[d][c]) for c in traces[d]] for d in sorted(pieces)])
            for d in sorted(pieces):
                for label in traces[d]:
                    out.stream.extend(pieces[d][label])
    return out


def marker_dict(markers) -> Dict[str, object]:
    """megatron_dots.utk MarkerIds -> the decoder's dict (the decoder itself uses no utk code)."""
    return {"knot": markers.knot, "trace": markers.trace, "trace_end": markers.trace_end,
            "pad": markers.pad, "docs": markers.docs, "chunks": markers.chunks}


def consecutive_markers(base: int, doc_markers: int, chunk_markers: int) -> Dict[str, object]:
    """The layout `--marker-base` documents: knot, trace, trace_end, pad, docs..., chunks..."""
    return {"knot": base, "trace": base + 1, "trace_end": base + 2, "pad": base + 3,
            "docs": list(range(base + 4, base + 4 + doc_markers)),
            "chunks": list(range(base + 4 + doc_markers, base + 4 + doc_markers + chunk_markers))}
