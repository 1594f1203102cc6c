"""Fixes for upstream Megatron-Core defects, applied on any device.

Each patch is narrow, idempotent and a no-op where the defect is absent (the site is patched
only if the attribute exists; a moved or already fixed site is skipped and reported by
:func:`applied_patches`).

Status on 0.19 (CI runs the suite against megatron-core 0.19.2, see .ci/run): patch
1 is skipped there (``te_general_gemm`` is bound in every branch); patch 2 is still needed
(``maybe_move_tensor_to_cpu`` still converts CUDA tensors only) and its wrapper passes through
the ``use_nccl_stream`` argument that 0.19 added to ``_AllToAll.forward``; patch 3 is needed on
both; patches 6, 8 and 9 on 0.16.1, 0.19.2 and 0.20.0, patches 7 and 10 on 0.16.1 and 0.19.2
(0.20.0, Megatron-LM main, has the fix: the patch detects it and stands down); patch 11 on
0.16.1 only.

1. ``megatron/core/transformer/moe/moe_utils.py`` (megatron-core 0.16.1):
   ``RouterGatingLinearFunction.forward/backward`` test ``te_general_gemm is not None``, but
   the name is only bound inside ``try: import transformer_engine ...``; without Transformer
   Engine every router forward raises ``NameError: name 'te_general_gemm' is not defined``.
   Fix: bind ``moe_utils.te_general_gemm = None`` when it is missing.

2. ``megatron/core/tensor_parallel/mappings.py:_AllToAll.forward`` (megatron-core 0.16.1),
   reached from ``megatron/core/transformer/moe/token_dispatcher.py``:
   ``MoEAlltoAllTokenDispatcher.token_dispatch/token_combine`` pass ``self.input_splits`` /
   ``self.output_splits`` to ``all_to_all(...)``. Those are computed as torch tensors in
   ``MoEAlltoAllTokenDispatcher.preprocess`` and turned into numpy arrays by
   ``_maybe_dtoh_and_synchronize`` -> ``moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)``
   *only if the tensor is on CUDA*. On CPU they stay torch tensors, and
   ``torch.distributed.all_to_all_single`` rejects tensors as split sizes
   (``TypeError: all_to_all_single(): incompatible function arguments``). Fix: wrap
   ``_AllToAll.forward`` to convert split sizes (tensor / numpy / sequence) into Python lists
   of ints before calling the original (the lists are also what ``backward`` reuses).

3. ``megatron/core/transformer/moe/moe_utils.py:MoEAuxLossAutoScaler.set_loss_scale``
   (megatron-core 0.16.1 and 0.19.2): a backward through an auxiliary loss before any schedule
   set the scale (a plain ``loss.backward()``, e.g. evaluation code or a unit test) creates
   ``main_loss_backward_scale = torch.tensor(1.0)``, 0-d; the schedules later call
   ``set_loss_scale`` with a [1]-shaped tensor and its ``copy_`` raises ``RuntimeError: output
   with shape [] doesn't match the broadcast shape [1]``: every later training step in that
   process fails. Fix: when the stored scale's shape differs, replace it instead of copying.

4. ``megatron/core/pipeline_parallel/combined_1f1b.py:
   combined_1f1b_schedule_for_interleaved_pipelining`` (megatron-core 0.16.1; fixed in 0.19 as
   ``if b_model_chunk_id is not None``): the backward post-processing runs under
   ``if b_model_chunk_id:``, so it is skipped whenever the backward half of a combined step is
   model chunk 0. That post-processing is ``backward_step_helper_postprocess`` in
   ``schedules.py``: it launches the overlapped gradient reduction (``config.grad_sync_func``)
   of the chunk whose last micro-batch just finished. Skipped there, that reduction only starts
   after the whole pipeline flush (``Launch any remaining grad reductions``): correct numbers,
   lost overlap of the data-parallel reduce with compute. Fix: after the original returns,
   run the post-processing for chunk 0 (the original already ran it for every other chunk).
   The patch is applied only when the function's source still has the truthiness test.

5. ``megatron/core/tensor_parallel/layers.py:RowParallelLinear`` (megatron-core 0.16.1; 0.19 has
   it): no ``backward_dw`` method while ``ColumnParallelLinear`` has a no-op one. With
   ``delay_wgrad_compute`` the combined 1F1B calls ``backward_dw()`` on every attention and MLP
   projection (``Attention._backward_output_proj``, ``MLP.backward_dw``), so the TE-free path
   fails with ``AttributeError: 'RowParallelLinear' object has no attribute 'backward_dw'``.
   Fix: the same no-op (the local layers compute their weight gradient in backward already).

6. ``megatron/core/optimizer/distrib_optimizer.py:DistributedOptimizer.state_dict``
   (megatron-core 0.16.1, 0.19.2, 0.20.0) without apex or Transformer Engine (torch's Adam):
   the Adam step is read from the inner optimizer's per-parameter state and ``assert
   len(steps) == 1``; a distributed optimizer that has not stepped yet has no state, so
   building the state dict to *load* a checkpoint into (``sharded_state_dict(...,
   is_loading=True)``, which Megatron-LM's and our resume call) raises ``AssertionError``:
   no distributed-optimizer checkpoint can be resumed on the TE-free path. Fix: while the inner
   optimizer has no state, the original sees one entry with step 0 (the true step count); the
   entry is dropped from the result with the rest of the parameter state.

7. ``megatron/core/optimizer/distrib_optimizer.py:
   DistributedOptimizer.sharded_param_state_fully_reshardable`` (megatron-core 0.16.1, 0.19.2;
   fixed in 0.20.0, whose source this patch checks): ``get_parameter_state_dp_zero`` returns each buffer's state with the buckets
   packed end to end (padding at the end of each bucket removed), but the parameters are then
   cut out of it at their offsets in the padded buffer (``param_index_map``). With the
   distributed optimizer every bucket but the last is padded, so with more than one bucket
   (``--overlap-grad-reduce``) every parameter after the first bucket is saved with another
   parameter's fp32 weights and Adam moments, and the last one is zero-filled (upstream logs
   "param range exceeds unpadded buffer ... can lead to data corruption"): a resumed run
   continues from wrong master weights. Fix: during the call, that gathered state is laid out
   at the buffer's offsets (each bucket at its ``offset``), which is what the slicing expects;
   the load side (``load_parameter_state_from_fully_reshardable``) already uses local ranges.

8. ``megatron/core/optimizer/distrib_optimizer.py:
   DistributedOptimizer._set_main_param_and_optimizer_states`` (megatron-core 0.16.1, 0.19.2,
   0.20.0) without apex or Transformer Engine: it copies every entry of the parameter's torch
   Adam state from the loaded tensors, including ``step``, which ``load_state_dict`` has just
   set from the checkpoint's param groups and the fully reshardable format does not carry per
   parameter: ``KeyError: 'step'`` on every resume. Fix: the loaded tensors are completed with
   the state's own ``step`` (copied onto itself, unchanged).

9. ``megatron/core/optimizer/distrib_optimizer.py:DistributedOptimizer.load_state_dict``
   (megatron-core 0.16.1, 0.19.2, 0.20.0) without apex or Transformer Engine: every
   parameter's Adam state gets the *same* ``step`` tensor (``s["step"] = step`` in a loop) and
   torch's ``Optimizer.load_state_dict`` keeps it shared; torch Adam then increments it once per
   parameter each step, so after a resume the bias correction uses a step count in the
   hundreds: the first resumed update is too large and the run no longer matches the one that
   was not interrupted (measured: losses differ from the second resumed step on). Fix: after
   the original, each parameter's state gets its own copy of the step.

10. ``megatron/core/transformer/moe/router.py:TopKRouter._apply_expert_bias`` (megatron-core
    0.16.1 and 0.19.2; 0.20.0 has the fix, ``(~padding_mask).unsqueeze(-1)``): with a padding
    mask (``GPTModel.forward(padding_mask=...)``, SFT's padded micro-batches) it computes
    ``routing_map & (~padding_mask)``, a ``[tokens, experts]`` map against a ``[tokens]``
    mask: ``RuntimeError: The size of tensor a (E) must match the size of tensor b (T)`` on
    every training forward (or, when T == E, a silently wrong count). Fix: hand the original a
    ``[tokens, 1]`` mask, which broadcasts over the experts. Applied only when the method's
    source lacks the fix.

11. ``megatron/core/dist_checkpointing/strategies/common.py:TorchCommonLoadStrategy.load_common``
    (megatron-core 0.16.1; 0.19 reads both formats): megatron-core 0.19 stopped writing
    ``common.pt`` and keeps a checkpoint's common state as the ``common_state`` object inside
    the torch_dist files. 0.16.1 (the newest release for Python 3.11) looks only for
    ``common.pt`` and, on its missing-file path, fails with ``AttributeError: 'str' object has
    no attribute 'iterdir'``: a checkpoint trained on a 0.19 cluster cannot be resumed,
    converted or analysed on a 3.11 machine. Fix: when ``common.pt`` is absent and the
    checkpoint's metadata holds ``common_state``, read it from there (the sharded tensors of
    both formats are the same). Applied only when the module has no reader of that format.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from typing import List, Tuple

__all__ = ["apply_runtime_patches", "applied_patches", "as_split_sizes"]

_LOCK = threading.Lock()
_APPLIED = False
_SITES: List[Tuple[str, str]] = []
_SKIPPED: List[Tuple[str, str]] = []


def applied_patches(include_skipped: bool = False) -> List[Tuple[str, str]]:
    """``(upstream_site, description)`` for each applied patch (+ skipped ones on request)."""
    out = list(_SITES)
    if include_skipped:
        out += [(s, f"SKIPPED: {why}") for s, why in _SKIPPED]
    return out


def as_split_sizes(sizes):
    """None, or a Python ``list`` of ``int`` from a tensor / numpy array / sequence."""
    if sizes is None:
        return None
    if hasattr(sizes, "tolist"):  # torch.Tensor, numpy.ndarray
        sizes = sizes.tolist()
    return [int(s) for s in sizes]


def _import_or_skip(site: str, *names: str):
    """The modules ``names`` (a list), or None with the site recorded as skipped."""
    try:
        return [importlib.import_module(name) for name in names]
    except Exception as exc:  # pragma: no cover - moved module
        _SKIPPED.append((site, f"import failed: {exc}"))
        return None


def _patch_te_general_gemm() -> None:
    """moe_utils.py (0.16.1): ``te_general_gemm`` unbound when TE is not installed."""
    site = "megatron/core/transformer/moe/moe_utils.py: module global te_general_gemm"
    modules = _import_or_skip(site, "megatron.core.transformer.moe.moe_utils")
    if modules is None:
        return
    (moe_utils,) = modules
    if not hasattr(moe_utils, "RouterGatingLinearFunction"):
        _SKIPPED.append((site, "RouterGatingLinearFunction absent"))
        return
    if hasattr(moe_utils, "te_general_gemm"):
        _SKIPPED.append((site, "already defined (TE present or fixed upstream)"))
        return
    moe_utils.te_general_gemm = None
    _SITES.append(
        (site, "defined as None so RouterGatingLinearFunction falls back to torch.mm without TE")
    )


def _wrap_staticmethod(site: str, module: str, cls_name: str, method: str, make_wrapper,
                       description: str) -> None:
    """Replace the static method ``module.cls_name.method`` by ``make_wrapper(original)``;
    skipped (and reported) when the site is missing, a no-op when already wrapped. The
    wrapper keeps the original as ``__wrapped_original__`` (tests call it to show the defect)."""
    modules = _import_or_skip(site, module)
    if modules is None:
        return
    cls = getattr(modules[0], cls_name, None)
    if cls is None or method not in cls.__dict__:
        _SKIPPED.append((site, f"{cls_name}.{method} absent"))
        return
    original = cls.__dict__[method]
    original_fn = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(original_fn, "__megatron_dots_patched__", False):
        return
    wrapper = functools.wraps(original_fn)(make_wrapper(original_fn))
    wrapper.__megatron_dots_patched__ = True
    wrapper.__wrapped_original__ = original_fn
    setattr(cls, method, staticmethod(wrapper))
    _SITES.append((site, description))


def _patch_all_to_all_split_sizes() -> None:
    """mappings.py (0.16.1): ``_AllToAll.forward`` given tensor split sizes on CPU."""

    def make_wrapper(original_fn):
        def forward(ctx, group, input, output_split_sizes, input_split_sizes, *args, **kwargs):
            # *args/**kwargs: later releases add parameters (0.19: use_nccl_stream)
            return original_fn(ctx, group, input, as_split_sizes(output_split_sizes),
                               as_split_sizes(input_split_sizes), *args, **kwargs)

        return forward

    _wrap_staticmethod(
        "megatron/core/tensor_parallel/mappings.py:_AllToAll.forward",
        "megatron.core.tensor_parallel.mappings", "_AllToAll", "forward", make_wrapper,
        "split sizes converted to list[int] (MoEAlltoAllTokenDispatcher keeps them as "
        "torch tensors on CPU; all_to_all_single rejects tensors)")


def _patch_aux_loss_scale_shape() -> None:
    """moe_utils.py (0.16.1, 0.19.2): set_loss_scale copies into a 0-d scale a bare backward
    created."""
    def make_wrapper(original_fn):
        def set_loss_scale(scale):
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler as cls

            current = cls.main_loss_backward_scale
            if current is not None and current.shape != scale.shape:
                cls.main_loss_backward_scale = None  # the original then stores `scale` itself
            return original_fn(scale)

        return set_loss_scale

    _wrap_staticmethod(
        "megatron/core/transformer/moe/moe_utils.py:MoEAuxLossAutoScaler.set_loss_scale",
        "megatron.core.transformer.moe.moe_utils", "MoEAuxLossAutoScaler", "set_loss_scale",
        make_wrapper, "a stored scale of another shape (the 0-d one a bare backward creates) "
        "is replaced instead of copied into")


_CHUNK0_DEFECT = "if b_model_chunk_id:"


def _patch_combined_1f1b_chunk0_postprocess() -> None:
    """combined_1f1b.py (0.16.1): backward post-processing skipped for model chunk 0."""
    site = ("megatron/core/pipeline_parallel/combined_1f1b.py:"
            "combined_1f1b_schedule_for_interleaved_pipelining")
    name = "combined_1f1b_schedule_for_interleaved_pipelining"
    modules = _import_or_skip(site, "megatron.core.pipeline_parallel.combined_1f1b",
                              "megatron.core.pipeline_parallel.schedules")
    if modules is None:
        return
    combined, schedules = modules
    original = getattr(combined, name, None)
    if original is None:
        _SKIPPED.append((site, "function absent"))
        return
    if getattr(original, "__megatron_dots_patched__", False):
        return
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError) as exc:
        _SKIPPED.append((site, f"source unavailable, cannot tell whether it is fixed: {exc}"))
        return
    if _CHUNK0_DEFECT not in source:
        _SKIPPED.append((site, "fixed upstream (no `if b_model_chunk_id:`)"))
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        b_id = bound.get("b_virtual_microbatch_id")
        if b_id is not None and bound["get_model_chunk_id"](b_id, forward=False) == 0:
            bound["backward_step_helper_postprocess"](b_id)
        return result

    wrapper.__megatron_dots_patched__ = True
    wrapper.__wrapped_original__ = original
    combined.combined_1f1b_schedule_for_interleaved_pipelining = wrapper
    if getattr(schedules, name, None) is original:
        schedules.combined_1f1b_schedule_for_interleaved_pipelining = wrapper
    _SITES.append((site, "backward post-processing (grad-sync launch) also runs when the "
                         "backward chunk is 0"))


def _patch_row_parallel_backward_dw() -> None:
    """layers.py (0.16.1): RowParallelLinear has no backward_dw."""
    site = "megatron/core/tensor_parallel/layers.py:RowParallelLinear.backward_dw"
    modules = _import_or_skip(site, "megatron.core.tensor_parallel.layers")
    if modules is None:
        return
    RowParallelLinear = modules[0].RowParallelLinear
    if hasattr(RowParallelLinear, "backward_dw"):
        _SKIPPED.append((site, "already defined upstream"))
        return

    def backward_dw(self) -> None:
        """Delayed weight gradients are not supported by the local layer: its weight gradient
        was computed in backward, so there is nothing left to do (as ColumnParallelLinear)."""

    backward_dw.__megatron_dots_patched__ = True
    RowParallelLinear.backward_dw = backward_dw
    _SITES.append((site, "no-op backward_dw (as ColumnParallelLinear) for delay_wgrad_compute"))


def _wrap_method(site: str, module: str, cls_name: str, method: str, make_wrapper,
                 description: str) -> None:
    """Replace the method ``module.cls_name.method`` by ``make_wrapper(original)`` (skipped and
    reported when the site is missing; a no-op when already wrapped)."""
    modules = _import_or_skip(site, module)
    if modules is None:
        return
    cls = getattr(modules[0], cls_name, None)
    original = cls.__dict__.get(method) if cls is not None else None
    if original is None:
        _SKIPPED.append((site, f"{cls_name}.{method} absent"))
        return
    if getattr(original, "__megatron_dots_patched__", False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.__megatron_dots_patched__ = True
    wrapper.__wrapped_original__ = original
    setattr(cls, method, wrapper)
    _SITES.append((site, description))


class _StepZeroView:
    """The inner torch optimizer as the distributed optimizer's ``state_dict`` reads it: one
    state entry with step 0 while it has none (see patch 6)."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def state_dict(self):
        import torch

        inner = self._optimizer.state_dict()
        inner["state"] = {0: {"step": torch.tensor(0.0)}}
        return inner

    def __getattr__(self, name):
        return getattr(self._optimizer, name)


