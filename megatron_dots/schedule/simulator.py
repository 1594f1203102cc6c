"""Step-time simulator for pipeline schedules of a dots MoE model, with and without
all-to-all / compute overlap.

Every pipeline rank has two in-order streams, ``compute`` and ``comm`` (the expert-parallel
all-to-all), like a GPU's compute and communication CUDA streams: an op starts when its stream
is free and its inputs are done. Each rank runs its forward (F) and backward (B) passes of
(micro-batch, model chunk) in the order of Megatron-Core's schedule
(`recompute.schedule_order.schedule_events`):

* ``1f1b``: PP ranks, one chunk each; ``interleaved``: VPP chunks per rank; the all-to-all
  blocks compute (dispatch, then experts, then combine), shared experts run after the routed
  experts as in Megatron-Core without ``moe_shared_expert_overlap``;
* ``overlap`` (ours, `--dots-a2a-overlap`): interleaved 1F1B with one extra warmup micro-batch
  (plain 1F1B order when PP = 1); in the steady state the forward of micro-batch k + w and the
  backward of micro-batch k are issued together layer by layer (Megatron-Core's combined 1F1B
  order), so one's all-to-all runs on the comm stream while the other computes; shared experts
  run while the dispatch is in flight; with ``delay_wgrad`` the routed experts' weight gradient
  runs after the backward dispatch is issued, filling its wait.

A pass of one chunk is ``layers`` dots MoE layers. Forward of a layer: attention, dispatch
(a2a), routed experts, combine (a2a), shared experts. Backward: the reverse, the routed experts
split into dgrad and wgrad. A stage's forward waits for the previous stage's forward of the same
micro-batch plus ``p2p``; a backward for the next stage's backward (plus ``p2p``) and its own
forward. All times are per layer and micro-batch, in milliseconds (`OpTimes`).

Reported (`SimResult`): step time (last op end over all ranks), per-rank compute busy time and
bubble (idle share of the step on the compute stream), and exposed all-to-all time (comm
stream busy while the compute stream idles), also as a share of MoE-layer time.
"""

import bisect
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ..recompute.schedule_order import schedule_events

SCHEDULES = ("1f1b", "interleaved", "overlap")
COMPUTE, COMM = "compute", "comm"


@dataclass
class OpTimes:
    """Milliseconds per layer per micro-batch. Backward defaults: attention and shared experts
    2x forward, routed-expert dgrad and wgrad 1x forward each, all-to-all as in forward."""

    attention: float = 1.0
    dispatch: float = 0.5
    experts: float = 1.0
    combine: float = 0.5
    shared: float = 0.25
    attention_bwd: Optional[float] = None
    experts_dgrad: Optional[float] = None
    experts_wgrad: Optional[float] = None
    shared_bwd: Optional[float] = None
    p2p: float = 0.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value is not None and value < 0:
                raise ValueError(f"OpTimes.{name} must be >= 0, got {value}")
        if self.attention_bwd is None:
            self.attention_bwd = 2 * self.attention
        if self.experts_dgrad is None:
            self.experts_dgrad = self.experts
        if self.experts_wgrad is None:
            self.experts_wgrad = self.experts
        if self.shared_bwd is None:
            self.shared_bwd = 2 * self.shared

    def layer_compute(self) -> float:
        """Forward + backward compute of one layer for one micro-batch."""
        return (self.attention + self.experts + self.shared + self.attention_bwd
                + self.experts_dgrad + self.experts_wgrad + self.shared_bwd)

    def layer_a2a(self) -> float:
        """Forward + backward all-to-all of one layer for one micro-batch."""
        return 2 * (self.dispatch + self.combine)


@dataclass
class Op:
    rank: int
    stream: str
    name: str  # attention, dispatch, experts, combine, shared, ..._bwd, experts_wgrad
    kind: str  # F or B
    micro_batch: int
    chunk: int
    layer: int
    start: float = 0.0
    end: float = 0.0


@dataclass
class SimResult:
    schedule: str
    step_ms: float
    compute_ms: List[float]
    bubble: List[float]
    exposed_a2a_ms: List[float]
    a2a_ms: List[float]
    moe_layer_ms: float  # compute + a2a of all layers and micro-batches of one rank
    ops: List[Op] = field(default_factory=list, repr=False)

    @property
    def exposed_share(self) -> float:
        """Mean exposed all-to-all as a share of a rank's MoE-layer time (compute + a2a)."""
        return sum(self.exposed_a2a_ms) / len(self.exposed_a2a_ms) / self.moe_layer_ms

    def summary(self) -> Dict[str, float]:
        ranks = len(self.bubble)
        return {"schedule": self.schedule, "step_ms": self.step_ms,
                "bubble": sum(self.bubble) / ranks,
                "exposed_a2a_ms": sum(self.exposed_a2a_ms) / ranks,
                "exposed_a2a_share_of_moe_layer": self.exposed_share}


