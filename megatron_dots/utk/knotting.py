"""UtK sample construction (pure numpy, no I/O): a run of source documents -> samples of
exactly ``seq_length`` tokens.

The documents are read as one stream, in order. Each sample is, with probability
``knot_fraction``, *knotted*, otherwise *plain*:

- plain: the next ``seq_length`` tokens of the stream, unchanged (as Megatron's GPTDataset would
  cut them);
- knotted: one or more knots. A knot takes up to ``docs_per_knot`` documents from the stream,
  cuts each into chunks, shuffles all the chunks of the knot together and writes
  ``<|utk_knot|>`` then, per chunk, ``<|utk_doc_i|> <|utk_chunk_j|> tokens...``; right after a
  document's last chunk in the sequence comes its backtracing target
  ``<|utk_trace|> <|utk_chunk_a|> <|utk_chunk_b|> ... <|utk_trace_end|>``: the labels of its
  chunks in their original order. ``i`` numbers the knot's documents in stream order;
  chunk labels are a random permutation of the document's chunk positions.

A document that does not fit the room left in a sample is cut: its first part (knotted as a
document of its own) ends the sample exactly, the rest starts the next sample, so no token is
lost or repeated and the stream order is kept. A chunk count is drawn uniformly from
``[min_chunks, max_chunks]`` and clipped to what ``[chunk_min, chunk_max]`` chunk lengths allow;
a document shorter than ``chunk_min`` stays one chunk. Chunk lengths are a uniformly random
composition with every chunk in ``[chunk_min, chunk_max]``. Room that no source token can fill
(fewer than 6 tokens in a knotted sample, or the end of the stream) is filled with
``<|utk_pad|>``.
"""

from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple

import numpy

from .markers import MarkerIds

# One chunk of a knot costs: <doc_i> <chunk_j> before it, and <trace> <chunk_j> <trace_end>.
UNIT_OVERHEAD = 2   # per document: <trace> ... <trace_end>
CHUNK_OVERHEAD = 3  # per chunk: <doc_i> <chunk_j> + its label in the trace
SMALLEST_UNIT = UNIT_OVERHEAD + CHUNK_OVERHEAD + 1  # one chunk of one token


