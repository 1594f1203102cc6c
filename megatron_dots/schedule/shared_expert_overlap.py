"""Shared experts computed while the dispatch all-to-all is in flight (combined 1F1B plans).

Megatron-Core's combined 1F1B (`models/common/model_chunk_schedule_plan.py`) splits a MoE
layer into nodes: pre-dispatch (attention, pre-MLP norm, router, dispatch preprocessing, and
upstream also the shared experts) on the compute stream, dispatch on the communication stream,
routed experts on the compute stream, combine on the communication stream. A dots layer's
shared experts (2 of the 8 active experts' worth of FLOPs) need only the norm output, so we move
them out of the pre-dispatch node and run them on the compute stream right after the dispatch
all-to-all was issued; their backward runs right after the dispatch backward all-to-all was
issued. The node order of the schedule is unchanged otherwise:

    compute:  pre-dispatch | shared fwd  (+ delayed expert wgrad of the paired backward)
    comm:                  | dispatch a2a ------------------------->| ...

Data flow: inside the pre-dispatch node `DotsMoELayer.shared_experts_compute` returns the norm
output, which upstream detaches into `layer_state.shared_expert_output` (its gradient flows back
through that node's backward). `_DeferredSharedExperts.forward` replaces it by the real shared
output (detached again, so the combine node's backward leaves the gradient on it);
`_DeferredSharedExperts.backward` propagates that gradient to the norm output before the
pre-dispatch node's backward reads it. Ordering needs no extra events: both halves run on the
compute stream after nodes that already waited for the data they read.
"""

import contextlib
from typing import Optional

import torch
from megatron.core.pipeline_parallel.utils import get_comp_stream

from ..compat.mcore_api import pre_dispatch_node
from ..model.moe import DotsMoELayer

__all__ = ["overlap_shared_experts_with_dispatch"]


def _on_compute_stream():
    stream = get_comp_stream()
    if stream is None or not torch.cuda.is_available():
        return contextlib.nullcontext()
    return torch.cuda.stream(stream)


class _DeferredSharedExperts:
    """The shared-expert forward / backward of one MoE layer of one micro-batch."""

    def __init__(self, layer_plan, moe: DotsMoELayer):
        self.layer_plan = layer_plan
        self.moe = moe
        self.output: Optional[torch.Tensor] = None
        self.detached_output: Optional[torch.Tensor] = None

    def forward(self) -> None:
        state = self.layer_plan.layer_state
        norm_output = state.shared_expert_output  # what the pre-dispatch node detached
        with _on_compute_stream():
            output = self.moe.compute_shared_experts(norm_output)
        detached = output.detach()
        detached.requires_grad = output.requires_grad
        state.shared_expert_output = detached
        self.output, self.detached_output = output, detached

    def backward(self) -> None:
        output, detached = self.output, self.detached_output
        self.output = self.detached_output = None
        if output is None or not output.requires_grad or detached.grad is None:
            return
        with _on_compute_stream():
            torch.autograd.backward(output, grad_tensors=detached.grad)


def _wrap_node(node, *, before=None, after_forward=None, after_backward=None) -> None:
    forward, backward = node.forward, node.backward

    def wrapped_forward(inputs=()):
        if before is None:
            out = forward(inputs)
        else:
            with before():
                out = forward(inputs)
        if after_forward is not None:
            after_forward()
        return out

    def wrapped_backward(output_grad):
        grads = backward(output_grad)
        if after_backward is not None:
            after_backward()
        return grads

    node.forward, node.backward = wrapped_forward, wrapped_backward


def overlap_shared_experts_with_dispatch(plan) -> int:
    """Rewire every dots MoE layer of the model-chunk schedule plan `plan` (a
    `TransformerModelChunkSchedulePlan`) so that its shared experts run during the dispatch
    all-to-all. Returns the number of layers changed."""
    changed = 0
    for i in range(plan.num_layers()):
        layer_plan = plan.get_layer(i)
        moe = getattr(layer_plan.layer, "mlp", None)
        if not isinstance(moe, DotsMoELayer) or not moe.use_shared_expert:
            continue
        if moe.shared_expert_overlap:
            raise ValueError("moe_shared_expert_overlap must be off with the all-to-all overlap "
                             "schedule (it overlaps the shared experts itself)")
        deferred = _DeferredSharedExperts(layer_plan, moe)
        _wrap_node(pre_dispatch_node(layer_plan), before=moe.deferred_shared_experts)
        _wrap_node(layer_plan.moe_dispatch, after_forward=deferred.forward,
                   after_backward=deferred.backward)
        changed += 1
    return changed
