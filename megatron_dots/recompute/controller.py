"""`RecomputeController`: the planner applied to a training step, measuring as it goes.

Per step (`begin_step` before the schedule, `end_step` after it):

1. the micro-batch shapes are taken from the batches, raised to the largest shape among the
   expert-parallel peers (an MoE layer's recompute repeats its all-to-all, so EP peers must
   decide alike, and its experts' memory depends on the peers' tokens) and bucketed;
2. a shape the memory model does not cover yet (not measured, or longer than any measured)
   on any rank makes the step a *calibration* step on every rank: every layer recomputes fully (the least memory) and
   measures, during its recomputation, what it would keep without recompute; the measurements
   of all ranks are merged (maxima), so every rank fits the same model;
3. otherwise the planner's plan for the step's buckets is applied per micro-batch and chunk by
   the wrapped forward step, which also counts the bytes actually saved, so the prediction
   error and the measured peak of saved bytes (in the schedule's order) are reported as
   training goes (and on CUDA the allocator's peak).

Under the all-to-all overlap schedule (`overlap_moe_expert_parallel_comm`, Megatron-Core's
combined 1F1B) the forward step only builds the micro-batch's schedule plan, whose layer nodes
the schedule runs later, interleaved with another micro-batch's backward. Then:

* plans use only the modes the layer nodes honour (`layer.NODE_PATH_MODES`: MoE layers ``none``
  / ``core_attn``, dense layers everything but ``full``) and the overlap schedule's order (one
  more micro-batch in flight, `schedule_order`);
* the modes are set on the layer's modules when its nodes of that micro-batch run, and the
  saved bytes are counted there (`schedule.layer_plan.wrap_forward_nodes`);
* calibration steps, which recompute whole layers, run on the plain schedule (the same math:
  the flag only selects the schedule; nothing else in the dots model reads it at run time), and
  with `delay_wgrad_compute` each layer runs its `backward_dw` right after its backward there
  (`PlannedRecomputeLayer.flush_delayed_wgrad`), as the overlap schedule would.
"""

import contextlib
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..convert.sharding import unwrap_model
from .budget import GIB, format_bytes
from .layer import NODE_PATH_MODES, decoder_layers, set_modes
from .measure import OUTSIDE, SavedBytes
from .memory_model import ActivationMemoryModel
from .planner import ChunkLayout, RecomputeCosts, RecomputePlanner, StepPlan
from .schedule_order import Event, schedule_events
from .shapes import MicroBatchShape, bucket, shape_of


