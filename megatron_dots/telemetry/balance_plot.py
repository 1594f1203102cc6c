"""Expert balance over time: per MoE layer, the largest expert's token share and the spread of
the load against iteration, from an `ExpertLoadLogger` CSV (`plot-experts --over-time`).

It answers "is the aux-loss-free bias winning?": a layer whose max share falls towards the
uniform share 1/E and stays under the collapse threshold is being balanced; one that stays
high (or climbs) is not. Two measures of imbalance are drawn:

* max share, with a right-hand axis in multiples of 1/E: max share x E = max load / mean load,
  the CSV's and TensorBoard's `imbalance` column (1 = balanced, E = one expert takes all);
* the coefficient of variation of the experts' loads, std / mean over the E experts
  (population std; 0 = balanced, sqrt(E - 1) = one expert takes all), which sees every
  expert, not just the busiest.

`balance_series` computes the plotted numbers (pure NumPy); `plot_expert_balance` draws them.
"""

from typing import Dict, List, NamedTuple, Optional

import numpy as np

from .expert_load import ExpertLoadRecords, TelemetryError, collapse_threshold, read_expert_load_csv

IMBALANCE_LABEL = "max share x E (max / mean load)"
CV_LABEL = "imbalance: coefficient of variation\n(std / mean of expert load, 0 = balanced)"


class BalanceSeries(NamedTuple):
    """Per-layer balance measures at each logged iteration. Arrays are [layers, iterations];
    NaN where a layer was not logged at an iteration or saw no routed tokens there."""

    layers: List[int]
    iterations: np.ndarray  # [T] int64, ascending
    max_share: np.ndarray  # [L, T]
    min_share: np.ndarray  # [L, T]
    imbalance: np.ndarray  # [L, T] max share x E = max / mean load
    cv: np.ndarray  # [L, T] std / mean of the E shares (population std)
    num_experts: int
    collapse_threshold: float  # the default alarm threshold for E experts (see expert_load)

    @property
    def uniform(self) -> float:
        return 1.0 / self.num_experts

    def last(self) -> Dict[int, float]:
        """{layer: max share at the last iteration that layer was logged with tokens}."""
        out = {}
        for layer, row in zip(self.layers, self.max_share):
            finite = row[np.isfinite(row)]
            if len(finite):
                out[layer] = float(finite[-1])
        return out


def balance_series(records: ExpertLoadRecords) -> BalanceSeries:
    """The numbers `plot_expert_balance` draws, from `read_expert_load_csv`'s records (computed
    from the share columns, so they agree with what the heatmap shows)."""
    if not len(records.iterations):
        raise TelemetryError(f"{records.path or 'expert-load records'}: no rows logged yet")
    iterations = np.unique(records.iterations)
    layers = sorted(set(records.layers.tolist()))
    num_experts = records.num_experts
    shape = (len(layers), len(iterations))
    max_share, min_share, cv = (np.full(shape, np.nan) for _ in range(3))
    row_of = {layer: i for i, layer in enumerate(layers)}
    col = np.searchsorted(iterations, records.iterations)
    for k, shares in enumerate(records.shares):
        total = shares.sum()
        if not (total > 0):  # a layer without routed tokens in that interval: a gap
            continue
        i, j = row_of[int(records.layers[k])], col[k]
        max_share[i, j], min_share[i, j] = shares.max(), shares.min()
        cv[i, j] = shares.std() / shares.mean()
    return BalanceSeries(layers=layers, iterations=iterations, max_share=max_share,
                         min_share=min_share, imbalance=max_share * num_experts, cv=cv,
                         num_experts=num_experts,
                         collapse_threshold=collapse_threshold(num_experts))


def plot_expert_balance(csv_path: str, png_path: str, title: Optional[str] = None) -> str:
    """Write, from an `ExpertLoadLogger` CSV, each MoE layer's max share (top; dotted line at
    the uniform share 1/E, dashed at the collapse-alarm threshold, right axis in multiples of
    1/E = max / mean load) and the coefficient of variation of its expert loads (bottom)
    against iteration. Returns `png_path`."""
    from .plots import new_figure, save_png

    series = balance_series(read_expert_load_csv(csv_path))
    n_layers, uniform, experts = len(series.layers), series.uniform, series.num_experts
    fig = new_figure(width=10.0, height=6.5 if n_layers <= 12 else 8.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    from matplotlib import colormaps

    cmap = colormaps["viridis" if n_layers > 10 else "tab10"]
    many = n_layers > 10  # too many layers for a legend: colour by depth, with a colour bar
    marker = "o" if len(series.iterations) <= 40 else None
    for i, layer in enumerate(series.layers):
        colour = cmap(i / max(1, n_layers - 1)) if many else cmap(i % 10)
        style = dict(color=colour, linewidth=1.2, marker=marker, markersize=3)
        top.plot(series.iterations, 100 * series.max_share[i], label=f"layer {layer}", **style)
        bottom.plot(series.iterations, series.cv[i], **style)
    top.axhline(100 * uniform, color="black", linestyle=":", linewidth=1.0,
                label=f"uniform 1/E = {100 * uniform:.3g}%")
    top.axhline(100 * series.collapse_threshold, color="red", linestyle="--", linewidth=1.0,
                label=f"collapse alarm > {100 * series.collapse_threshold:.3g}%")
    top.set_ylim(bottom=0)
    top.set_ylabel("max share of routed slots (%)")
    right = top.secondary_yaxis("right", functions=(lambda p: p * experts / 100,
                                                    lambda r: r * 100 / experts))
    right.set_ylabel(IMBALANCE_LABEL, fontsize=9)
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel(CV_LABEL, fontsize=9)
    bottom.set_xlabel("iteration")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    if many:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(norm=Normalize(series.layers[0], series.layers[-1]),
                                          cmap=cmap), ax=[top, bottom])
        bar.set_label("layer")
        top.legend(handles=top.get_lines()[-2:], fontsize=8, loc="upper right")
    else:  # outside the axes, so that it hides no line
        fig.legend(handles=top.get_lines(), fontsize=8, loc="outside right upper")
    last = series.last()
    worst = max(last, key=last.get) if last else None
    status = (f"last logged iteration {int(series.iterations[-1])}: max share "
              f"{100 * last[worst]:.1f}% (layer {worst}), " if worst is not None else "")
    over = [layer for layer, share in last.items() if share > series.collapse_threshold]
    status += (f"over the alarm threshold in layer(s) {over}" if over else
               "no layer over the alarm threshold") if last else "no routed tokens logged"
    top.set_title(f"{title or 'expert balance over time'} ({experts} experts)\n{status}",
                  fontsize=10)
    return save_png(fig, png_path)