def _patch_distopt_state_dict_before_first_step() -> None:
    """distrib_optimizer.py (0.16.1-0.20.0, torch optimizers): state_dict asserts a step."""
    site = "megatron/core/optimizer/distrib_optimizer.py:DistributedOptimizer.state_dict"
    modules = _import_or_skip(site, "megatron.core.optimizer.distrib_optimizer")
    if modules is None:
        return
    if getattr(modules[0], "HAVE_APEX_OR_TE", True):
        _SKIPPED.append((site, "apex / Transformer Engine optimizer in use (step kept per group)"))
        return

    def make_wrapper(original):
        def state_dict(self, *args, **kwargs):
            inner = self.optimizer
            if len(inner.state) > 0 or not hasattr(inner, "state_dict"):
                return original(self, *args, **kwargs)
            self.optimizer = _StepZeroView(inner)
            try:
                return original(self, *args, **kwargs)
            finally:
                self.optimizer = inner

        return state_dict

    _wrap_method(site, "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
                 "state_dict", make_wrapper,
                 "an optimizer that has not stepped reports step 0 instead of failing "
                 "`assert len(steps) == 1` (loading a checkpoint without apex / TE)")


def buffer_ordered_state(optimizer, state):
    """``get_parameter_state_dp_zero``'s result with each bucket placed at its offset in the
    padded buffer, the coordinates of ``param_index_map`` (patch 7)."""
    import torch

    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue  # "buckets_coalesced"
        buffer = optimizer.buffers[gbuf_idx]
        for world in by_dtype.values():
            for key, packed in list(world.items()):
                if not torch.is_tensor(packed):
                    continue  # "numel_unpadded"
                laid_out = packed.new_zeros(buffer.numel)
                start = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    laid_out[bucket.offset:bucket.offset + n] = packed[start:start + n]
                    start += n
                world[key] = laid_out
    return state


