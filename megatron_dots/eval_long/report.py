"""eval-long outputs, written atomically: `eval_long.csv` (one row per task x length x depth),
`eval_long.json` (settings, chance levels, the cells with their trials) and `eval_long.png`
(per task, length x depth heatmaps of exact-match accuracy and of the graded scores)."""

import csv
import io
import json
import math
import os
from dataclasses import asdict
from typing import List, Sequence

import numpy as np

from ..storage.atomic import atomic_write_text
from .scoring import METRICS, CellScore

COLUMNS = ("task", "length", "depth", "trials") + METRICS
# heatmap panels: metric, title, colour range (None: the data's range)
PANELS = (("accuracy", "exact match (greedy)", (0.0, 1.0)),
          ("token_accuracy", "answer token accuracy", (0.0, 1.0)),
          ("choice_accuracy", "true key picked by likelihood", (0.0, 1.0)),
          ("answer_logprob", "answer log-prob / token", None))


def csv_text(cells: Sequence[CellScore]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        row = cell.row()
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                         for k in COLUMNS})
    return out.getvalue()


def _no_nan(value):
    """NaN (a score that does not apply, e.g. ranks of one candidate) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def json_text(cells: Sequence[CellScore], settings: dict, chance: dict) -> str:
    cell_entries = [dict(cell.row(), per_trial=[asdict(t) for t in cell.per_trial])
                    for cell in cells]
    return json.dumps(_no_nan({"settings": settings, "chance": chance, "cells": cell_entries}),
                      indent=1, allow_nan=False) + "\n"


def _grid(cells: List[CellScore], metric: str):
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c.depth), lengths.index(c.length)] = getattr(c, metric)
    return grid, lengths, depths


def plot_heatmaps(cells: Sequence[CellScore], png_path: str, title: str) -> str:
    """One row of panels per task: depth (rows) x length (columns), values written in."""
    from ..telemetry.plots import new_figure, save_png

    tasks = list(dict.fromkeys(c.task for c in cells))
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    fig = new_figure(width=min(28.0, 1.5 + len(PANELS) * (1.6 + 0.9 * len(lengths))),
                     height=min(30.0, 1.0 + len(tasks) * (1.2 + 0.45 * len(depths))))
    axes = fig.subplots(len(tasks), len(PANELS), squeeze=False)
    for row, task in enumerate(tasks):
        mine = [c for c in cells if c.task == task]
        for col, (metric, label, limits) in enumerate(PANELS):
            ax = axes[row][col]
            grid, xs, ys = _grid(mine, metric)
            finite = grid[np.isfinite(grid)]
            low, high = limits or ((finite.min(), finite.max() + 1e-9) if finite.size
                                   else (0.0, 1.0))
            image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=high, aspect="auto",
                              origin="upper")
            for (i, j), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < (low + high) / 2 else "black")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs], fontsize=7, rotation=45)
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys], fontsize=7)
            ax.set_title(f"{task}: {label}", fontsize=8)
            ax.set_xlabel("length (tokens)", fontsize=7)
            if col == 0:
                ax.set_ylabel("needle depth", fontsize=7)
            fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return save_png(fig, png_path)


def write_outputs(out_dir: str, cells: Sequence[CellScore], settings: dict,
                  chance: dict) -> List[str]:
    """The CSV, JSON and PNG in `out_dir` (created if missing); their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in
             ("eval_long.csv", "eval_long.json", "eval_long.png")]
    atomic_write_text(paths[0], csv_text(cells))
    atomic_write_text(paths[1], json_text(cells, settings, chance))
    plot_heatmaps(cells, paths[2], f"eval-long: {os.path.basename(str(settings.get('model')))}")
    return paths