# ------------------------------------------------------------------ per-pass op chains
def _forward_ops(times: OpTimes, overlap: bool) -> List[Tuple[str, str, float, Tuple[int, ...]]]:
    """One layer's forward as (stream, name, ms, indices of the ops it waits for)."""
    ops = [(COMPUTE, "attention", times.attention, ()),
           (COMM, "dispatch", times.dispatch, (0,))]
    if overlap:  # shared experts only need the attention output: run them during dispatch
        ops += [(COMPUTE, "shared", times.shared, (0,)),
                (COMPUTE, "experts", times.experts, (1,)),
                (COMM, "combine", times.combine, (3,))]
    else:
        ops += [(COMPUTE, "experts", times.experts, (1,)),
                (COMM, "combine", times.combine, (2,)),
                (COMPUTE, "shared", times.shared, (3,))]
    return ops


def _backward_ops(times: OpTimes, overlap: bool,
                  delay_wgrad: bool) -> List[Tuple[str, str, float, Tuple[int, ...]]]:
    """One layer's backward as (stream, name, ms, indices of the ops it waits for)."""
    ops = [(COMM, "combine_bwd", times.combine, ()),
           (COMPUTE, "experts_dgrad", times.experts_dgrad, (0,))]
    if delay_wgrad:  # dispatch's backward starts after dgrad; wgrad fills its wait
        ops += [(COMM, "dispatch_bwd", times.dispatch, (1,)),
                (COMPUTE, "experts_wgrad", times.experts_wgrad, (1,))]
    else:
        ops += [(COMPUTE, "experts_wgrad", times.experts_wgrad, (1,)),
                (COMM, "dispatch_bwd", times.dispatch, (2,))]
    dispatch_bwd = 2 if delay_wgrad else 3
    if overlap:  # the shared experts' backward does not wait for the all-to-all
        ops += [(COMPUTE, "shared_bwd", times.shared_bwd, ()),
                (COMPUTE, "attention_bwd", times.attention_bwd, (dispatch_bwd, 4))]
    else:
        ops += [(COMPUTE, "shared_bwd", times.shared_bwd, (dispatch_bwd,)),
                (COMPUTE, "attention_bwd", times.attention_bwd, (4,))]
    return ops


class _Rank:
    """Two in-order streams of one pipeline rank."""

    def __init__(self, rank: int):
        self.rank = rank
        self.free = {COMPUTE: 0.0, COMM: 0.0}
        self.ops: List[Op] = []

    def issue(self, op: Op, duration: float, ready: float) -> Op:
        op.start = max(self.free[op.stream], ready)
        op.end = op.start + duration
        self.free[op.stream] = op.end
        self.ops.append(op)
        return op


def _layer_chain(spec, kind, mb, chunk, layer, rank):
    return [(Op(rank, stream, name, kind, mb, chunk, layer), ms, deps)
            for stream, name, ms, deps in spec]


def _run_pass(rank: _Rank, kind: str, mb: int, chunk: int, layers: int, spec, ready: float):
    """Issue one pass (all layers of a chunk) on its own; returns its last op's end."""
    end = ready
    for layer in range(layers):
        chain = _layer_chain(spec, kind, mb, chunk,
                             layer if kind == "F" else layers - 1 - layer, rank.rank)
        done: List[float] = []
        for op, ms, deps in chain:
            start_after = max([end] + [done[d] for d in deps]) if deps else end
            done.append(rank.issue(op, ms, start_after).end)
        end = max(done)
    return end


def _pair_order(b_spec) -> List[Tuple[str, str]]:
    """The issue order of one layer's forward (F) and backward (B) ops in a combined-1F1B
    pair: Megatron-Core's `TransformerLayerSchedulePlan.run` with the dots changes
    (`schedule/layer_plan.py`: shared experts after the dispatch is issued, delayed expert wgrad
    after the dispatch backward is)."""
    delayed = [name for _, name, _, _ in b_spec].index("experts_wgrad") > 2
    order = [("B", "combine_bwd"), ("F", "attention"), ("B", "experts_dgrad")]
    if not delayed:  # computed together with the dgrad
        order.append(("B", "experts_wgrad"))
    order += [("F", "dispatch"), ("F", "shared"), ("B", "dispatch_bwd")]
    if delayed:
        order.append(("B", "experts_wgrad"))
    return order + [("B", "shared_bwd"), ("F", "experts"), ("F", "combine"),
                    ("B", "attention_bwd")]


