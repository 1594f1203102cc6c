"""`--dots-a2a-timing`: how long each MoE layer's expert all-to-all takes, and how long the
compute waited for it.

This module owns the measurement: timed wrappers on the stage methods of every `DotsMoELayer`
of a rank's model chunks (and, with the all-to-all overlap schedule on a GPU, probes on the
compute-stream nodes of each combined-1F1B layer plan), the clocks and the per-layer sums over a
log interval. `a2a_report.py` averages them over ranks and writes the CSV / TensorBoard /
log line; its `A2ATimingReport` is what the training loop holds.

What is timed: the MoE layers' training forward passes (recomputed forwards included: the run
spends that time). The backward pass (the reverse all-to-alls) and evaluation are not timed.

* dispatch = `MoELayer.dispatch` (the token dispatcher's `token_dispatch`: the all-to-all of the
  tokens and their routing probabilities); combine = `MoELayer.combine` (`token_combine`).
* MoE layer = the sum of the layer's stages, each timed on the stream it runs on: route,
  dispatch preprocessing, shared experts, dispatch, routed experts, combine, combine
  postprocessing. Without the overlap `MoELayer.forward` runs them back to back; with it the
  combined-1F1B nodes call them one at a time (the shared experts from
  `schedule/layer_plan.py`). The sum is the layer's work on whichever stream it ran, so
  dispatch + combine <= MoE layer by construction, and a2a share = (dispatch + combine) / MoE
  layer means the same with and without the overlap.
* exposed = the time the compute stream waited for the all-to-all; exposed share = exposed /
  MoE layer.
  - GPU with `--dots-a2a-overlap`: a compute-stream node of a layer plan starts by waiting on
    its micro-batch's event, which after a dispatch or combine node marks that all-to-all's end
    on the communication stream. The probe makes that wait itself, between two CUDA events
    recorded on the compute stream: the first completes when the compute stream's earlier work
    is done, the second when the all-to-all is also done, so the difference is the stall (about
    zero when the all-to-all finished behind other work). The wait for a combine falls in the
    next node of that micro-batch on the compute stream: the next layer's attention, the
    post-process node, or the model chunk's final wait.
  - GPU without the overlap: the all-to-all runs on the compute stream (NCCL's kernels joined
    back before the next op), so exposed = dispatch + combine.
  - CPU (gloo): collectives block the process, so the clock is `time.perf_counter` and exposed =
    dispatch + combine.
  CUDA events are recorded on the current stream and read back lazily (at the log interval,
  or without blocking once many are pending); nothing synchronises per operation.

"""

import functools
import time
from collections import deque
from typing import Dict, List, Optional, Sequence

import torch

from ..model.moe import dots_moe_layers

__all__ = ["A2ATiming", "CudaClock", "WallClock"]

DISPATCH, COMBINE, MOE, EXPOSED = range(4)
_MAX_PENDING = 4096  # CUDA spans held before the ones already complete are read back

# MoELayer / DotsMoELayer stage methods -> the column besides MOE their time counts in.
_STAGES = {
    "route": None, "preprocess": None, "shared_experts_compute": None,
    "compute_shared_experts": None, "dispatch": DISPATCH, "routed_experts_compute": None,
    "combine": COMBINE, "postprocess": None,
}


# ------------------------------------------------------------------------------------ clocks

class WallClock:
    """CPU clock: `time.perf_counter` (or `now`, for tests); marks are seconds."""

    lazy = False

    def __init__(self, now=time.perf_counter):
        self._now = now

    def mark(self, stream=None):
        return self._now()

    def ready(self, mark) -> bool:
        return True

    def elapsed_ms(self, start, end) -> float:
        return (end - start) * 1e3

    def release(self, *marks) -> None:
        pass


class CudaClock:
    """GPU clock: a timing CUDA event recorded on `stream` (default: the current stream);
    events are reused once read."""

    lazy = True

    def __init__(self):
        self._free: List[torch.cuda.Event] = []

    def mark(self, stream=None):
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def ready(self, mark) -> bool:
        return mark.query()

    def elapsed_ms(self, start, end) -> float:
        start.synchronize()
        end.synchronize()
        return start.elapsed_time(end)

    def release(self, *marks) -> None:
        self._free.extend(marks)


class _Sums:
    """Per-layer [dispatch, combine, moe, exposed] milliseconds and forward counts."""

    def __init__(self, clock):
        self.clock = clock
        self.ms: Dict[int, List[float]] = {}
        self.forwards: Dict[int, int] = {}
        self._pending = deque()  # (layer, columns, start mark, end mark), oldest first

    def add(self, layer: int, columns: Sequence[int], start, end) -> None:
        self._pending.append((layer, columns, start, end))
        if not self.clock.lazy or len(self._pending) > _MAX_PENDING:
            self._read(block=False)

    def count(self, layer: int) -> None:
        self.forwards[layer] = self.forwards.get(layer, 0) + 1

    def _read(self, block: bool) -> None:
        while self._pending:
            layer, columns, start, end = self._pending[0]
            if not block and not self.clock.ready(end):
                return
            self._pending.popleft()
            ms = self.clock.elapsed_ms(start, end)
            self.clock.release(start, end)
            row = self.ms.setdefault(layer, [0.0] * 4)
            for column in columns:
                row[column] += ms

    def take(self):
        """(ms, forwards) since the last call; resets."""
        self._read(block=True)
        taken = self.ms, self.forwards
        self.ms, self.forwards = {}, {}
        return taken


class _PendingWait:
    """The MoE layer whose all-to-all a micro-batch's next compute node waits for."""

    layer: Optional[int] = None

    def take(self) -> Optional[int]:
        layer, self.layer = self.layer, None
        return layer