# Megatron-LM main (megatron-core 0.20.0) subtracts the stripped bucket padding itself.
_BUCKET_OFFSETS_FIX = "padding_stripped"


def _patch_fully_reshardable_bucket_offsets() -> None:
    """distrib_optimizer.py (0.16.1-0.20.0): fully reshardable save slices packed buckets at
    padded offsets."""

    def make_wrapper(original):
        def sharded_param_state_fully_reshardable(self, *args, **kwargs):
            gather = self.get_parameter_state_dp_zero

            def gather_in_buffer_order(*g_args, **g_kwargs):
                state = gather(*g_args, **g_kwargs)
                return None if state is None else buffer_ordered_state(self, state)

            self.get_parameter_state_dp_zero = gather_in_buffer_order
            try:
                return original(self, *args, **kwargs)
            finally:
                del self.get_parameter_state_dp_zero

        return sharded_param_state_fully_reshardable

    site = ("megatron/core/optimizer/distrib_optimizer.py:"
            "DistributedOptimizer.sharded_param_state_fully_reshardable")
    modules = _import_or_skip(site, "megatron.core.optimizer.distrib_optimizer")
    method = getattr(getattr(modules[0], "DistributedOptimizer", None),
                     "sharded_param_state_fully_reshardable", None) if modules else None
    try:
        fixed = method is not None and _BUCKET_OFFSETS_FIX in inspect.getsource(method)
    except (OSError, TypeError):
        fixed = False
    if fixed:
        _SKIPPED.append((site, "fixed upstream (offsets adjusted for stripped bucket padding)"))
        return
    _wrap_method(
        site, "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
        "sharded_param_state_fully_reshardable", make_wrapper,
        "the gathered optimizer state is laid out at the padded buffer's bucket offsets before "
        "parameters are sliced from it (saved state belonged to other parameters after the "
        "first bucket)")


