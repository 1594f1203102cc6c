"""Training telemetry: expert-load statistics, collapse / dead-expert alarms, and plots.

`summarize(counts[L, E], bias[L, E], layers)` turns the routed-token counters of one log
interval into per-layer `LayerLoad`s; `ExpertLoadLogger` appends them to a CSV and TensorBoard
and returns `alarms`; `plot_expert_heatmap`, `plot_loss` and `plot_loss_csv` draw PNGs
(matplotlib is imported only when a plot is drawn).
"""

from .expert_load import (
    COLLAPSE_SHARE,
    DEAD_SHARE,
    ExpertLoadLogger,
    ExpertLoadRecords,
    LayerLoad,
    TelemetryError,
    alarms,
    collapse_threshold,
    read_expert_load_csv,
    summarize,
)
from .plots import heatmap_matrix, plot_expert_heatmap, plot_loss, plot_loss_csv, read_loss_csv

__all__ = [
    "COLLAPSE_SHARE", "DEAD_SHARE", "ExpertLoadLogger", "ExpertLoadRecords", "LayerLoad",
    "TelemetryError", "alarms", "collapse_threshold", "heatmap_matrix", "plot_expert_heatmap",
    "plot_loss", "plot_loss_csv", "read_expert_load_csv", "read_loss_csv", "summarize",
]
