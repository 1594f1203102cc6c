"""Activation memory per layer kind as a function of the micro-batch shape, fitted online.

Every quantity that `measure.SavedBytes` records for a layer (`rest`, `attn_core`, `mlp`,
`core_in`, `mlp_in`, `input`) and the bytes outside the layers of a chunk (`outside`) is
modelled as

    bytes = a * tokens + c * score_elements

with tokens = b x s and score_elements = b x s^2 (only for `attn_core` with unfused attention;
flash / SDPA attention keeps nothing quadratic). The coefficients are non-negative and fitted by
least squares on relative error (every shape counts alike, short or long). Samples are the
per-shape maxima over layers of a kind and over ranks (an MoE layer's bytes depend on how many
tokens its experts receive, so the busiest layer and rank set the prediction). No intercept:
activations vanish with the tokens.

What a layer keeps in each recompute mode follows from the quantities (see `layer_bytes`), and
`errors()` reports leave-one-out relative errors, i.e. how well the model predicts a shape it
was not fitted on.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from .shapes import MicroBatchShape

LAYER_QUANTITIES = ("rest", "attn_core", "mlp", "core_in", "mlp_in", "input")
OUTSIDE = "outside"
ATTENTION_KINDS = ("unfused", "flash")


def _features(shape: MicroBatchShape, quadratic: bool) -> List[float]:
    row = [float(shape.tokens)]
    if quadratic:
        row.append(float(shape.micro_batch_size) * float(shape.seq_length) ** 2)
    return row


def _fit_nonnegative(rows: List[List[float]], targets: List[float]) -> List[float]:
    """Non-negative least squares on relative error (few features: try every support)."""
    if not rows:
        raise ValueError("no samples to fit")
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    weight = 1.0 / y.clamp(min=1.0)
    best, best_err = [0.0] * x.shape[1], float("inf")
    n = x.shape[1]
    for support in range(1, 2**n):
        cols = [j for j in range(n) if support >> j & 1]
        a = x[:, cols] * weight[:, None]
        coef = torch.linalg.lstsq(a, (y * weight)[:, None], driver="gelsd").solution[:, 0]
        if (coef < 0).any():
            continue
        full = [0.0] * n
        for j, c in zip(cols, coef.tolist()):
            full[j] = c
        err = float((((x @ torch.tensor(full, dtype=torch.float64)) - y) * weight).square().sum())
        if err < best_err - 1e-15:
            best, best_err = full, err
    return best


@dataclass
class ActivationMemoryModel:
    """Fitted activation bytes per (layer kind or chunk role, quantity); see module docstring."""

    attention: str = "unfused"
    # (kind, micro_batch_size, seq_length) -> {quantity: bytes}
    samples: Dict[Tuple[str, int, int], Dict[str, int]] = field(default_factory=dict)
    _coef: Dict[Tuple[str, str], List[float]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"unknown attention kind {self.attention!r}; expected one of {ATTENTION_KINDS}"
            )

    def _quadratic(self, quantity: str) -> bool:
        return quantity == "attn_core" and self.attention == "unfused"

    def add(self, kind: str, shape: MicroBatchShape, values: Dict[str, int]) -> None:
        """Record a measurement; a repeated (kind, shape) keeps the larger value."""
        key = (kind, shape.micro_batch_size, shape.seq_length)
        slot = self.samples.setdefault(key, {})
        for quantity, n in values.items():
            slot[quantity] = max(slot.get(quantity, 0), int(n))
        self._coef.clear()

    def merge(self, samples: Dict[Tuple[str, int, int], Dict[str, int]]) -> None:
        for (kind, b, s), values in samples.items():
            self.add(kind, MicroBatchShape(b, s), values)

    def kinds(self) -> List[str]:
        return sorted({kind for kind, _, _ in self.samples})

    def _points(self, kind: str, quantity: str):
        return [
            (MicroBatchShape(b, s), values[quantity])
            for (k, b, s), values in sorted(self.samples.items())
            if k == kind and quantity in values
        ]

    def _coefficients(self, kind: str, quantity: str) -> List[float]:
        key = (kind, quantity)
        if key not in self._coef:
            points = self._points(kind, quantity)
            if not points:
                raise KeyError(f"no measurement of {quantity!r} for {kind!r} layers yet")
            quadratic = self._quadratic(quantity)
            self._coef[key] = _fit_nonnegative(
                [_features(shape, quadratic) for shape, _ in points], [v for _, v in points]
            )
        return self._coef[key]

    def predict(self, kind: str, quantity: str, shape: MicroBatchShape) -> float:
        coef = self._coefficients(kind, quantity)
        return sum(c * f for c, f in zip(coef, _features(shape, self._quadratic(quantity))))

    def seq_lengths(self) -> List[int]:
        return sorted({s for _, _, s in self.samples})

    def covers(self, shape: MicroBatchShape, min_points: int) -> bool:
        """Whether `shape` is predicted rather than measured: it was measured, or at least
        `min_points` sequence lengths were and `shape` is not longer than the longest
        (interpolation only; a longer shape is measured first)."""
        lengths = self.seq_lengths()
        if not lengths:
            return False
        if any(s == shape.seq_length and b == shape.micro_batch_size for _, b, s in self.samples):
            return True
        return len(lengths) >= min_points and shape.seq_length <= lengths[-1]

    # -- what a layer keeps ---------------------------------------------------------------
    def layer_bytes(self, kind: str, mode: str, shape: MicroBatchShape) -> Tuple[float, float]:
        """(bytes a `kind` layer keeps until its backward in recompute `mode`, extra bytes its
        backward holds while recomputing)."""
        q = {name: self.predict(kind, name, shape) for name in LAYER_QUANTITIES}
        keep_all = q["rest"] + q["attn_core"] + q["mlp"]
        live = {
            "none": keep_all,
            "core_attn": q["rest"] + q["core_in"] + q["mlp"],
            "mlp": q["rest"] + q["attn_core"] + q["mlp_in"],
            "core_attn+mlp": q["rest"] + q["core_in"] + q["mlp_in"],
            "full": q["input"],
        }[mode]
        live = min(live, keep_all)
        return live, keep_all - live

    def outside_bytes(self, role: str, shape: MicroBatchShape) -> float:
        try:
            return self.predict(role, OUTSIDE, shape)
        except KeyError:
            return 0.0

    # -- reporting -------------------------------------------------------------------------
    def errors(self) -> Dict[str, float]:
        """Leave-one-out relative error (max over shapes) of each kind's bytes without
        recompute, where at least three shapes were measured; NaN otherwise."""
        out = {}
        for kind in self.kinds():
            quantities = ("rest", "attn_core", "mlp") if not kind.startswith("chunk") else (OUTSIDE,)
            keys = [k for k in sorted(self.samples) if k[0] == kind]
            if len({s for _, _, s in keys}) < 3:
                out[kind] = float("nan")
                continue
            worst = 0.0
            for held in keys:
                rest = ActivationMemoryModel(self.attention)
                rest.samples = {k: v for k, v in self.samples.items() if k != held}
                shape = MicroBatchShape(held[1], held[2])
                measured = sum(self.samples[held].get(q, 0) for q in quantities)
                predicted = sum(rest.predict(kind, q, shape) for q in quantities)
                worst = max(worst, abs(predicted - measured) / max(measured, 1))
            out[kind] = worst
        return out

    def describe(self) -> str:
        parts = []
        errors = self.errors()
        for kind in self.kinds():
            err = errors[kind]
            err_txt = "n/a (<3 shapes)" if err != err else f"{100 * err:.1f}%"
            parts.append(f"{kind}: {len(self._points_any(kind))} shapes, leave-one-out error {err_txt}")
        return "; ".join(parts)

    def _points_any(self, kind: str):
        return [k for k in self.samples if k[0] == kind]
