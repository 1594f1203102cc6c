"""Choosing, per micro-batch, which layers recompute (and how much) to fit a memory budget.

The planner sees one training step: the shapes of its micro-batches and the order in which this
pipeline rank runs their forwards and backwards (`schedule_order`). Each (micro-batch, chunk)
keeps its predicted activations (`memory_model`) from its forward to its backward; the step's
peak is the largest sum of those alive at once, plus the recomputation its backward holds.

Per (micro-batch, chunk) the planner finds the cheapest set of layer modes (`layer.MODES`) that
keeps the activations under an allowance `L`: starting from no recompute it takes, one at a
time, the mode change that frees the most bytes per recomputed FLOP, then gives back, dearest
layer first, recompute that the allowance does not need. For the step it finds the
largest common `L` (bisection) whose simulated peak fits the budget: micro-batches already
under `L` recompute nothing, so short micro-batches pay nothing and long ones pay only what the
budget demands. Plans are cached by shape bucket (per (chunk, bucket, L)) and per step by its
tuple of buckets. Everything here is a pure function of shapes and fitted predictions, so ranks
that must agree (tensor- and expert-parallel peers) compute the same plan.

`allowed_modes` restricts the modes per layer kind: under the all-to-all overlap schedule only
`layer.NODE_PATH_MODES` can apply (MoE layers: ``none`` / ``core_attn``; dense layers: no
``full``).
"""

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from .layer import MODES
from .memory_model import ActivationMemoryModel
from .schedule_order import Event
from .shapes import MicroBatchShape


@dataclass(frozen=True)
class ChunkLayout:
    """What the planner needs of a model chunk: its layer kinds and its role."""

    layer_kinds: Tuple[str, ...]  # "dense" or "moe", in order
    role: str  # memory-model kind of the bytes outside the layers, e.g. "chunk:pre+post"


@dataclass(frozen=True)
class RecomputeCosts:
    """Forward FLOPs per rank of the parts a recompute mode repeats (from the model sizes)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    moe_ffn: int
    shared_ffn: int
    experts: int
    topk: int
    tp: int = 1

    @classmethod
    def from_config(cls, config) -> "RecomputeCosts":
        return cls(
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_query_groups or config.num_attention_heads,
            head_dim=config.kv_channels,
            ffn=config.ffn_hidden_size,
            moe_ffn=config.moe_ffn_hidden_size or 0,
            shared_ffn=config.moe_shared_expert_intermediate_size or 0,
            experts=config.num_moe_experts or 0,
            topk=config.moe_router_topk or 0,
            tp=config.tensor_model_parallel_size,
        )

    def attn_core(self, shape: MicroBatchShape) -> float:
        return 4.0 * shape.micro_batch_size * shape.seq_length**2 * self.head_dim * self.heads / self.tp

    def attn_linear(self, shape: MicroBatchShape) -> float:
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return 2.0 * shape.tokens * self.hidden * (qkv + self.heads * self.head_dim) / self.tp

    def mlp(self, kind: str, shape: MicroBatchShape) -> float:
        t, h = shape.tokens, self.hidden
        if kind == "dense":
            return 6.0 * t * h * self.ffn / self.tp
        experts = 6.0 * t * self.topk * h * self.moe_ffn / self.tp
        return 2.0 * t * h * self.experts + experts + 6.0 * t * h * self.shared_ffn / self.tp

    def mode(self, kind: str, mode: str, shape: MicroBatchShape) -> float:
        core = self.attn_core(shape) if mode in ("core_attn", "core_attn+mlp", "full") else 0.0
        mlp = self.mlp(kind, shape) if mode in ("mlp", "core_attn+mlp", "full") else 0.0
        rest = self.attn_linear(shape) if mode == "full" else 0.0
        return core + mlp + rest


@dataclass(frozen=True)
class ItemPlan:
    """Modes of one chunk's layers for one micro-batch, and their predicted effect."""

    modes: Tuple[str, ...]
    live_bytes: float  # kept from forward to backward
    transient_bytes: float  # extra while the backward recomputes
    recompute_flops: float