def _patch_distopt_set_states_step() -> None:
    """distrib_optimizer.py (0.16.1-0.20.0, torch optimizers): set states needs a 'step'."""

    def make_wrapper(original):
        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            if "step" not in tensors and not self.config.use_precision_aware_optimizer:
                group_index, group_order = self.model_param_group_index_map[model_param]
                main_param = self.optimizer.param_groups[group_index]["params"][group_order]
                step = self.optimizer.state.get(main_param, {}).get("step")
                if step is not None:
                    tensors = {**tensors, "step": step}
            return original(self, model_param, tensors)

        return _set_main_param_and_optimizer_states

    _wrap_method(
        "megatron/core/optimizer/distrib_optimizer.py:"
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
        "_set_main_param_and_optimizer_states", make_wrapper,
        "loaded states without a per-parameter 'step' keep the step load_state_dict set "
        "(torch Adam; KeyError: 'step' otherwise)")


def _patch_distopt_shared_step() -> None:
    """distrib_optimizer.py (0.16.1-0.20.0, torch optimizers): one step tensor for all."""

    def make_wrapper(original):
        def load_state_dict(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            seen = set()
            for state in self.optimizer.state.values():
                step = state.get("step") if isinstance(state, dict) else None
                if step is None or not hasattr(step, "clone"):
                    continue
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(step))
            return result

        return load_state_dict

    _wrap_method(
        "megatron/core/optimizer/distrib_optimizer.py:DistributedOptimizer.load_state_dict",
        "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "load_state_dict",
        make_wrapper, "each parameter's torch Adam state gets its own step tensor (a shared one "
        "is incremented once per parameter per step)")


