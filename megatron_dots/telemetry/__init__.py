"""Training telemetry: expert-load statistics, collapse / dead-expert alarms, and plots.

`summarize(counts[L, E], bias[L, E], layers)` turns the routed-token counters of one log
interval into per-layer `LayerLoad`s; `ExpertLoadLogger` appends them to a CSV and TensorBoard
and returns `alarms`; `plot_expert_heatmap`, `plot_expert_balance` (max share and imbalance
per layer against iteration; numbers from `balance_series`), `plot_loss` and `plot_loss_csv`
draw PNGs (matplotlib is imported only when a plot is drawn).
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
from .balance_plot import BalanceSeries, balance_series, plot_expert_balance
from .plots import heatmap_matrix, plot_expert_heatmap, plot_loss, plot_loss_csv, read_loss_csv

__all__ = [
    "BalanceSeries", "COLLAPSE_SHARE", "DEAD_SHARE", "ExpertLoadLogger", "ExpertLoadRecords",
    "LayerLoad", "TelemetryError", "alarms", "balance_series", "collapse_threshold",
    "heatmap_matrix", "plot_expert_balance", "plot_expert_heatmap", "plot_loss",
    "plot_loss_csv", "read_expert_load_csv", "read_loss_csv", "summarize",
]