def attention_kind(chunks) -> str:
    """``unfused`` for Megatron-Core's local `DotProductAttention` (keeps b x s^2 scores per
    head), ``flash`` for fused kernels (TE, SDPA)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for chunk in chunks:
        for layer in decoder_layers(chunk):
            core = layer.self_attention.core_attention
            return "unfused" if isinstance(core, DotProductAttention) else "flash"
    return "flash"


def chunk_layout(chunk) -> ChunkLayout:
    model = unwrap_model(chunk)
    kinds = tuple("moe" if layer.is_moe else "dense" for layer in decoder_layers(chunk))
    role = "+".join(r for r, on in (("pre", model.pre_process), ("post", model.post_process)) if on)
    return ChunkLayout(kinds, f"chunk:{role or 'mid'}")


class RecomputeController:
    """See the module docstring. `budget_bytes` is the activation budget of this rank."""

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        config,
        budget_bytes: float,
        *,
        bucket_tokens: int = 256,
        margin: float = 0.05,
        min_points: int = 3,
        attention: Optional[str] = None,
    ):
        self.chunks = list(chunks)
        self._models = [unwrap_model(c) for c in self.chunks]
        self.config = config
        self.bucket_tokens = bucket_tokens
        self.min_points = min_points
        for chunk in self.chunks:
            for layer in decoder_layers(chunk):
                layer.install_recompute_regions()
        self.layouts = [chunk_layout(c) for c in self.chunks]
        self._kind_of: List[Dict[int, str]] = [
            {layer.layer_number: kind for layer, kind in zip(decoder_layers(c), layout.layer_kinds)}
            for c, layout in zip(self.chunks, self.layouts)
        ]
        self.model = ActivationMemoryModel(attention or attention_kind(self.chunks))
        self.planner = RecomputePlanner(
            self.model, RecomputeCosts.from_config(config), self.layouts, budget_bytes, margin
        )
        # Per chunk, an empty counter that excludes its parameters (forked per micro-batch).
        self._blank = [SavedBytes(c.parameters()) for c in self.chunks]
        self.plan: Optional[StepPlan] = None
        self.history: List[dict] = []
        self._window_start = 0
        self._counters: Dict[Tuple[int, int], SavedBytes] = {}
        self.applied: Dict[Tuple[int, int], Tuple[str, ...]] = {}  # (micro-batch, chunk) -> modes
        self.buckets: List[MicroBatchShape] = []
        self._shapes: List[MicroBatchShape] = []
        self._planning: List[MicroBatchShape] = []
        self._next: List[int] = []
        self._step_events: Optional[List[Event]] = None
        # The schedule's config and its all-to-all overlap flag while a calibration step runs
        # the plain schedule instead (restored by end_step, or by the next begin_step).
        self._schedule_config = _schedule_config(self.chunks, config)
        self._overlap_saved: Optional[bool] = None

    # -- per step ---------------------------------------------------------------------------
    @property
    def overlap(self) -> bool:
        """Whether training runs the all-to-all overlap schedule (combined 1F1B)."""
        if self._overlap_saved is not None:
            return self._overlap_saved
        return bool(getattr(self._schedule_config, "overlap_moe_expert_parallel_comm", False))

    def begin_step(self, micro_batches: Sequence, forward_only: bool = False) -> Optional[StepPlan]:
        self._restore_schedule()  # if the last step failed before end_step
        self._counters = {}
        self.applied = {}
        self._next = [0] * len(self.chunks)
        self._step_events = None
        if forward_only:
            self.plan = None
            return None
        overlap = self.overlap
        self.planner.restrict(NODE_PATH_MODES if overlap else None)
        self._shapes = [shape_of(b) for b in micro_batches]
        self._planning = self._expert_group_max(self._shapes)
        self.buckets = buckets = [bucket(s, self.bucket_tokens) for s in self._planning]
        uncovered = not all(self.model.covers(s, self.min_points) for s in self._planning)
        if self._any_rank(uncovered):  # calibration gathers from every rank: all take part
            self.plan = self.planner.calibration_step(buckets)
            if overlap:  # whole-layer recompute exists only on the plain schedule
                self._overlap_saved = True
                self._schedule_config.overlap_moe_expert_parallel_comm = False
        else:
            self._step_events = self._events(len(buckets))
            self.plan = self.planner.plan_step(buckets, self._step_events)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self.plan

    def wrap(self, forward_step_func: Callable) -> Callable:
        """The schedule's forward step, applying this step's plan to each micro-batch (the
        overlap schedule calls it with ``return_schedule_plan=True``: see the module
        docstring)."""

        def forward_step(data_iterator, model, return_schedule_plan: bool = False):
            kwargs = {"return_schedule_plan": True} if return_schedule_plan else {}
            chunk = self._chunk_index(model)
            if self.plan is None:
                set_modes(model, None)
                return forward_step_func(data_iterator, model, **kwargs)
            mb = self._next[chunk]
            self._next[chunk] += 1
            modes = self.plan.modes(mb, chunk)
            self.applied[(mb, chunk)] = modes
            counter = self._blank[chunk].fork()
            self._counters[(mb, chunk)] = counter
            if return_schedule_plan:
                if self.plan.calibrate:
                    raise RuntimeError("a calibration step must run on the plain schedule")
                set_modes(model, None)  # the nodes never call PlannedRecomputeLayer.forward
                with counter.counting():
                    plan, loss_func = forward_step_func(data_iterator, model, **kwargs)
                self._apply_to_nodes(plan, chunk, modes, counter)
                return plan, loss_func
            flush = self.plan.calibrate and bool(
                getattr(self._schedule_config, "delay_wgrad_compute", False))
            set_modes(model, list(modes), calibrate=self.plan.calibrate, flush_wgrad=flush)
            with counter.counting():
                return forward_step_func(data_iterator, model, **kwargs)

        return forward_step

    def end_step(self) -> Optional[dict]:
        plan, self.plan = self.plan, None
        self._restore_schedule()
        for chunk in self.chunks:
            for layer in decoder_layers(chunk):
                layer.flush_wgrad = False
                layer.apply_node_mode("none")  # what the overlap schedule's nodes set
        if plan is None:
            return None
        if plan.calibrate:
            self._check_no_pending_wgrad()
        record = {"calibration": plan.calibrate, "predicted_peak": plan.predicted_peak,
                  "overlap_schedule": self.overlap}
        if plan.calibrate:
            self._learn()
            record["model"] = self.model.describe()
        else:
            record.update(self._check(plan))
        if torch.cuda.is_available():
            record["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        self.history.append(record)
        return record

    # -- internals --------------------------------------------------------------------------
    def _restore_schedule(self) -> None:
        if self._overlap_saved is not None:
            self._schedule_config.overlap_moe_expert_parallel_comm = self._overlap_saved
            self._overlap_saved = None

    def _apply_to_nodes(self, plan, chunk: int, modes: Sequence[str], counter) -> None:
        """Make the overlap schedule's nodes of this micro-batch's plan set each layer's mode
        and count the bytes they save, when they run."""
        from ..schedule.layer_plan import wrap_forward_nodes

        mode_of = {id(layer): mode for layer, mode in zip(decoder_layers(self.chunks[chunk]), modes)}

        @contextlib.contextmanager
        def around(layer):
            mode = mode_of.get(id(layer)) if layer is not None else None
            if mode is not None:
                layer.apply_node_mode(mode)
            with counter.counting():
                if mode is None:
                    yield
                else:
                    with counter.region(layer.layer_number, "rest"):
                        yield

        wrap_forward_nodes(plan, around)

    def _check_no_pending_wgrad(self) -> None:
        """Delayed expert weight gradients must all have been computed in the step."""
        for chunk in self.chunks:
            for layer in decoder_layers(chunk):
                experts = getattr(layer.mlp, "experts", None)
                if getattr(experts, "_pending_wgrad", None):
                    raise RuntimeError(
                        f"layer {layer.layer_number}: delayed expert weight gradients of the "
                        "calibration step were not computed")

    def _chunk_index(self, model) -> int:
        for i, (chunk, unwrapped) in enumerate(zip(self.chunks, self._models)):
            if model is chunk or model is unwrapped:
                return i
        raise ValueError("forward step called with a model chunk the controller does not know")

    def _events(self, num_microbatches: int):
        from megatron.core import parallel_state

        pp = parallel_state.get_pipeline_model_parallel_world_size()
        vpp = len(self.chunks) if len(self.chunks) > 1 else None
        return schedule_events(
            num_microbatches,
            pp_size=pp,
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            vpp_size=vpp,
            group_size=getattr(self.config, "microbatch_group_size_per_vp_stage", None),
            overlap=self.overlap,
        )

    @staticmethod
    def _any_rank(flag: bool) -> bool:
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return flag
        from ..compat.distributed import default_device

        value = torch.tensor([int(flag)], device=default_device())
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def _expert_group_max(self, shapes: List[MicroBatchShape]) -> List[MicroBatchShape]:
        from megatron.core import parallel_state

        if not torch.distributed.is_initialized():
            return list(shapes)
        group = parallel_state.get_expert_model_parallel_group()
        if torch.distributed.get_world_size(group) == 1:
            return list(shapes)
        from ..compat.distributed import default_device

        dims = torch.tensor(
            [[s.micro_batch_size, s.seq_length] for s in shapes], dtype=torch.int64,
            device=default_device(),
        )
        torch.distributed.all_reduce(dims, op=torch.distributed.ReduceOp.MAX, group=group)
        return [MicroBatchShape(int(b), int(s)) for b, s in dims.tolist()]

    def _samples(self) -> Dict[Tuple[str, int, int], Dict[str, int]]:
        samples: Dict[Tuple[str, int, int], Dict[str, int]] = {}

        def add(kind, shape, values):
            slot = samples.setdefault((kind, shape.micro_batch_size, shape.seq_length), {})
            for q, n in values.items():
                slot[q] = max(slot.get(q, 0), n)

        for (mb, chunk), counter in self._counters.items():
            shape = self._planning[mb]
            for layer_number, kind in self._kind_of[chunk].items():
                add(kind, shape, counter.layer_bytes(layer_number))
            add(self.layouts[chunk].role, shape, {"outside": counter.bytes.get(OUTSIDE, 0)})
        return samples

    def _learn(self) -> None:
        samples = self._samples()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, samples)
        else:
            gathered = [samples]
        for part in gathered:
            self.model.merge(part)
        self.planner.reset()

    def _check(self, plan: StepPlan) -> dict:
        """The memory model's prediction for the micro-batches' own shapes (not their buckets,
        no safety margin) under the modes applied, against the bytes they saved; and the
        measured bytes: their sum over the step and their peak alive at once in the schedule's
        order (what the predicted peak bounds, before its margin and recompute transients)."""
        worst, recomputed, layers = 0.0, 0, 0
        measured: Dict[Tuple[int, int], int] = {}
        for (mb, chunk), counter in self._counters.items():
            item = plan.items[mb][chunk]
            predicted = self.predicted_bytes(chunk, item.modes, self._shapes[mb])
            measured[(mb, chunk)] = saved = counter.total()
            worst = max(worst, abs(predicted - saved) / max(saved, 1))
            recomputed += sum(m != "none" for m in item.modes)
            layers += len(item.modes)
        live = peak = 0
        for kind, mb, chunk in self._step_events or ():
            n = measured.get((mb, chunk), 0)
            live += n if kind == "F" else -n
            peak = max(peak, live)
        return {
            "modes": dict(Counter(m for modes in self.applied.values() for m in modes)),
            "max_prediction_error": worst,
            "recomputed_layer_share": recomputed / max(layers, 1),
            "recompute_flops": plan.recompute_flops,
            "fits": plan.fits,
            "measured_total": sum(measured.values()),
            "measured_peak": peak,
        }

    def predicted_bytes(self, chunk: int, modes: Sequence[str], shape: MicroBatchShape) -> float:
        """Activation bytes the model predicts for `chunk` on `shape` with these layer modes."""
        layout = self.layouts[chunk]
        total = self.model.outside_bytes(layout.role, shape)
        for kind, mode in zip(layout.layer_kinds, modes):
            total += self.model.layer_bytes(kind, mode, shape)[0]
        return total

    def take_window(self) -> Dict[str, float]:
        """Summary of the steps since the last call: calibration steps, the share of layer
        passes that recomputed and how (``modes/<mode>``: layer passes per mode), the worst
        prediction error, steps predicted not to fit, the predicted peak, the measured saved
        bytes (largest peak alive at once and largest total of a step), and on CUDA the
        allocator's peak."""
        records, self._window_start = self.history[self._window_start:], len(self.history)
        planned = [r for r in records if not r["calibration"]]
        out = {"steps": float(len(records)), "calibration_steps": float(len(records) - len(planned))}
        if planned:
            out["recomputed_layer_share"] = sum(r["recomputed_layer_share"] for r in planned) / len(planned)
            out["max_prediction_error"] = max(r["max_prediction_error"] for r in planned)
            out["steps_over_budget"] = float(sum(not r["fits"] for r in planned))
            out["predicted_peak_gib"] = max(r["predicted_peak"] for r in planned) / GIB
            out["measured_peak_gib"] = max(r["measured_peak"] for r in planned) / GIB
            out["measured_total_gib"] = max(r["measured_total"] for r in planned) / GIB
            modes = sum((Counter(r["modes"]) for r in planned), Counter())
            for mode, n in modes.items():
                out[f"modes/{mode}"] = float(n)
        peaks = [r["cuda_max_allocated"] for r in records if "cuda_max_allocated" in r]
        if peaks:
            out["allocator_peak_gib"] = max(peaks) / GIB
        return out

    def describe(self, window: Dict[str, float]) -> str:
        """One log line for a `take_window` summary."""
        text = f"recompute planner: {int(window['steps'])} steps"
        if self.overlap:
            text += " (all-to-all overlap schedule)"
        if window["calibration_steps"]:
            text += (f" ({int(window['calibration_steps'])} calibrating: every layer recomputed"
                     + (", on the plain schedule" if self.overlap else "")
                     + f"; memory model: {self.model.describe()})")
        if "recomputed_layer_share" in window:
            modes = {k[len("modes/"):]: int(v) for k, v in window.items() if k.startswith("modes/")}
            recomputed = ", ".join(f"{mode} {modes[mode]}" for mode in sorted(modes)
                                   if mode != "none") or "nothing"
            text += (
                f" | layer passes recomputed {100 * window['recomputed_layer_share']:.0f}%"
                f" ({recomputed} of {sum(modes.values())})"
                f" | predicted activation peak {format_bytes(window['predicted_peak_gib'] * GIB)}"
                f" of {format_bytes(self.planner.budget)}"
                f" | measured saved-tensor peak {format_bytes(window['measured_peak_gib'] * GIB)}"
                f" (step total <= {format_bytes(window['measured_total_gib'] * GIB)})"
                f" | prediction error <= {100 * window['max_prediction_error']:.1f}%"
            )
            if window["steps_over_budget"]:
                text += (f" | WARNING: {int(window['steps_over_budget'])} steps exceed the budget"
                         + (" even with the most recompute the overlap schedule's layer nodes "
                            "allow (MoE layers: core attention only)" if self.overlap
                            else " even with every layer recomputed"))
        if "allocator_peak_gib" in window:
            text += f" | allocator peak {format_bytes(window['allocator_peak_gib'] * GIB)}"
        return text


def _schedule_config(chunks, config):
    """The config whose `overlap_moe_expert_parallel_comm` selects the schedule: Megatron-Core's
    `forward_backward_func` reads `get_model_config(model[0])`."""
    from megatron.core.utils import get_model_config

    try:
        return get_model_config(chunks[0]) if chunks else config
    except (AttributeError, RuntimeError):
        return config
