"""PNG plots of training telemetry: the layer x expert token-share heatmap and loss curves.

matplotlib (its Agg canvas, no pyplot and no global backend switch) is imported inside the
functions, so importing this module costs nothing. PNGs are written to a hidden sibling and
renamed into place: a reader never sees a half-written image. `main` is the
`megatron-dots plot-experts` subcommand.
"""

import argparse
import csv
import math
import os
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .expert_load import ExpertLoadRecords, TelemetryError, current_timeline, read_expert_load_csv

# --------------------------------------------------------------------------- heatmap

HEATMAP_RANGE = 8.0  # the colour scale spans 1/E / 8 .. 8 / E (log), saturating beyond


def heatmap_matrix(records: ExpertLoadRecords, iteration: Optional[int] = None,
                   window: int = 1) -> Tuple[List[int], np.ndarray, List[int]]:
    """(layers, shares [L, E], iterations used) for the heatmap: the logged iteration
    `iteration` (default: the last), or with `window > 1` the token-weighted mean over the
    `window` logged iterations ending there (fewer when fewer were logged)."""
    where = records.path or "expert-load records"
    if window < 1:
        raise TelemetryError(f"window must be >= 1, got {window}")
    logged = sorted(set(records.iterations.tolist()))
    if not logged:
        raise TelemetryError(f"{where}: no rows logged yet")
    if iteration is None:
        iteration = logged[-1]
    if iteration not in logged:
        raise TelemetryError(f"{where}: iteration {iteration} was not logged (logged: "
                             f"{_describe_iterations(logged)})")
    end = logged.index(iteration) + 1
    used = logged[max(0, end - window):end]
    in_window = np.isin(records.iterations, used)
    tokens = np.array([row["tokens"] for row in records.rows], dtype=np.float64)
    layers = sorted(set(records.layers[in_window].tolist()))
    matrix = np.zeros((len(layers), records.num_experts))
    for i, layer in enumerate(layers):
        pick = in_window & (records.layers == layer)
        weight = tokens[pick]
        shares = records.shares[pick]
        matrix[i] = (weight @ shares / weight.sum()) if weight.sum() > 0 else shares.mean(axis=0)
    return layers, matrix, used


def _describe_iterations(logged: Sequence[int]) -> str:
    if len(logged) <= 8:
        return ", ".join(map(str, logged))
    return f"{len(logged)} iterations from {logged[0]} to {logged[-1]}, last ones " + \
        ", ".join(map(str, logged[-4:]))


def plot_expert_heatmap(csv_path: str, png_path: str, iteration: Optional[int] = None,
                        window: int = 1) -> str:
    """Write a layer x expert heatmap of token share from an `ExpertLoadLogger` CSV.

    Log colour scale centred on the balanced share 1/E (white), red above, blue below,
    saturating at HEATMAP_RANGE times over / under; black marks experts that got no tokens.
    The title names the iteration(s) and the largest share. Returns `png_path`.
    """
    records = read_expert_load_csv(csv_path)
    layers, matrix, used = heatmap_matrix(records, iteration, window)
    n_layers, n_experts = matrix.shape
    uniform = 1.0 / n_experts
    fig = new_figure(width=min(24.0, max(6.0, 2.5 + 0.09 * n_experts)),
                      height=min(20.0, max(4.0, 1.8 + 0.22 * n_layers)))
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="black")
    norm = LogNorm(vmin=uniform / HEATMAP_RANGE, vmax=uniform * HEATMAP_RANGE)
    shown = np.ma.masked_less_equal(matrix, 0.0)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    step = max(1, math.ceil(n_layers / 32))
    ax.set_yticks(range(0, n_layers, step), [str(l) for l in layers[::step]])
    ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    bar = fig.colorbar(image, ax=ax, extend="both")
    ratios = [2.0 ** k for k in range(-3, 4) if 2.0 ** abs(k) <= HEATMAP_RANGE]
    bar.set_ticks([uniform * r for r in ratios],
                  labels=[f"{100 * uniform * r:.3g}% ({r:g}x)" for r in ratios])
    bar.ax.minorticks_off()
    bar.ax.axhline(uniform, color="black", linewidth=1.0)
    bar.set_label("token share (black: none)")
    row, expert = np.unravel_index(int(np.argmax(matrix)), matrix.shape)
    when = (f"iteration {used[0]}" if len(used) == 1 else
            f"iterations {used[0]}-{used[-1]} (mean of {len(used)} logs)")
    ax.set_title(f"expert load, {when}\nmax share {100 * matrix.max():.2f}% (layer "
                 f"{layers[row]}, expert {expert}); uniform 1/E = {100 * uniform:.3g}%",
                 fontsize=10)
    return save_png(fig, png_path)


# --------------------------------------------------------------------------- loss curves


def plot_loss(records: Iterable[Tuple[int, float]], png_path: str, title: str = "training loss",
              logy: bool = False, second: Optional[Iterable[Tuple[int, float]]] = None,
              label: str = "loss", second_label: str = "validation loss") -> str:
    """Write a loss curve from (iteration, loss) pairs, optionally with a second series (e.g.
    validation loss) and a log-scaled y axis. A NaN loss shows as a gap. Returns `png_path`."""
    x, y = _series(records, "records")
    if not len(x):
        raise TelemetryError("plot_loss: no (iteration, loss) records to plot")
    series = [(x, y, label, {"linewidth": 1.0})]
    if second is not None:
        x2, y2 = _series(second, "second")
        series.append((x2, y2, second_label, {"marker": "o", "markersize": 3, "linewidth": 1.2}))
    if logy and not any(np.any(np.isfinite(s[1]) & (s[1] > 0)) for s in series):
        raise TelemetryError("plot_loss: logy needs at least one positive loss")
    fig = new_figure(width=8.0, height=4.5)
    ax = fig.add_subplot()
    for xs, ys, name, style in series:
        ax.plot(xs, ys, label=name, **style)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    finite = y[np.isfinite(y)]
    last = f"; last {label} {finite[-1]:.4g} at iteration {x[np.isfinite(y)][-1]}" \
        if len(finite) else ""
    ax.set_title(f"{title}{last}", fontsize=10)
    if len(series) > 1:
        ax.legend()
    return save_png(fig, png_path)


