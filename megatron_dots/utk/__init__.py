"""UtK ("Untie the Knots", arXiv 2409.04774): long-context samples for the 32K stage.

`markers` names the marker tokens and resolves their ids, `knotting` turns a run of documents
into samples of exactly ``seq_length`` tokens (chunking, knotting, tying, backtracing target;
pure numpy), `build` reads an indexed dataset and writes the samples as one with worker
processes, and `cli` is ``megatron-dots utk``.
"""

from .knotting import KnotConfig, KnotStats, build_samples
from .markers import MarkerError, MarkerIds, marker_names

__all__ = ["KnotConfig", "KnotStats", "MarkerError", "MarkerIds", "build_samples",
           "marker_names"]