@dataclass(frozen=True)
class StepPlan:
    """Per micro-batch, per chunk plans of a step; `calibrate` marks a measuring step."""

    items: Tuple[Tuple[ItemPlan, ...], ...]  # [micro-batch][chunk]
    predicted_peak: float
    allowance: float
    calibrate: bool = False
    fits: bool = True

    def modes(self, microbatch: int, chunk: int) -> Tuple[str, ...]:
        return self.items[microbatch][chunk].modes

    @property
    def recompute_flops(self) -> float:
        return sum(item.recompute_flops for row in self.items for item in row)


_UNBOUNDED = float(1 << 80)
_LOG_STEP = math.log1p(1e-3)


def simulate_peak(events: Sequence[Event], items) -> float:
    """Peak of live activations (+ a backward's recompute) over the step's events."""
    live = peak = 0.0
    for kind, mb, chunk in events:
        item = items[mb][chunk]
        if kind == "F":
            live += item.live_bytes
            peak = max(peak, live)
        else:
            peak = max(peak, live + item.transient_bytes)
            live -= item.live_bytes
    return peak


class RecomputePlanner:
    """See the module docstring. `budget` is the bytes allowed for activations."""

    def __init__(
        self,
        model: ActivationMemoryModel,
        costs: RecomputeCosts,
        chunks: Sequence[ChunkLayout],
        budget: float,
        margin: float = 0.05,
        cache_size: int = 4096,
        allowed_modes: Optional[Mapping[str, Sequence[str]]] = None,
    ):
        if budget <= 0:
            raise ValueError(f"activation budget must be positive, got {budget:.0f} bytes")
        self.allowed_modes = self._check_allowed(allowed_modes)
        self.model = model
        self.costs = costs
        self.chunks = tuple(chunks)
        self.budget = float(budget)
        self.margin = float(margin)
        self._step_cache: "OrderedDict[tuple, StepPlan]" = OrderedDict()
        self._cache_size = cache_size
        self._items_cache: Dict[tuple, ItemPlan] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def reset(self) -> None:
        """Forget cached plans (after the memory model changed)."""
        self._step_cache.clear()
        self._items_cache.clear()

    @staticmethod
    def _check_allowed(allowed):
        if allowed is None:
            return None
        out = {}
        for kind, modes in allowed.items():
            modes = tuple(m for m in MODES if m in modes)  # MODES order, known modes only
            unknown = set(allowed[kind]) - set(MODES)
            if unknown or "none" not in modes:
                raise ValueError(f"allowed recompute modes of {kind!r} layers must include "
                                 f"'none' and come from {MODES}, got {tuple(allowed[kind])}")
            out[kind] = modes
        return out

    def restrict(self, allowed_modes: Optional[Mapping[str, Sequence[str]]]) -> None:
        """Plan only with these modes per layer kind from now on (None: every mode)."""
        allowed = self._check_allowed(allowed_modes)
        if allowed != self.allowed_modes:
            self.allowed_modes = allowed
            self.reset()

    def modes_for(self, kind: str) -> Tuple[str, ...]:
        """The modes the planner may choose for a `kind` layer."""
        if self.allowed_modes is None:
            return MODES
        return self.allowed_modes.get(kind, ("none",))

    # -- one (micro-batch, chunk) ------------------------------------------------------------
    def item(self, chunk: int, shape: MicroBatchShape, allowance: float) -> ItemPlan:
        """Cheapest modes for `chunk` keeping at most `allowance` bytes (or all it can)."""
        # Allowances are rounded down to 0.1% steps (log scale), so nearby ones share a plan.
        step = -1 if allowance < 1.0 else int(math.log(allowance) / _LOG_STEP)
        key = (chunk, shape, step)
        plan = self._items_cache.get(key)
        if plan is None:
            if len(self._items_cache) >= 1 << 16:
                self._items_cache.clear()
            rounded = 0.0 if step < 0 else math.exp(step * _LOG_STEP)
            plan = self._items_cache[key] = self._item(chunk, shape, rounded)
        return plan

    def _item(self, chunk: int, shape: MicroBatchShape, allowance: float) -> ItemPlan:
        layout = self.chunks[chunk]
        scale = 1.0 + self.margin
        table = []  # per layer: {mode: (live, transient, flops)}
        for kind in layout.layer_kinds:
            options = {}
            for mode in self.modes_for(kind):
                live, transient = self.model.layer_bytes(kind, mode, shape)
                options[mode] = (live * scale, transient * scale, self.costs.mode(kind, mode, shape))
            table.append(options)
        modes = ["none"] * len(table)
        outside = self.model.outside_bytes(layout.role, shape) * scale
        live = outside + sum(options["none"][0] for options in table)
        while live > allowance:
            best = None
            for i, options in enumerate(table):
                cur = options[modes[i]]
                for mode, (l, _, f) in options.items():
                    freed = cur[0] - l
                    if freed <= 0:
                        continue
                    ratio = freed / max(f - cur[2], 1.0)
                    if best is None or ratio > best[0]:
                        best = (ratio, i, mode, freed)
            if best is None:
                break  # everything already recomputes as much as it can
            _, i, mode, freed = best
            modes[i] = mode
            live -= freed
        # The greedy steps can overshoot: give back recompute the allowance does not need,
        # dearest layers first, each to its cheapest mode that still fits.
        for i in sorted(range(len(table)), key=lambda i: -table[i][modes[i]][2]):
            cur = table[i][modes[i]]
            for mode, (l, _, f) in sorted(table[i].items(), key=lambda kv: kv[1][2]):
                if f < cur[2] and live - cur[0] + l <= allowance:
                    live += l - cur[0]
                    modes[i] = mode
                    break
        picked = [table[i][m] for i, m in enumerate(modes)]
        return ItemPlan(
            modes=tuple(modes),
            live_bytes=live,
            transient_bytes=max([p[1] for p in picked] + [0.0]),
            recompute_flops=sum(p[2] for p in picked),
        )

    # -- a step -----------------------------------------------------------------------------
    def plan_step(self, shapes: Sequence[MicroBatchShape], events: Sequence[Event]) -> StepPlan:
        """The step's plan for these (bucketed) micro-batch shapes in this event order."""
        key = (tuple(shapes), tuple(events))
        cached = self._step_cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            self._step_cache.move_to_end(key)
            return cached
        self.cache_misses += 1
        plan = self._plan_step(shapes, events)
        self._step_cache[key] = plan
        if len(self._step_cache) > self._cache_size:
            self._step_cache.popitem(last=False)
        return plan

    def _items(self, shapes, allowance):
        return tuple(
            tuple(self.item(c, shape, allowance) for c in range(len(self.chunks)))
            for shape in shapes
        )

    def _plan_step(self, shapes, events) -> StepPlan:
        items = self._items(shapes, _UNBOUNDED)
        peak = simulate_peak(events, items)
        if peak <= self.budget:
            return StepPlan(items, peak, _UNBOUNDED)
        hi = max(item.live_bytes for row in items for item in row)
        lo_items = self._items(shapes, 0.0)
        lo_peak = simulate_peak(events, lo_items)
        if lo_peak > self.budget:
            return StepPlan(lo_items, lo_peak, 0.0, fits=False)
        lo, best = 0.0, (lo_items, lo_peak, 0.0)
        for _ in range(24):
            mid = (lo + hi) / 2
            items = self._items(shapes, mid)
            peak = simulate_peak(events, items)
            if peak <= self.budget:
                lo, best = mid, (items, peak, mid)
            else:
                hi = mid
            if hi - lo <= 1e-3 * hi:
                break
        return StepPlan(best[0], best[1], best[2])

    def calibration_step(self, shapes: Sequence[MicroBatchShape]) -> StepPlan:
        """Every layer recomputes fully (the least memory) while the model measures."""
        item = lambda c: ItemPlan(("full",) * len(self.chunks[c].layer_kinds), 0.0, 0.0, 0.0)
        items = tuple(tuple(item(c) for c in range(len(self.chunks))) for _ in shapes)
        return StepPlan(items, float("nan"), 0.0, calibrate=True)