def _run_pair(rank: _Rank, f, b, layers: int, f_spec, b_spec, f_ready: float, b_ready: float):
    """Issue a forward pass and a backward pass together, layer by layer (combined 1F1B):
    the forward's layer l next to the backward's layer L-1-l (backward runs the layers in
    reverse), interleaving their ops (`_pair_order`)
    so each one's all-to-all can run under the other's compute. Returns (forward end,
    backward end)."""
    f_end, b_end = f_ready, b_ready
    f_index = {name: i for i, (_, name, _, _) in enumerate(f_spec)}
    b_index = {name: i for i, (_, name, _, _) in enumerate(b_spec)}
    order = [(which, (f_index if which == "F" else b_index)[name])
             for which, name in _pair_order(b_spec)]
    for layer in range(layers):
        f_chain = _layer_chain(f_spec, "F", f[0], f[1], layer, rank.rank)
        b_chain = _layer_chain(b_spec, "B", b[0], b[1], layers - 1 - layer, rank.rank)
        f_done: Dict[int, float] = {}
        b_done: Dict[int, float] = {}
        for which, i in order:
            chain, done, base = ((f_chain, f_done, f_end) if which == "F"
                                 else (b_chain, b_done, b_end))
            op, ms, deps = chain[i]
            ready = max([base] + [done[d] for d in deps])
            done[i] = rank.issue(op, ms, ready).end
        f_end, b_end = max(f_done.values()), max(b_done.values())
    return f_end, b_end