@dataclass(frozen=True)
class KnotConfig:
    """How samples are built; `validate` explains what is wrong (for the CLI's flags)."""

    seq_length: int
    knot_fraction: float = 0.8
    docs_per_knot: int = 16
    min_chunks: int = 2
    max_chunks: int = 3
    chunk_min: int = 64
    chunk_max: int = 4096

    @property
    def chunk_markers(self) -> int:
        """Chunk labels a build may need: the largest chunk count of any document piece."""
        return max(self.max_chunks, -(-self.seq_length // self.chunk_max))

    def validate(self) -> List[Tuple[str, str]]:
        """(flag, problem) pairs; empty when the configuration is usable."""
        problems = []
        if self.seq_length < 1:
            problems.append(("--seq-length", "must be at least 1"))
        if not 0.0 <= self.knot_fraction <= 1.0:
            problems.append(("--knot-fraction", "must lie in [0, 1]"))
        if self.docs_per_knot < 1:
            problems.append(("--docs-per-knot", "must be at least 1"))
        if self.min_chunks < 1:
            problems.append(("--min-chunks", "must be at least 1"))
        if self.max_chunks < self.min_chunks:
            problems.append(("--max-chunks", f"must be at least --min-chunks {self.min_chunks}"))
        if self.chunk_min < 1:
            problems.append(("--chunk-min", "must be at least 1"))
        if self.chunk_max < 2 * self.chunk_min:
            problems.append(("--chunk-max", f"must be at least twice --chunk-min "
                             f"{self.chunk_min} (so every document length can be cut into "
                             "chunks within the bounds)"))
        longest = self.chunk_max + 1 + UNIT_OVERHEAD + CHUNK_OVERHEAD  # a knot of one chunk
        if self.seq_length >= 1 and self.seq_length < longest:
            problems.append(("--seq-length", f"{self.seq_length} is below the longest chunk "
                             f"(--chunk-max {self.chunk_max}) plus the {longest - self.chunk_max}"
                             " marker tokens around it; raise --seq-length or lower --chunk-max"))
        return problems


@dataclass
class KnotStats:
    """Counts of one build (or one group of it); `add` sums them."""

    samples: int = 0
    knotted_samples: int = 0
    source_tokens: int = 0
    marker_tokens: int = 0   # knot, document, chunk and trace markers (pads not included)
    pad_tokens: int = 0
    knots: int = 0
    pieces: int = 0          # document pieces knotted (a cut document counts once per piece)
    chunks: int = 0
    short_pieces: int = 0    # knotted pieces shorter than chunk_min (kept as one chunk)
    cut_documents: int = 0   # documents cut at a sample boundary (continued in the next)
    documents: int = 0       # source documents read

    def add(self, other: "KnotStats") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)


class _Stream:
    """The documents as one token stream; the current document (or its rest) is the unit."""

    def __init__(self, documents: Sequence[numpy.ndarray]):
        self.documents = documents
        self.index = 0
        self.offset = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self.index < len(self.documents) and len(self.documents[self.index]) == 0:
            self.index += 1

    def __bool__(self) -> bool:
        return self.index < len(self.documents)

    def unit_length(self) -> int:
        return len(self.documents[self.index]) - self.offset

    def take(self, count: int) -> numpy.ndarray:
        """The next `count` tokens of the current unit (count <= unit_length())."""
        document = self.documents[self.index]
        piece = document[self.offset:self.offset + count]
        self.offset += count
        if self.offset == len(document):
            self.index += 1
            self.offset = 0
            self._skip_empty()
        return piece


def build_samples(documents: Sequence[numpy.ndarray], config: KnotConfig, markers: MarkerIds,
                  rng: numpy.random.Generator) -> Tuple[numpy.ndarray, KnotStats]:
    """Samples ([count, seq_length] int64) from `documents` (1-D integer arrays, in order)."""
    stats = KnotStats(documents=sum(1 for d in documents if len(d)))
    stream = _Stream(documents)
    samples = []
    while stream:
        knotted = bool(rng.random() < config.knot_fraction)
        parts: List[numpy.ndarray] = []
        if knotted:
            room = _knotted_sample(stream, config, markers, rng, parts, stats)
        else:
            room = _plain_sample(stream, config.seq_length, parts, stats)
        if room:
            parts.append(numpy.full(room, markers.pad, dtype=numpy.int64))
            stats.pad_tokens += room
        sample = numpy.concatenate(parts).astype(numpy.int64, copy=False)
        assert sample.size == config.seq_length
        samples.append(sample)
        stats.samples += 1
        stats.knotted_samples += knotted
    array = (numpy.stack(samples) if samples
             else numpy.zeros((0, config.seq_length), dtype=numpy.int64))
    return array, stats


def _plain_sample(stream: _Stream, seq_length: int, parts, stats: KnotStats) -> int:
    room = seq_length
    while room and stream:
        length = stream.unit_length()
        take = min(room, length)
        parts.append(stream.take(take))
        stats.source_tokens += take
        room -= take
        if take < length:
            stats.cut_documents += 1
    return room


def _knotted_sample(stream: _Stream, config: KnotConfig, markers: MarkerIds, rng, parts,
                    stats: KnotStats) -> int:
    room = config.seq_length
    while stream and room >= 1 + SMALLEST_UNIT:
        room -= 1  # <|utk_knot|>
        pieces: List[List[numpy.ndarray]] = []
        cut = False
        while stream and len(pieces) < config.docs_per_knot and room >= SMALLEST_UNIT:
            length = stream.unit_length()
            wanted = int(rng.integers(config.min_chunks, config.max_chunks + 1))
            count = chunk_count(length, wanted, config)
            if length + _overhead(count) <= room:
                take = length
            else:
                take, count = _cut(room, length, wanted, config)
                if take == 0:
                    break
                cut = take < length
            tokens = stream.take(take)
            pieces.append(_split(tokens, count, config, rng))
            room -= take + _overhead(count)
            stats.source_tokens += take
            stats.short_pieces += take < config.chunk_min
            stats.cut_documents += cut
            if cut:
                break
        if not pieces:  # nothing fitted: give the knot marker's room back to the padding
            room += 1
            break
        _emit_knot(pieces, markers, rng, parts, stats)
        if cut:
            break
    return room


def _overhead(chunks: int) -> int:
    return UNIT_OVERHEAD + CHUNK_OVERHEAD * chunks


def chunk_count(length: int, wanted: int, config: KnotConfig) -> int:
    """`wanted` clipped to the chunk counts whose chunks can all lie in [chunk_min, chunk_max]
    (1 for a piece shorter than chunk_min)."""
    low = max(1, -(-length // config.chunk_max))
    high = max(1, length // config.chunk_min)
    return min(max(wanted, low), high)


def _feasible(length: int, count: int, config: KnotConfig) -> bool:
    if length < 1 or count > config.chunk_markers:
        return False
    if count == 1:
        return length <= config.chunk_max
    return count * config.chunk_min <= length <= count * config.chunk_max


def _cut(room: int, length: int, wanted: int, config: KnotConfig) -> Tuple[int, int]:
    """(tokens, chunks) of the piece that fills `room` exactly; (0, 0) when none can."""
    counts = sorted(range(1, config.chunk_markers + 1), key=lambda c: (abs(c - wanted), c))
    for count in counts:
        take = room - _overhead(count)
        if 1 <= take <= length and _feasible(take, count, config):
            return take, count
    return 0, 0


def _split(tokens: numpy.ndarray, count: int, config: KnotConfig, rng) -> List[numpy.ndarray]:
    lengths = chunk_lengths(len(tokens), count, config, rng)
    bounds = numpy.cumsum(lengths)[:-1]
    return numpy.split(tokens, bounds)


def chunk_lengths(length: int, count: int, config: KnotConfig, rng) -> numpy.ndarray:
    """`count` chunk lengths summing to `length`, each in [chunk_min, chunk_max] (one chunk
    may be shorter than chunk_min only when it is the whole piece): chunk_min each plus a
    uniformly random composition of the rest, capped at chunk_max (overflow handed on)."""
    if count == 1:
        return numpy.array([length], dtype=numpy.int64)
    extra = length - count * config.chunk_min
    cap = config.chunk_max - config.chunk_min
    cuts = numpy.sort(rng.integers(0, extra + 1, size=count - 1))
    parts = numpy.diff(numpy.concatenate(([0], cuts, [extra]))).astype(numpy.int64)
    while parts.max() > cap:
        over = int(parts.max()) - cap
        parts[int(parts.argmax())] = cap
        for j in range(count):
            give = min(over, cap - int(parts[j]))
            parts[j] += give
            over -= give
            if over == 0:
                break
    return parts + config.chunk_min


def _emit_knot(pieces: List[List[numpy.ndarray]], markers: MarkerIds, rng, parts,
               stats: KnotStats) -> None:
    order = [(p, c) for p, chunks in enumerate(pieces) for c in range(len(chunks))]
    order = [order[i] for i in rng.permutation(len(order))]
    labels = [rng.permutation(len(chunks)) for chunks in pieces]
    last = {p: i for i, (p, _) in enumerate(order)}
    parts.append(numpy.array([markers.knot], dtype=numpy.int64))
    added = 1
    for i, (p, c) in enumerate(order):
        parts.append(numpy.array([markers.docs[p], markers.chunks[labels[p][c]]],
                                 dtype=numpy.int64))
        parts.append(pieces[p][c])
        added += 2
        if last[p] == i:
            trace = [markers.trace, *(markers.chunks[label] for label in labels[p]),
                     markers.trace_end]
            parts.append(numpy.array(trace, dtype=numpy.int64))
            added += len(trace)
    stats.marker_tokens += added
    stats.knots += 1
    stats.pieces += len(pieces)
    stats.chunks += len(order)
