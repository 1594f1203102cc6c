"""Expert-load statistics: per-layer token shares, collapse / dead-expert alarms, and their log.

The training loop gathers, every log interval, `counts[L, E]` (tokens routed to each expert of
each MoE layer since the last log, summed over data-parallel ranks and steps), the routers'
`expert_bias[L, E]` and the global layer numbers of those L layers, and hands them on rank 0 to
`summarize`; `ExpertLoadLogger.log` appends the result to a CSV and to TensorBoard and returns
the alarm texts. `read_expert_load_csv` reads the CSV back (for the plots).

CSV columns: iteration, layer, tokens, max_share, min_share, imbalance, dead_experts,
collapsed_experts (expert ids joined by ";"), bias_norm, share_0 .. share_{E-1}; one row per
layer per log call. A resumed run appends to the same file; rows it logs again for iterations
already in the file supersede the old ones when read (see `read_expert_load_csv`).
"""

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

DEAD_SHARE = 0.005  # an expert with under 0.5% of its layer's routed token-slots is dead
COLLAPSE_SHARE = 0.10  # an expert with over 10% of them raises a collapse alarm
# With few experts a balanced layer already gives each over 10% (dots-tiny: 8 experts, 12.5%);
# an expert then has to exceed this many times the balanced share 1/E to raise the alarm.
COLLAPSE_MIN_IMBALANCE = 2.0

FIXED_COLUMNS = ("iteration", "layer", "tokens", "max_share", "min_share", "imbalance",
                 "dead_experts", "collapsed_experts", "bias_norm")
_FLOAT_FORMAT = ".6g"  # shares to 6 significant digits: ~1.4 kB a row at 128 experts


class TelemetryError(ValueError):
    """Bad telemetry input or a malformed / mismatched telemetry file."""


@dataclass
class LayerLoad:
    """Routed-token load of one MoE layer over one log interval."""

    layer: int  # global layer number, 1-based like Megatron's layer_number
    shares: List[float]  # count_e / sum(count); all zeros when the layer saw no tokens
    max_share: float
    min_share: float
    dead_experts: int  # experts under DEAD_SHARE (0 when the layer saw no tokens)
    collapsed_experts: List[int] = field(default_factory=list)  # ids over the collapse threshold
    bias_norm: float = 0.0  # L2 norm of the layer's expert_bias
    tokens: float = 0.0  # routed token-slots (tokens x top-k)
    imbalance: float = 0.0  # max_share * E: 1.0 is perfectly balanced, 0.0 when no tokens
    dead_threshold: float = DEAD_SHARE  # the thresholds `summarize` applied
    collapse_threshold: float = COLLAPSE_SHARE

    @property
    def num_experts(self) -> int:
        return len(self.shares)


def collapse_threshold(num_experts: int, collapse_share: float = COLLAPSE_SHARE) -> float:
    """Share above which an expert raises a collapse alarm: `collapse_share`, or twice the
    balanced share 1/E when that is larger (fewer than 20 experts)."""
    return max(collapse_share, COLLAPSE_MIN_IMBALANCE / num_experts)


def summarize(counts, bias, layers: Sequence[int], dead_share: float = DEAD_SHARE,
              collapse_share: float = COLLAPSE_SHARE) -> List[LayerLoad]:
    """One `LayerLoad` per row of `counts[L, E]` (torch tensor, NumPy array or nested lists),
    with `bias[L, E]` the routers' expert_bias and `layers` the L global layer numbers."""
    counts = _as_float64(counts, "counts")
    bias = _as_float64(bias, "bias")
    layers = _check_inputs(counts, bias, layers)
    num_experts = counts.shape[1]
    threshold = collapse_threshold(num_experts, collapse_share)
    loads = []
    for layer, layer_counts, layer_bias in zip(layers, counts, bias):
        loads.append(_layer_load(layer, layer_counts, layer_bias, dead_share, threshold))
    return loads


