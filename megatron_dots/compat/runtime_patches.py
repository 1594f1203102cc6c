"""Fixes for upstream Megatron-Core defects, applied on any device.

Each patch is narrow, idempotent and a no-op where the defect is absent (the site is patched
only if the attribute exists; a moved or already fixed site is skipped and reported by
:func:`applied_patches`).

Status on 0.19 (CI runs the suite against megatron-core 0.19.2, see .ci/run): patch
1 is skipped there (``te_general_gemm`` is bound in every branch); patch 2 is still needed
(``maybe_move_tensor_to_cpu`` still converts CUDA tensors only) and its wrapper passes through
the ``use_nccl_stream`` argument that 0.19 added to ``_AllToAll.forward``; patch 3 is needed on
both.

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
            _APPLIED = True
    return applied_patches()