def _patch_expert_bias_padding_mask() -> None:
    """router.py (0.16.1, 0.19.2): the padding mask does not broadcast over the experts."""
    site = "megatron/core/transformer/moe/router.py:TopKRouter._apply_expert_bias"
    modules = _import_or_skip(site, "megatron.core.transformer.moe.router")
    if modules is None:
        return
    original = modules[0].TopKRouter.__dict__.get("_apply_expert_bias")
    if original is None or getattr(original, "__megatron_dots_patched__", False):
        return
    if "unsqueeze(-1)" in inspect.getsource(original):
        _SKIPPED.append((site, "fixed upstream (the mask is unsqueezed)"))
        return

    def make_wrapper(original):
        # The original is `jit_fuser` (torch.compile) wrapped; without CUDA call its eager
        # function, as the CPU backend does for every jit_fuser site (inductor compiles on CPU
        # cost ~30 s per process).
        eager = getattr(original, "_torchdynamo_orig_callable", original)

        def _apply_expert_bias(self, routing_map, padding_mask=None):
            if padding_mask is not None:
                padding_mask = padding_mask.reshape(-1, 1)
            target = original if torch.cuda.is_available() else eager
            return target(self, routing_map, padding_mask=padding_mask)

        return _apply_expert_bias

    import torch

    _wrap_method(site, "megatron.core.transformer.moe.router", "TopKRouter",
                 "_apply_expert_bias", make_wrapper,
                 "the padding mask broadcasts over the experts in the bias-update token count")
    wrapper = modules[0].TopKRouter.__dict__["_apply_expert_bias"]
    # functools.wraps copied torch.compile's marker: drop it so that the CPU backend does not
    # take the wrapper for a compiled function and replace it by the unpatched original.
    wrapper.__dict__.pop("_torchdynamo_orig_callable", None)