# ------------------------------------------------------------------------- simulation
def simulate(schedule: str, times: OpTimes, pp: int = 1, vpp: Optional[int] = None,
             ep: int = 8, micro_batches: int = 8, layers_per_chunk: int = 1,
             delay_wgrad: bool = True) -> SimResult:
    """Simulate one training step; see the module docstring."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    vpp = vpp or 1
    if schedule == "1f1b" and vpp != 1:
        raise ValueError("1f1b has one model chunk per rank: use vpp=1 (or 'interleaved')")
    if schedule == "interleaved" and (pp < 2 or vpp < 2):
        raise ValueError("interleaved 1F1B needs pp >= 2 and vpp >= 2")
    if vpp > 1 and micro_batches % pp:
        raise ValueError(f"interleaved schedules need micro_batches ({micro_batches}) "
                         f"divisible by pp ({pp})")
    if pp < 1 or ep < 1 or micro_batches < 1 or layers_per_chunk < 1:
        raise ValueError("pp, ep, micro_batches and layers_per_chunk must be >= 1")
    if ep == 1:  # no expert parallelism: no all-to-all
        times = OpTimes(**{**asdict(times), "dispatch": 0.0, "combine": 0.0})
    overlap = schedule == "overlap"
    f_spec = _forward_ops(times, overlap)
    b_spec = _backward_ops(times, overlap, delay_wgrad and overlap)
    extra = 1 if overlap and (pp > 1 or vpp > 1 or micro_batches > 1) else 0
    orders = [_rank_order(micro_batches, pp, r, vpp, extra, overlap) for r in range(pp)]
    ranks = [_Rank(r) for r in range(pp)]
    f_done: Dict[Tuple[int, int], float] = {}  # (micro-batch, global stage) -> end
    b_done: Dict[Tuple[int, int], float] = {}
    cursor = [0] * pp
    stages = pp * vpp
    while any(cursor[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while cursor[r] < len(orders[r]):
                item = orders[r][cursor[r]]
                ready = [_ready(ev, r, pp, stages, f_done, b_done, times.p2p) for ev in item]
                if any(x is None for x in ready):
                    break
                stage = [ev[2] * pp + r for ev in item]
                if len(item) == 2:
                    (_, fmb, fch), (_, bmb, bch) = item
                    fe, be = _run_pair(ranks[r], (fmb, fch), (bmb, bch), layers_per_chunk,
                                       f_spec, b_spec, ready[0], ready[1])
                    f_done[(fmb, stage[0])] = fe
                    b_done[(bmb, stage[1])] = be
                else:
                    (kind, mb, chunk), = item
                    spec = f_spec if kind == "F" else b_spec
                    end = _run_pass(ranks[r], kind, mb, chunk, layers_per_chunk, spec, ready[0])
                    (f_done if kind == "F" else b_done)[(mb, stage[0])] = end
                cursor[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule} deadlocked (pp={pp}, vpp={vpp}, "
                               f"micro_batches={micro_batches})")
    return _result(schedule, ranks, times, vpp * layers_per_chunk * micro_batches)


def _rank_order(micro_batches, pp, rank, vpp, extra, overlap):
    """This rank's passes in issue order; with overlap, steady-state F/B pairs (an F right
    before a B of another micro-batch: warmup is all forwards, cooldown all backwards) are
    merged."""
    events = schedule_events(micro_batches, pp, rank, vpp if vpp > 1 else None,
                             extra_warmup=extra if vpp > 1 else 0)
    if vpp == 1 and extra:  # plain 1F1B order with one more warmup forward
        events = _one_more_warmup(events)
    warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp + extra
    if not overlap or (vpp > 1 and warmup >= vpp * micro_batches):
        # Without a steady state (every forward of this rank is warmup) Megatron-Core's
        # combined 1F1B pairs nothing.
        return [(ev,) for ev in events]
    items, i = [], 0
    while i < len(events):
        if (i + 1 < len(events) and events[i][0] == "F" and events[i + 1][0] == "B"
                and events[i][1] != events[i + 1][1]):
            items.append((events[i], events[i + 1]))
            i += 2
        else:
            items.append((events[i],))
            i += 1
    return items


def _one_more_warmup(events):
    """Plain 1F1B order (w warmup forwards, then F(w+k) B(k) pairs) with w + 1 warmup
    forwards: F(w+1+k) then B(k), as Megatron-Core's combined 1F1B (PP=1: F0, then F(k+1)
    with B(k), then the last backward alone)."""
    forwards = [e for e in events if e[0] == "F"]
    backwards = [e for e in events if e[0] == "B"]
    leading = 0  # the w warmup forwards and the first steady-state one
    while leading < len(events) and events[leading][0] == "F":
        leading += 1
    warmup = min(leading, len(forwards))
    order = forwards[:warmup]
    for k in range(len(forwards) - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[len(forwards) - warmup:]


def _ready(event, rank, pp, stages, f_done, b_done, p2p) -> Optional[float]:
    """When `event`'s inputs are there (None: not yet computed)."""
    kind, mb, chunk = event
    stage = chunk * pp + rank
    if kind == "F":
        if stage == 0:
            return 0.0
        prev = f_done.get((mb, stage - 1))
        return None if prev is None else prev + (p2p if pp > 1 else 0.0)
    own = f_done.get((mb, stage))
    if own is None:
        return None
    if stage == stages - 1:
        return own
    nxt = b_done.get((mb, stage + 1))
    return None if nxt is None else max(own, nxt + (p2p if pp > 1 else 0.0))


def _result(schedule, ranks, times, layer_passes) -> SimResult:
    step = max(op.end for rank in ranks for op in rank.ops)
    compute, bubble, exposed, a2a = [], [], [], []
    for rank in ranks:
        busy = [(op.start, op.end) for op in rank.ops if op.stream == COMPUTE]
        comm = [(op.start, op.end) for op in rank.ops if op.stream == COMM]
        c = sum(e - s for s, e in busy)
        compute.append(c)
        bubble.append(1.0 - c / step if step else 0.0)
        a2a.append(sum(e - s for s, e in comm))
        exposed.append(_uncovered(comm, busy))
    moe_layer = layer_passes * (times.layer_compute() + times.layer_a2a())
    return SimResult(schedule, step, compute, bubble, exposed, a2a, moe_layer,
                     [op for rank in ranks for op in rank.ops])


def _uncovered(intervals, cover) -> float:
    """Total length of `intervals` not overlapped by any interval of `cover`."""
    merged = []
    for s, e in sorted(cover):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    starts = [s for s, _ in merged]
    total = 0.0
    for s, e in intervals:
        length = e - s
        # merged intervals are disjoint and sorted: only those from the last one starting
        # at or before s up to the last one starting before e can overlap [s, e)
        i = max(bisect.bisect_right(starts, s) - 1, 0)
        while i < len(merged) and merged[i][0] < e:
            cs, ce = merged[i]
            if ce > s:
                length -= min(e, ce) - max(s, cs)
            i += 1
        total += max(length, 0.0)
    return total
