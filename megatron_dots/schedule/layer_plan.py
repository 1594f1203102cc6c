"""The dots changes to Megatron-Core's combined-1F1B layer plans: the work that fills the
dispatch all-to-all's wait.

Megatron-Core's combined 1F1B (`models/common/model_chunk_schedule_plan.py`) splits a MoE layer
into nodes: pre-dispatch (attention, pre-MLP norm, router, dispatch preprocessing, and upstream
also the shared experts) on the compute stream, dispatch on the communication stream, routed
experts on the compute stream, combine on the communication stream. For each dots MoE layer of
a plan, `adapt_layer_plans` changes two things, leaving the node order of the schedule as is:

* Shared experts (2 of the 8 active experts' worth of FLOPs) need only the norm output, so they
  leave the pre-dispatch node and run on the compute stream right after the dispatch all-to-all
  is issued; their backward right after the dispatch backward is issued.
* With `delay_wgrad_compute`, the routed experts' weight gradient (`backward_dw`), which
  upstream computes before issuing the dispatch backward, runs right after it instead: the
  dispatch backward needs only the data gradient, so its all-to-all starts as soon as that is
  done and the weight gradient fills its wait, also in backward passes with no paired forward
  (the pipeline drain, PP=1's last micro-batch).

A forward/backward pair of one layer then issues (F = micro-batch k+w, B = micro-batch k)::

    compute: F attention | B experts dgrad | F shared | B expert wgrad, B shared bwd |
             F experts | B attention bwd
    comm:    B combine bwd | F dispatch | B dispatch bwd | F combine

Data flow of the shared experts: inside the pre-dispatch node
`DotsMoELayer.shared_experts_compute` returns the norm output, which upstream detaches into
`layer_state.shared_expert_output` (its gradient flows back through that node's backward).
`_DeferredSharedExperts.forward` replaces it by the real shared output (detached again, so the
combine node's backward leaves the gradient on it); `_DeferredSharedExperts.backward`
propagates that gradient to the norm output before the pre-dispatch node's backward reads it.
No extra events are needed: all of it runs on the compute stream after nodes that already
waited for the data it reads.
"""

import contextlib
from typing import Callable, Optional

import torch
from megatron.core.pipeline_parallel.utils import NoopScheduleNode, get_comp_stream

from ..compat.mcore_api import pre_dispatch_node
from ..model.moe import DotsMoELayer

__all__ = ["adapt_layer_plans", "wrap_forward_nodes"]


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


def _wrap_node(node, *, before=None, after_forward: Optional[Callable] = None,
               after_backward: Optional[Callable] = None) -> None:
    forward, backward = node.forward, node.backward

    def wrapped_forward(inputs=()):
        with before() if before is not None else contextlib.nullcontext():
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


def _take_backward_dw(node) -> Callable[[], None]:
    """The node's `backward_dw`; the node's own attribute becomes a no-op, so the schedule's
    call (before the dispatch backward) does nothing and ours runs it once, later."""
    backward_dw = node.backward_dw
    node.backward_dw = lambda: None
    return backward_dw


def adapt_layer_plans(plan) -> int:
    """Apply the changes above to every dots MoE layer of the model-chunk schedule plan `plan`
    (a `TransformerModelChunkSchedulePlan`). Returns the number of layers changed."""
    changed = 0
    for i in range(plan.num_layers()):
        layer_plan = plan.get_layer(i)
        moe = getattr(layer_plan.layer, "mlp", None)
        if not isinstance(moe, DotsMoELayer):
            continue
        if moe.shared_expert_overlap:
            raise ValueError("moe_shared_expert_overlap must be off with the all-to-all overlap "
                             "schedule (it overlaps the shared experts itself)")
        after_dispatch = after_dispatch_backward = None
        if moe.use_shared_expert:
            shared = _DeferredSharedExperts(layer_plan, moe)
            _wrap_node(pre_dispatch_node(layer_plan), before=moe.deferred_shared_experts)
            after_dispatch = shared.forward
            after_dispatch_backward = shared.backward
        if moe.config.delay_wgrad_compute:
            expert_wgrad = _take_backward_dw(layer_plan.mlp)
            shared_backward = after_dispatch_backward

            def after_dispatch_backward(wgrad=expert_wgrad, shared_backward=shared_backward):
                wgrad()
                if shared_backward is not None:
                    shared_backward()

        _wrap_node(layer_plan.moe_dispatch, after_forward=after_dispatch,
                   after_backward=after_dispatch_backward)
        changed += 1
    return changed


# The nodes of a `TransformerLayerSchedulePlan` besides the pre-dispatch one (`pre_dispatch_node`:
# `attn` on 0.16, `pre_dispatch_computation` on 0.19+), in forward order.
_LAYER_NODES = ("moe_dispatch", "mlp", "moe_combine", "mtp_post_process")


def wrap_forward_nodes(plan, around: Callable) -> None:
    """Run the forward of every node of the model-chunk schedule plan `plan` inside the context
    manager ``around(layer)``: `layer` is the `TransformerLayer` (or MTP layer) a node belongs
    to, None for the plan's pre- and post-process nodes. The schedule runs a micro-batch's forward
    nodes interleaved with another micro-batch's backward nodes, so what must hold while this
    micro-batch's forward runs (its recompute flags, a saved-bytes counter) belongs here rather
    than around the forward step that only builds the plan."""

    def wrap(node, layer):
        if node is None or isinstance(node, NoopScheduleNode):
            return
        _wrap_node(node, before=lambda: around(layer))

    wrap(getattr(plan, "pre_process", None), None)
    for i in range(plan.num_layers()):
        layer_plan = plan.get_layer(i)
        wrap(pre_dispatch_node(layer_plan), layer_plan.layer)
        for name in _LAYER_NODES:
            wrap(getattr(layer_plan, name, None), layer_plan.layer)
    wrap(getattr(plan, "post_process", None), None)
