"""PNGs of the analyses: the domain x expert share heatmaps (one panel per MoE layer), the
specialization ratios, and the ablation bar chart. Drawn with `telemetry.plots`' figure and
atomic-save helpers (matplotlib imported only when drawing)."""

import math
from typing import Dict, List

import numpy as np

from ..telemetry.plots import new_figure, save_png
from .expert_share import ExpertShares, specialization

MAX_PANELS = 64  # layers drawn in one grid; more are sampled evenly (the CSV has them all)
RATIO_RANGE = 8.0  # specialization colour scale spans 1/8x .. 8x


def _panel_layers(layers: List[int]) -> List[int]:
    if len(layers) <= MAX_PANELS:
        return list(range(len(layers)))
    return sorted({round(i * (len(layers) - 1) / (MAX_PANELS - 1)) for i in range(MAX_PANELS)})


def _grid(count: int):
    cols = min(count, 4 if count <= 16 else 8)
    return cols, math.ceil(count / cols)


def _panels(result: ExpertShares, values: np.ndarray, norm, cmap, png_path: str, title: str,
            label: str, ticks: Dict[float, str]) -> str:
    picked = _panel_layers(result.layers)
    cols, rows = _grid(len(picked))
    n_domains, n_experts = len(result.domains), values.shape[2]
    fig = new_figure(width=min(26.0, 2.0 + cols * max(3.0, 0.05 * n_experts)),
                     height=min(30.0, 1.2 + rows * (0.6 + 0.3 * n_domains)))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    image = None
    for slot, ax in enumerate(axes.flat):
        if slot >= len(picked):
            ax.set_visible(False)
            continue
        l = picked[slot]
        image = ax.imshow(np.ma.masked_invalid(values[:, l]), aspect="auto",
                          interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_title(f"layer {result.layers[l]}", fontsize=8)
        ax.set_yticks(range(n_domains), result.domains, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("expert", fontsize=8)
    bar = fig.colorbar(image, ax=axes, extend="both", shrink=0.9)
    bar.set_ticks(list(ticks), labels=list(ticks.values()))
    bar.ax.minorticks_off()
    bar.set_label(label)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, png_path)


def plot_share_heatmaps(result: ExpertShares, png_path: str) -> str:
    """Domain x expert routed-slot share, one panel per MoE layer; log colours centred on the
    uniform share 1/E, black where an expert received nothing."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    shares = result.shares
    n_experts = shares.shape[2]
    uniform = 1.0 / n_experts
    norm = LogNorm(vmin=uniform / RATIO_RANGE, vmax=uniform * RATIO_RANGE)
    cmap = colormaps["RdBu_r"].with_extremes(bad="black")
    ticks = {uniform * 2.0 ** k: f"{100 * uniform * 2.0 ** k:.3g}%" for k in range(-3, 4)}
    d, l, e = np.unravel_index(int(np.argmax(shares)), shares.shape)
    title = (f"routed-slot share by domain; uniform 1/E = {100 * uniform:.3g}%; max "
             f"{100 * shares.max():.2f}% ({result.domains[d]}, layer {result.layers[l]}, "
             f"expert {e})")
    return _panels(result, np.where(shares > 0, shares, np.nan), norm, cmap, png_path, title,
                   "routed-slot share (black: none)", ticks)


def plot_specialization(result: ExpertShares, png_path: str) -> str:
    """Each expert's share on a domain over its mean share across domains (log colours, 1x
    white), one panel per MoE layer."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    ratio = specialization(result.shares)
    norm = LogNorm(vmin=1.0 / RATIO_RANGE, vmax=RATIO_RANGE)
    cmap = colormaps["PuOr_r"].with_extremes(bad="lightgrey")
    ticks = {2.0 ** k: f"{2.0 ** k:g}x" for k in range(-3, 4)}
    shown = np.where(ratio > 0, ratio, np.nan)
    return _panels(result, shown, norm, cmap, png_path,
                   "specialization: share on the domain / mean share over domains",
                   "ratio (grey: no slots)", ticks)


def plot_ablation(summary: Dict, png_path: str) -> str:
    """Grouped bars: each domain's loss per variant, with the bootstrap intervals."""
    domains = list(summary["domains"])
    variants = summary["variants"]
    fig = new_figure(width=max(5.0, 1.6 + 1.3 * len(domains)), height=4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        entries = [summary["domains"][d][variant] for d in domains]
        losses = np.array([e["loss"] for e in entries])
        errors = np.array([[e["loss"] - e["low"] for e in entries],
                           [e["high"] - e["loss"] for e in entries]])
        ax.bar(np.arange(len(domains)) + (k - (len(variants) - 1) / 2) * width, losses, width,
               yerr=np.clip(errors, 0, None), capsize=3, label=variant)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("mean next-token cross entropy (nats)")
    ax.legend(fontsize=8)
    ax.set_title(f"shared-expert ablation: {summary['verdict']['kind']}", fontsize=10)
    return save_png(fig, png_path)