def _series(records, name: str) -> Tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i, record in enumerate(records):
        try:
            iteration, value = record
            xs.append(int(iteration))
            ys.append(math.nan if value is None else float(value))
        except (TypeError, ValueError):
            raise TelemetryError(f"plot_loss: {name}[{i}] is not an (iteration, loss) pair: "
                                 f"{record!r}") from None
    order = np.argsort(np.array(xs, dtype=np.int64), kind="stable")
    return np.array(xs, dtype=np.int64)[order], np.array(ys, dtype=np.float64)[order]


def read_loss_csv(csv_path: str, column: str = "loss") -> List[Tuple[int, float]]:
    """(iteration, value) pairs of `column` from a CSV with an `iteration` column (other
    columns are ignored). Empty cells are skipped; rows a resumed run logged again supersede
    the abandoned run's rows from that iteration on."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise TelemetryError(f"{csv_path}: empty file, expected a header with iteration,"
                                 f"{column}")
        for needed in ("iteration", column):
            if needed not in header:
                raise TelemetryError(f"{csv_path}:1: no {needed!r} column (columns: "
                                     f"{', '.join(header)})")
        it_col, value_col = header.index("iteration"), header.index(column)
        rows = []
        for fields in reader:
            if not fields:
                continue
            lineno = reader.line_num
            if len(fields) != len(header):
                raise TelemetryError(f"{csv_path}:{lineno}: {len(fields)} fields, the header "
                                     f"has {len(header)}")
            rows.append((_parse_int(csv_path, lineno, "iteration", fields[it_col]),
                         _parse_float(csv_path, lineno, column, fields[value_col])))
    keep = current_timeline([(it,) for it, _ in rows])
    return [rows[i] for i in keep if rows[i][1] is not None]


def _parse_int(path: str, lineno: int, name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise TelemetryError(f"{path}:{lineno}: column {name!r}: cannot parse {text!r}") from None


def _parse_float(path: str, lineno: int, name: str, text: str) -> Optional[float]:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise TelemetryError(f"{path}:{lineno}: column {name!r}: cannot parse {text!r}") from None


def plot_loss_csv(csv_path: str, png_path: str, column: str = "loss",
                  second_column: Optional[str] = None, title: Optional[str] = None,
                  logy: bool = False) -> str:
    """`plot_loss` from the training loop's losses.csv (iteration,loss[,...] columns);
    `second_column` (e.g. "val_loss") adds a second series. Returns `png_path`."""
    records = read_loss_csv(csv_path, column)
    second = read_loss_csv(csv_path, second_column) if second_column else None
    return plot_loss(records, png_path, title=title or os.path.basename(csv_path), logy=logy,
                     second=second, label=column, second_label=second_column or "")


# --------------------------------------------------------------------------- output


def new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"megatron_dots.telemetry plots need matplotlib ({err}); "
                          "pip install matplotlib") from err
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, png_path: str) -> str:
    """Render `fig` to a hidden sibling of `png_path`, then rename it into place."""
    parent, name = os.path.split(os.path.abspath(png_path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return png_path


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[List[str]] = None) -> int:
    """`megatron-dots plot-experts`: heatmap PNG (or, with --over-time, the balance over
    time) from an expert-load CSV."""
    parser = argparse.ArgumentParser(
        prog="megatron-dots plot-experts",
        description="Plot a layer x expert heatmap of routed-token share from the expert-load "
        "CSV the training loop writes (white = balanced 1/E, red = overloaded, blue = starved); "
        "with --over-time, each MoE layer's balance against iteration instead.",
    )
    parser.add_argument("--csv", required=True, metavar="FILE",
                        help="expert-load CSV written by ExpertLoadLogger")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="PNG file to write")
    parser.add_argument("--iteration", type=int, default=None, metavar="N",
                        help="logged iteration to plot (default: the last one logged)")
    parser.add_argument("--window", type=int, default=1, metavar="N",
                        help="average the last N logged iterations up to --iteration, "
                        "weighted by tokens (default 1)")
    parser.add_argument("--over-time", action="store_true",
                        help="instead of the heatmap, draw per MoE layer against iteration: the "
                        "max share (with the uniform share 1/E, the collapse-alarm threshold and "
                        "a right axis in max share x E = max / mean load, the CSV's imbalance) "
                        "and the imbalance as the coefficient of variation of the experts' "
                        "loads (std / mean; 0 = balanced); shows whether the router bias is "
                        "balancing the load")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    if args.window < 1:
        print(f"error: --window must be >= 1, got {args.window}", file=sys.stderr)
        return 2
    if args.over_time and (args.iteration is not None or args.window != 1):
        print("error: --iteration and --window choose the heatmap's iterations; --over-time "
              "plots every logged iteration", file=sys.stderr)
        return 2
    try:
        if args.over_time:
            from .balance_plot import plot_expert_balance

            path = plot_expert_balance(args.csv, args.out)
        else:
            path = plot_expert_heatmap(args.csv, args.out, iteration=args.iteration,
                                       window=args.window)
    except (TelemetryError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