def read_inline_common_state(checkpoint_dir: str):
    """The common state that megatron-core >= 0.19 stores inside the torch_dist files (the
    ``common_state`` sharded object, a pickled one-element list), or None when absent."""
    import io

    import torch
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(checkpoint_dir)
    keys = [k for k in reader.read_metadata().state_dict_metadata
            if k.split("/", 1)[0] == "common_state"]
    if len(keys) != 1:
        return None
    request = {keys[0]: io.BytesIO()}
    load(request, storage_reader=FileSystemReader(checkpoint_dir), no_dist=True)
    loaded = request[keys[0]]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


def _patch_inline_common_state() -> None:
    """strategies/common.py (0.16.1): checkpoints of megatron-core >= 0.19 have no common.pt."""
    site = ("megatron/core/dist_checkpointing/strategies/common.py:"
            "TorchCommonLoadStrategy.load_common")
    modules = _import_or_skip(site, "megatron.core.dist_checkpointing.serialization",
                              "megatron.core.dist_checkpointing.strategies.common")
    if modules is None:
        return
    serialization, common = modules
    if hasattr(serialization, "_legacy_common_state_exists"):
        _SKIPPED.append((site, "reads the common state stored inside torch_dist files"))
        return

    def make_wrapper(original):
        def load_common(self, checkpoint_dir):
            import os

            directory = str(checkpoint_dir)
            if not os.path.exists(os.path.join(directory, common.COMMON_STATE_FNAME)) and (
                    os.path.isfile(os.path.join(directory, ".metadata"))):
                state = read_inline_common_state(directory)
                if state is not None:
                    return state
            return original(self, checkpoint_dir)

        return load_common

    _wrap_method(site, "megatron.core.dist_checkpointing.strategies.common",
                 "TorchCommonLoadStrategy", "load_common", make_wrapper,
                 "reads the common state that megatron-core >= 0.19 keeps inside the "
                 "torch_dist files (no common.pt)")


def apply_runtime_patches() -> List[Tuple[str, str]]:
    """Apply all runtime patches once; returns :func:`applied_patches`."""
    global _APPLIED
    with _LOCK:
        if not _APPLIED:
            _patch_te_general_gemm()
            _patch_all_to_all_split_sizes()
            _patch_aux_loss_scale_shape()
            _patch_combined_1f1b_chunk0_postprocess()
            _patch_row_parallel_backward_dw()
            _patch_distopt_state_dict_before_first_step()
            _patch_fully_reshardable_bucket_offsets()
            _patch_distopt_set_states_step()
            _patch_distopt_shared_step()
            _patch_expert_bias_padding_mask()
            _patch_inline_common_state()
            _APPLIED = True
    return applied_patches()