def _layer_load(layer: int, counts: np.ndarray, bias: np.ndarray, dead_share: float,
                threshold: float) -> LayerLoad:
    tokens = float(counts.sum())
    bias_norm = float(np.sqrt(np.sum(bias * bias)))
    if tokens == 0.0:
        zeros = [0.0] * counts.shape[0]
        return LayerLoad(layer=layer, shares=zeros, max_share=0.0, min_share=0.0,
                         dead_experts=0, collapsed_experts=[], bias_norm=bias_norm, tokens=0.0,
                         imbalance=0.0, dead_threshold=dead_share, collapse_threshold=threshold)
    shares = counts / tokens
    max_share = float(shares.max())
    return LayerLoad(
        layer=layer, shares=shares.tolist(), max_share=max_share, min_share=float(shares.min()),
        dead_experts=int(np.count_nonzero(shares < dead_share)),
        collapsed_experts=[int(e) for e in np.flatnonzero(shares > threshold)],
        bias_norm=bias_norm, tokens=tokens, imbalance=max_share * counts.shape[0],
        dead_threshold=dead_share, collapse_threshold=threshold,
    )


def _as_float64(value, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device, in any dtype
        value = value.detach().cpu().double().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TelemetryError(f"summarize: {name} is not a numeric array ({err})") from None


def _check_inputs(counts: np.ndarray, bias: np.ndarray, layers) -> List[int]:
    if counts.ndim != 2 or counts.shape[1] == 0:
        raise TelemetryError(f"summarize: counts must have shape [layers, experts] with at "
                             f"least one expert, got shape {list(counts.shape)}")
    if bias.shape != counts.shape:
        raise TelemetryError(f"summarize: bias has shape {list(bias.shape)}, counts has "
                             f"{list(counts.shape)}; both must be [layers, experts]")
    layers = list(layers)
    if len(layers) != counts.shape[0]:
        raise TelemetryError(f"summarize: layers lists {len(layers)} layer numbers, counts has "
                             f"{counts.shape[0]} rows")
    numbers = [_layer_number(layer) for layer in layers]
    if len(set(numbers)) != len(numbers):
        raise TelemetryError(f"summarize: layers has repeated layer numbers: {numbers}")
    bad_rows = ~np.all(np.isfinite(counts) & (counts >= 0), axis=1)
    if bad_rows.any():
        bad = [numbers[i] for i in np.flatnonzero(bad_rows)]
        raise TelemetryError(f"summarize: counts must be finite and >= 0; layer(s) {bad} are not")
    return numbers


def _layer_number(layer) -> int:
    if hasattr(layer, "item"):  # a 0-d tensor / NumPy scalar
        layer = layer.item()
    if isinstance(layer, bool) or not isinstance(layer, (int, float)) or layer != int(layer) \
            or layer < 1:
        raise TelemetryError(f"summarize: layers must be 1-based layer numbers, got {layer!r}")
    return int(layer)


# ------------------------------------------------------------------------------------ alarms

def alarms(loads: Sequence[LayerLoad], iteration: int) -> List[str]:
    """Warnings for collapsed experts, dead experts, layers without tokens and a non-finite
    bias, in layer order, under the thresholds `summarize` applied. Empty when all is well."""
    out = []
    for load in sorted(loads, key=lambda l: l.layer):
        prefix = f"iteration {iteration}: layer {load.layer}"
        if not math.isfinite(load.bias_norm):
            out.append(f"{prefix}: expert bias has non-finite values (bias norm "
                       f"{load.bias_norm})")
        if load.tokens == 0:
            out.append(f"{prefix}: no routed tokens since the last log")
            continue
        for expert in load.collapsed_experts:
            out.append(f"{prefix} expert {expert} receives {100 * load.shares[expert]:.1f}% of "
                       f"routed tokens (collapse alarm > {_percent(load.collapse_threshold)})")
        if load.dead_experts:
            dead = [e for e, s in enumerate(load.shares) if s < load.dead_threshold]
            listed = ", ".join(map(str, dead[:10])) + (", ..." if len(dead) > 10 else "")
            out.append(f"{prefix}: {load.dead_experts} of {load.num_experts} experts under "
                       f"{_percent(load.dead_threshold)} of routed tokens (dead: {listed})")
    return out


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


# ------------------------------------------------------------------------------------ logger

class ExpertLoadLogger:
    """Appends `LayerLoad`s to a CSV (flushed per call) and to a TensorBoard writer.

    `csv_path=None` skips the CSV, `tb_writer=None` skips TensorBoard. An existing CSV with the
    same header (a resumed run) is appended to; a different header is an error. TensorBoard
    tags per layer: expert_load/{max_share,min_share,imbalance,dead_experts,bias_norm}/layer_NN;
    over all layers: expert_load/max_share and expert_load/imbalance (max),
    expert_load/dead_experts and expert_load/collapsed_experts (sum); with `histograms`,
    expert_load/shares/layer_NN.
    """

    def __init__(self, csv_path: Optional[str], tb_writer=None, histograms: bool = False):
        self.csv_path = csv_path
        self.tb_writer = tb_writer
        self.histograms = histograms
        self._header: Optional[List[str]] = None  # set once the CSV header is checked / written

    def log(self, iteration: int, loads: Sequence[LayerLoad]) -> List[str]:
        """Record one log interval; returns `alarms(loads, iteration)`."""
        loads = list(loads)
        if loads:
            _check_same_width(loads)
            if self.csv_path is not None:
                self._append_csv(iteration, loads)
            if self.tb_writer is not None:
                self._write_tensorboard(iteration, loads)
        return alarms(loads, iteration)

    def _append_csv(self, iteration: int, loads: List[LayerLoad]) -> None:
        header = csv_header(loads[0].num_experts)
        if self._header is None:
            _prepare_csv(self.csv_path, header)
            self._header = header
        elif header != self._header:
            raise TelemetryError(f"{self.csv_path}: this logger wrote "
                                 f"{len(self._header) - len(FIXED_COLUMNS)} share columns, "
                                 f"now given {loads[0].num_experts} experts")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for load in loads:
            writer.writerow(_csv_row(iteration, load))
        with open(self.csv_path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def _write_tensorboard(self, iteration: int, loads: List[LayerLoad]) -> None:
        tb = self.tb_writer
        for load in loads:
            suffix = layer_tag(load.layer)
            for name in ("max_share", "min_share", "imbalance", "dead_experts", "bias_norm"):
                tb.add_scalar(f"expert_load/{name}/{suffix}", getattr(load, name), iteration)
            if self.histograms:
                tb.add_histogram(f"expert_load/shares/{suffix}", np.asarray(load.shares),
                                 iteration)
        tb.add_scalar("expert_load/max_share", max(l.max_share for l in loads), iteration)
        tb.add_scalar("expert_load/imbalance", max(l.imbalance for l in loads), iteration)
        tb.add_scalar("expert_load/dead_experts", sum(l.dead_experts for l in loads), iteration)
        tb.add_scalar("expert_load/collapsed_experts",
                      sum(len(l.collapsed_experts) for l in loads), iteration)


def layer_tag(layer: int) -> str:
    """`layer_07`: the per-layer TensorBoard tag suffix (two digits, so tags sort)."""
    return f"layer_{layer:02d}"


def csv_header(num_experts: int) -> List[str]:
    return list(FIXED_COLUMNS) + [f"share_{e}" for e in range(num_experts)]


def _check_same_width(loads: List[LayerLoad]) -> None:
    widths = {load.num_experts for load in loads}
    if len(widths) > 1:
        raise TelemetryError(f"ExpertLoadLogger.log: layers have different expert counts "
                             f"{sorted(widths)}")


def _fmt(value: float) -> str:
    if float(value).is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return format(value, _FLOAT_FORMAT)


def _csv_row(iteration: int, load: LayerLoad) -> List[str]:
    return [str(int(iteration)), str(load.layer), _fmt(load.tokens), _fmt(load.max_share),
            _fmt(load.min_share), _fmt(load.imbalance), str(load.dead_experts),
            ";".join(map(str, load.collapsed_experts)), _fmt(load.bias_norm),
            *(_fmt(s) for s in load.shares)]


def _prepare_csv(path: str, header: List[str]) -> None:
    """Create `path` with `header`, or check an existing file's header and cut a torn last line
    (a crash mid-write) so appended rows start on a line of their own."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            found = next(csv.reader(f), [])
        if found != header:
            raise TelemetryError(f"{path}: existing header differs from this run's "
                                 f"({_header_difference(found, header)}); log to a new file or "
                                 "move the old one away")
        _cut_torn_line(path)
        return
    with open(path, "w", newline="") as f:
        f.write(",".join(header) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _header_difference(found: List[str], expected: List[str]) -> str:
    found_shares = sum(c.startswith("share_") for c in found)
    experts = len(expected) - len(FIXED_COLUMNS)
    if found[:len(FIXED_COLUMNS)] == list(FIXED_COLUMNS) and found_shares != experts:
        return f"it has {found_shares} share columns, this run logs {experts} experts"
    for i, (a, b) in enumerate(zip(found, expected)):
        if a != b:
            return f"column {i + 1} is {a!r}, expected {b!r}"
    return f"it has {len(found)} columns, expected {len(expected)}"


def _cut_torn_line(path: str) -> None:
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        if cut < 0 and size > len(tail):
            raise TelemetryError(f"{path}: last line is over 64 KiB and unterminated")
        f.truncate(size - len(tail) + cut + 1)


# ------------------------------------------------------------------------------------ reader

class ExpertLoadRecords(NamedTuple):
    """The rows of an expert-load CSV, oldest first."""

    iterations: np.ndarray  # [n] int64
    layers: np.ndarray  # [n] int64
    shares: np.ndarray  # [n, E] float64
    rows: List[Dict[str, object]]  # the fixed columns, typed; collapsed_experts a list of ids
    path: str = ""

    @property
    def num_experts(self) -> int:
        return self.shares.shape[1]


_INT_COLUMNS = ("iteration", "layer", "dead_experts")


def read_expert_load_csv(path: str, keep_superseded: bool = False) -> ExpertLoadRecords:
    """Read a CSV written by `ExpertLoadLogger`.

    Rows of a resumed run that logs an iteration again (or an earlier one) supersede the rows
    of the abandoned run from that iteration on; `keep_superseded=True` returns every row.
    An unterminated last line (a write in progress) is skipped when it does not parse.
    """
    with open(path, newline="") as f:
        text = f.read()
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # "" when the file ends with a newline
    if not lines or not lines[0]:
        raise TelemetryError(f"{path}: empty file, expected the expert-load CSV header")
    header = next(csv.reader([lines[0]]))
    num_experts = _check_header(path, header)
    rows, shares = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if line.strip():
            row, row_shares = _parse_row(path, lineno, line, header, num_experts)
            rows.append(row)
            shares.append(row_shares)
    if torn.strip():
        try:
            row, row_shares = _parse_row(path, len(lines) + 1, torn, header, num_experts)
        except TelemetryError:
            pass
        else:
            rows.append(row)
            shares.append(row_shares)
    if not keep_superseded:
        keep = current_timeline([(r["iteration"], r["layer"]) for r in rows])
        rows, shares = [rows[i] for i in keep], [shares[i] for i in keep]
    return ExpertLoadRecords(
        iterations=np.array([r["iteration"] for r in rows], dtype=np.int64),
        layers=np.array([r["layer"] for r in rows], dtype=np.int64),
        shares=np.array(shares, dtype=np.float64).reshape(len(rows), num_experts),
        rows=rows, path=path,
    )


def _check_header(path: str, header: List[str]) -> int:
    fixed = header[:len(FIXED_COLUMNS)]
    num_experts = len(header) - len(FIXED_COLUMNS)
    if fixed != list(FIXED_COLUMNS) or num_experts < 1 or header != csv_header(num_experts):
        raise TelemetryError(f"{path}:1: not an expert-load CSV header; expected "
                             f"{','.join(FIXED_COLUMNS)},share_0,...,share_<E-1>")
    return num_experts


def _parse_row(path: str, lineno: int, line: str, header: List[str], num_experts: int):
    fields = next(csv.reader([line]))
    if len(fields) != len(header):
        raise TelemetryError(f"{path}:{lineno}: {len(fields)} fields, the header has "
                             f"{len(header)}")
    row: Dict[str, object] = {}
    for name, value in zip(FIXED_COLUMNS, fields):
        try:
            if name in _INT_COLUMNS:
                row[name] = int(value)
            elif name == "collapsed_experts":
                row[name] = [int(e) for e in value.split(";")] if value else []
            else:
                row[name] = float(value)
        except ValueError:
            raise TelemetryError(f"{path}:{lineno}: column {name!r}: cannot parse "
                                 f"{value!r}") from None
    try:
        shares = [float(v) for v in fields[len(FIXED_COLUMNS):]]
    except ValueError as err:
        raise TelemetryError(f"{path}:{lineno}: share columns: {err}") from None
    return row, shares


def current_timeline(keys: Sequence[tuple]) -> List[int]:
    """Indices of the rows that survive resumes: `keys` are (iteration, ...) tuples in file
    order; a key seen again, or an iteration below the previous row's, starts a new run that
    replaces every earlier row from that iteration on."""
    kept: List[int] = []
    seen = set()
    for i, key in enumerate(keys):
        if kept and (key in seen or key[0] < keys[kept[-1]][0]):
            dropped = [j for j in kept if keys[j][0] >= key[0]]
            seen.difference_update(keys[j] for j in dropped)
            kept = [j for j in kept if keys[j][0] < key[0]]
        kept.append(i)
        seen.add(key)
    return kept
