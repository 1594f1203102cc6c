"""`--dots-a2a-timing` output: the per-layer sums of `a2a_timing.A2ATiming` averaged over the
ranks that hold each layer, the log line, the CSV and TensorBoard scalars.

Reported per MoE layer and log interval: milliseconds per iteration (the iteration's
micro-batches summed), averaged over the ranks that hold the layer; over all layers, the mean
per layer (shares are then ratios of those means). CSV columns: `CSV_COLUMNS`.
`A2ATimingReport` is what the training loop holds.
"""

import csv
import io
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .a2a_timing import A2ATiming
from .expert_load import _prepare_csv, layer_tag

__all__ = ["A2ATimingLogger", "A2ATimingReport", "CSV_COLUMNS", "LayerA2ATime", "describe",
           "gather_layer_times", "mean_over_layers"]

CSV_COLUMNS = ("iteration", "layer", "iterations", "forwards", "dispatch_ms", "combine_ms",
               "moe_ms", "exposed_ms", "a2a_share", "exposed_share")


@dataclass
class LayerA2ATime:
    """One MoE layer (layer 0: the mean over layers) over one log interval: milliseconds per
    iteration, averaged over the ranks holding the layer."""

    layer: int
    dispatch_ms: float
    combine_ms: float
    moe_ms: float
    exposed_ms: float
    forwards: float = 0.0  # MoE-layer forwards timed per rank over the interval
    iterations: int = 0

    @property
    def a2a_share(self) -> float:
        return (self.dispatch_ms + self.combine_ms) / self.moe_ms if self.moe_ms > 0 else 0.0

    @property
    def exposed_share(self) -> float:
        return self.exposed_ms / self.moe_ms if self.moe_ms > 0 else 0.0


def gather_layer_times(timing: A2ATiming, layers: Sequence[int],
                       iterations: int) -> List[LayerA2ATime]:
    """Take this rank's sums and average them per layer over the ranks that hold it (a
    collective: every rank calls it); `layers` are all the model's MoE layer numbers."""
    from ..compat.distributed import default_device

    ms, forwards = timing.take()
    row = {layer: i for i, layer in enumerate(layers)}
    table = torch.zeros(len(layers), 6, dtype=torch.float64)
    for layer in timing.layer_numbers:
        table[row[layer], 5] = 1.0  # holders
    for layer, values in ms.items():
        table[row[layer], :4] += torch.tensor(values, dtype=torch.float64)
    for layer, count in forwards.items():
        table[row[layer], 4] += count
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        table = table.to(default_device())
        torch.distributed.all_reduce(table)
        table = table.cpu()
    per_iteration = max(1, iterations)
    times = []
    for layer, values in zip(layers, table.tolist()):
        holders = values[5]
        if holders:
            times.append(LayerA2ATime(layer, *(v / holders / per_iteration for v in values[:4]),
                                      forwards=values[4] / holders, iterations=iterations))
    return times


def mean_over_layers(times: Sequence[LayerA2ATime]) -> LayerA2ATime:
    """Layer 0: the mean per layer of every time (so shares are ratios of sums)."""
    n = max(1, len(times))
    return LayerA2ATime(0, *(sum(getattr(t, f) for t in times) / n for f in
                             ("dispatch_ms", "combine_ms", "moe_ms", "exposed_ms", "forwards")),
                        iterations=times[0].iterations if times else 0)


def describe(times: Sequence[LayerA2ATime], probe_waits: bool) -> str:
    """The log line of one interval."""
    mean = mean_over_layers(times)
    how = ("compute-stream waits" if probe_waits else "= dispatch + combine")
    return (f"all-to-all timing (forward, per MoE layer and iteration, mean of {len(times)} "
            f"layers): dispatch {mean.dispatch_ms:.3f} ms | combine {mean.combine_ms:.3f} ms | "
            f"MoE layer {mean.moe_ms:.3f} ms | a2a share {100 * mean.a2a_share:.1f}% | "
            f"exposed {mean.exposed_ms:.3f} ms ({how}) | "
            f"exposed share {100 * mean.exposed_share:.1f}%")


# ------------------------------------------------------------------------------------ output

def _fmt(value: float) -> str:
    return format(value, ".9g")


class A2ATimingLogger:
    """Appends one CSV row per layer (flushed and fsynced per interval; an existing file with
    the same header, a resumed run, is appended to, a different header is an error) and
    TensorBoard scalars a2a_timing/{dispatch_ms,combine_ms,moe_ms,exposed_ms,a2a_share,
    exposed_share}/layer_NN, and the same tags without the layer for the mean over layers."""

    FIELDS = ("dispatch_ms", "combine_ms", "moe_ms", "exposed_ms", "a2a_share", "exposed_share")

    def __init__(self, csv_path: Optional[str] = None, tb_writer=None):
        self.csv_path = csv_path
        self.tb_writer = tb_writer
        if csv_path is not None:  # a mismatched existing file fails before training starts
            _prepare_csv(csv_path, list(CSV_COLUMNS))

    def log(self, iteration: int, times: Sequence[LayerA2ATime]) -> None:
        if not times:
            return
        if self.csv_path is not None:
            self._append_csv(iteration, times)
        if self.tb_writer is not None:
            for t in (*times, mean_over_layers(times)):
                suffix = f"/{layer_tag(t.layer)}" if t.layer else ""
                for name in self.FIELDS:
                    self.tb_writer.add_scalar(f"a2a_timing/{name}{suffix}", getattr(t, name),
                                              iteration)

    def _append_csv(self, iteration: int, times: Sequence[LayerA2ATime]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for t in times:
            writer.writerow([int(iteration), t.layer, t.iterations, _fmt(t.forwards),
                             *(_fmt(getattr(t, name)) for name in self.FIELDS)])
        with open(self.csv_path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


class A2ATimingReport:
    """What the training loop holds with --dots-a2a-timing: the probes (every rank) and, on the
    logging rank, the CSV / TensorBoard output. `gather` is a collective."""

    def __init__(self, chunks, layers: Sequence[int], csv_path: Optional[str] = None,
                 tb_writer=None, clock=None):
        """`layers`: the 1-based numbers of all the model's MoE layers (`DotsConfig.
        moe_layer_numbers`), whichever stage holds them."""
        self.timing = A2ATiming(chunks, clock)
        self.layers = list(layers)
        self.logger = A2ATimingLogger(csv_path, tb_writer)

    def gather(self, iterations: int) -> List[LayerA2ATime]:
        return gather_layer_times(self.timing, self.layers, iterations)

    def log(self, iteration: int, times: Sequence[LayerA2ATime]) -> Optional[str]:
        """Write the interval (logging rank); returns the log line, None without layers."""
        if not times:
            return None
        self.logger.log(iteration, times)
        return describe(times, self.timing.probe_waits)

    def close(self) -> None:
        self.timing.remove()