# ------------------------------------------------------------------------------- probes

def _capturing() -> bool:
    """A CUDA graph is being captured (no timing events then)."""
    return torch.cuda.is_current_stream_capturing()


class A2ATiming:
    """The probes on this rank's model chunks (see the module docstring); `take()` returns the
    sums since the last call. `clock` defaults to CUDA events on a GPU, else the wall clock;
    `probe_waits` (default: the overlap schedule on a GPU) measures exposed time at the
    schedule's stream waits instead of as dispatch + combine."""

    def __init__(self, chunks, clock=None, probe_waits: Optional[bool] = None):
        cuda = torch.cuda.is_available()
        self.clock = clock if clock is not None else (CudaClock() if cuda else WallClock())
        self.layers = dots_moe_layers(chunks)
        overlap = any(getattr(m.config, "overlap_moe_expert_parallel_comm", False)
                      for m in self.layers)
        self.probe_waits = bool(overlap and cuda) if probe_waits is None else probe_waits
        self._sums = _Sums(self.clock)
        self._numbers = {id(m): int(m.router.layer_number) for m in self.layers}
        self._undo = []
        for moe in self.layers:
            self._wrap_stages(moe)
        if self.probe_waits:
            for chunk in chunks:
                self._wrap_plan_builder(_gpt_model(chunk))

    def take(self):
        """({layer: [dispatch, combine, moe, exposed] ms}, {layer: forwards}) of this rank."""
        return self._sums.take()

    @property
    def layer_numbers(self) -> List[int]:
        return sorted(set(self._numbers.values()))

    def remove(self) -> None:
        """Take the probes off again."""
        while self._undo:
            self._undo.pop()()

    def _set(self, obj, name: str, value) -> None:
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already replaced (a second "
                               "A2ATiming on the same model?)")
        setattr(obj, name, value)  # an instance attribute; nn.Module keeps it in __dict__
        self._undo.append(lambda: vars(obj).pop(name, None))

    def _wrap_stages(self, moe) -> None:
        layer = self._numbers[id(moe)]
        for name, column in _STAGES.items():
            if not hasattr(moe, name):
                continue
            columns = (MOE,)
            if column is not None:
                columns = (column, MOE) if self.probe_waits else (column, MOE, EXPOSED)
            self._set(moe, name, self._timed(moe, layer, columns, getattr(moe, name),
                                             count=name == "dispatch"))

    def _timed(self, moe, layer: int, columns, method, count: bool):
        sums, clock, cuda = self._sums, self.clock, torch.cuda.is_available()

        @functools.wraps(method)
        def timed(*args, **kwargs):
            if not moe.training or (cuda and _capturing()):
                return method(*args, **kwargs)
            start = clock.mark()
            out = method(*args, **kwargs)
            sums.add(layer, columns, start, clock.mark())
            if count:
                sums.count(layer)
            return out

        return timed

    # The overlap schedule (GPU): stream-wait probes on every layer plan built for training.

    def _wrap_plan_builder(self, model) -> None:
        build = model.build_schedule_plan

        def build_and_probe(*args, **kwargs):
            plan = build(*args, **kwargs)
            if model.training:
                self.probe_plan(plan)
            return plan

        self._set(model, "build_schedule_plan", build_and_probe)

    def probe_plan(self, plan) -> None:
        """Probe one model-chunk schedule plan (one micro-batch; built for one run)."""
        waits = _PendingWait()
        for i in range(plan.num_layers()):
            layer_plan = plan.get_layer(i)
            number = self._numbers.get(id(getattr(layer_plan.layer, "mlp", None)))
            if number is not None:
                for name in ("moe_dispatch", "moe_combine"):
                    self._after_comm(getattr(layer_plan, name), waits, number)
            seen = set()
            for name in ("attn", "pre_dispatch_computation", "mlp", "mtp_post_process"):
                node = getattr(layer_plan, name, None)
                if hasattr(node, "stream") and id(node) not in seen:
                    seen.add(id(node))
                    self._before_compute(node, waits)
        if getattr(plan, "post_process", None) is not None:
            self._before_compute(plan.post_process, waits)
        wait_current_stream = plan.wait_current_stream

        def probed_wait():
            stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
            if waits.layer is not None and stream is not None and stream == _compute_stream():
                self._stall(stream, plan.event, waits.take())
            wait_current_stream()

        plan.wait_current_stream = probed_wait

    def _after_comm(self, node, waits: _PendingWait, layer: int) -> None:
        forward = node.forward

        def forward_then_pending(inputs=()):
            out = forward(inputs)
            waits.layer = layer
            return out

        node.forward = forward_then_pending

    def _before_compute(self, node, waits: _PendingWait) -> None:
        forward = node.forward

        def stall_then_forward(inputs=()):
            if waits.layer is not None:
                self._stall(node.stream, node.event, waits.take())
            return forward(inputs)

        node.forward = stall_then_forward

    def _stall(self, stream, event, layer: int) -> None:
        """Make `stream` wait for `event` between two marks; the gap is exposed time."""
        start = self.clock.mark(stream)
        event.wait(stream)
        self._sums.add(layer, (EXPOSED,), start, self.clock.mark(stream))


def _gpt_model(chunk):
    """The module whose `build_schedule_plan` the combined 1F1B calls (under DDP etc.)."""
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(chunk, "build_schedule_plan", return_model_obj=True)


def _compute_stream():
    from megatron.core.pipeline_parallel.utils import get_comp_stream

    return get_comp_stream()
