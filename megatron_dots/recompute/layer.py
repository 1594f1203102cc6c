"""Per-layer recompute that can change from one micro-batch to the next.

`PlannedRecomputeLayer` is mixed into the dots decoder layer. Its `recompute_mode` is read at
every training forward, so the planner switches recompute per micro-batch without rebuilding
the model:

* ``none``: keep every activation;
* ``core_attn``: Megatron-Core's core-attention checkpoint (`Attention.checkpoint_core_attention`);
* ``mlp``: checkpoint the MLP (dense: `TransformerLayer.recompute_mlp`; MoE: the whole MoE block,
  `MoELayer.moe_layer_recompute`, dispatch and combine included);
* ``core_attn+mlp``: both;
* ``full``: checkpoint the whole layer (`tensor_parallel.checkpoint`, Megatron-Core's RNG-tracker
  aware checkpoint), keeping only its inputs.

The layer also attributes the bytes saved inside it to regions of a `measure.SavedBytes` counter
when one is active, and with `calibrate` set measures its full activations during the
recomputation of a ``full`` checkpoint (so calibration never holds them all at once).

Under the all-to-all overlap schedule (Megatron-Core's combined 1F1B) this `forward` is not
called: the schedule runs a layer as separate nodes (`models/gpt/fine_grained_callables.py`,
same in 0.16, 0.19 and 0.20) with detached tensors between them. There only the modules' own
flags act (`apply_node_mode`, `NODE_PATH_MODES`): the attention node calls
`TransformerLayer._forward_attention`, whose `Attention.forward` honours
`checkpoint_core_attention`, and a dense layer's MLP node calls `_forward_mlp`, which honours
`recompute_mlp`. An MoE layer's nodes call the MoE stages (`route`, `dispatch`,
`routed_experts_compute`, `combine`) directly, never `MoELayer.forward`, so
`moe_layer_recompute` has no effect, and a checkpoint of the whole layer or MoE block would have
to span detached nodes and replay the dispatch / combine all-to-all inside the backward node of
another micro-batch's pair: neither ``mlp`` for MoE layers nor ``full`` exists there.
"""

import contextlib
from typing import List, Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer

from ..convert.sharding import unwrap_model
from .measure import active_counter

MODES = ("none", "core_attn", "mlp", "core_attn+mlp", "full")

# The modes the all-to-all overlap schedule's layer nodes honour, per layer kind (see the module
# docstring).
NODE_PATH_MODES = {
    "moe": ("none", "core_attn"),
    "dense": ("none", "core_attn", "mlp", "core_attn+mlp"),
}


def _region(name: str, layer: int):
    counter = active_counter()
    return counter.region(layer, name) if counter is not None else contextlib.nullcontext()


class PlannedRecomputeLayer:
    """Mixin for a Megatron-Core `TransformerLayer`; see the module docstring."""

    recompute_mode: str = "none"
    calibrate: bool = False
    # Set for a step on the plain schedule of a model built for delayed weight gradients: run
    # the layer's `backward_dw` right after its backward (see `flush_delayed_wgrad`).
    flush_wgrad: bool = False

    @property
    def kind(self) -> str:
        return "moe" if self.is_moe else "dense"

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def install_recompute_regions(self) -> None:
        """Hooks that open the `attn_core` / `mlp` regions and record the modules' inputs."""
        if getattr(self, "_regions_installed", False):
            return
        self._regions_installed = True
        for module, name in ((self.self_attention.core_attention, "attn_core"), (self.mlp, "mlp")):
            module.register_forward_pre_hook(self._region_opener(name), with_kwargs=True)
            module.register_forward_hook(self._region_closer, always_call=True)

    def _region_opener(self, name: str):
        recorded = {"attn_core": "core_in", "mlp": "mlp_in"}[name]

        def hook(module, args, kwargs):
            counter = active_counter()
            if counter is None:
                module._dots_region = None
                return None
            if torch.is_grad_enabled():
                counter.record_inputs(self.layer_number, recorded, (args, kwargs))
            module._dots_region = counter.region(self.layer_number, name)
            module._dots_region.__enter__()
            return None

        return hook

    @staticmethod
    def _region_closer(module, args, output):
        region = getattr(module, "_dots_region", None)
        if region is not None:
            module._dots_region = None
            region.__exit__(None, None, None)

    def _apply_module_flags(self, mode: str) -> None:
        self.self_attention.checkpoint_core_attention = mode in ("core_attn", "core_attn+mlp")
        mlp = mode in ("mlp", "core_attn+mlp")
        if self.is_moe:
            self.mlp.moe_layer_recompute = mlp
        else:
            self.recompute_mlp = mlp

    def apply_node_mode(self, mode: str) -> None:
        """Set the module flags of `mode` for the overlap schedule's nodes of this layer, which
        read them when they run (`NODE_PATH_MODES`)."""
        if mode not in NODE_PATH_MODES[self.kind]:
            raise ValueError(
                f"recompute mode {mode!r} cannot apply to a {self.kind} layer under the "
                f"all-to-all overlap schedule (its layer nodes honour "
                f"{NODE_PATH_MODES[self.kind]})")
        self._apply_module_flags(mode)

    def run_backward_dw(self) -> None:
        """The delayed weight gradients of this layer, as the overlap schedule's nodes compute
        them: the attention node's (`self_attention.backward_dw` + the shared experts') and
        the MLP node's (`mlp.backward_dw`: routed experts, or the dense MLP)."""
        self.self_attention.backward_dw()
        if self.is_moe:
            self.mlp.backward_dw(routed_experts=True, shared_experts=True)
        else:
            self.mlp.backward_dw()

    def flush_delayed_wgrad(self, hidden_states) -> None:
        """With `delay_wgrad_compute` the experts leave their weight gradients to
        `backward_dw()`, which only the overlap schedule calls. On a step of the plain schedule
        (the planner's calibration steps), run it when the gradient of this layer's input is
        complete, i.e. right after the layer's backward of this micro-batch: every gradient is
        accumulated once per micro-batch in the same order as under the overlap schedule."""
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.requires_grad:
            raise RuntimeError(
                f"layer {self.layer_number}: delayed weight gradients on the plain schedule are "
                "computed when the layer's input gradient is, but its input needs no gradient")

        def hook(grad):
            self.run_backward_dw()
            return None

        hidden_states.register_hook(hook)

    def forward(self, *args, **kwargs):
        mode = self.recompute_mode if self.training and torch.is_grad_enabled() else "none"
        self._apply_module_flags(mode)
        if self.flush_wgrad and self.training and torch.is_grad_enabled():
            self.flush_delayed_wgrad(kwargs.get("hidden_states", args[0] if args else None))
        if mode != "full":
            with _region("rest", self.layer_number):
                return super().forward(*args, **kwargs)
        return self._checkpointed_forward(args, kwargs)

    def _checkpointed_forward(self, args, kwargs):
        parent_forward = super().forward
        if args:  # TransformerBlock passes keywords; accept hidden_states positionally too
            kwargs = dict(kwargs, hidden_states=args[0])
            if len(args) > 1:
                raise TypeError("PlannedRecomputeLayer takes the layer's arguments by keyword")
        hidden_states = kwargs.pop("hidden_states")
        tensor_keys: List[str] = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        others = {k: v for k, v in kwargs.items() if k not in tensor_keys}
        counter = active_counter() if self.calibrate else None
        layer = self.layer_number

        def run(hidden, *tensors):
            call = dict(others, **dict(zip(tensor_keys, tensors)))
            if counter is None or not torch.is_grad_enabled():
                return parent_forward(hidden_states=hidden, **call)
            # The recomputation during backward: measure what the layer keeps without recompute.
            sub = counter.fork()
            with sub.counting(), sub.region(layer, "rest"):
                out = parent_forward(hidden_states=hidden, **call)
            counter.merge(sub)
            return out

        with _region("input", layer):
            return tensor_parallel.checkpoint(
                run, False, hidden_states, *[kwargs[k] for k in tensor_keys]
            )


def decoder_layers(chunk) -> List[PlannedRecomputeLayer]:
    """The planned-recompute layers of a model chunk (DDP / Float16Module wrappers unwrapped)."""
    decoder = getattr(unwrap_model(chunk), "decoder", None)
    layers = list(decoder.layers) if decoder is not None else []
    return [layer for layer in layers if isinstance(layer, PlannedRecomputeLayer)]


def set_modes(chunk, modes: Optional[List[str]], calibrate: bool = False,
              flush_wgrad: bool = False) -> None:
    """Give each decoder layer of `chunk` its mode (None: ``none`` everywhere); `flush_wgrad`:
    see `PlannedRecomputeLayer.flush_delayed_wgrad`."""
    layers = decoder_layers(chunk)
    if modes is not None and len(modes) != len(layers):
        raise ValueError(f"plan has {len(modes)} layer modes, the chunk has {len(layers)} layers")
    for i, layer in enumerate(layers):
        mode = "none" if modes is None else modes[i]
        if mode not in MODES:
            raise ValueError(f"unknown recompute mode {mode!r}; expected one of {MODES}")
        layer.recompute_mode = mode
        layer.calibrate = calibrate
        layer.flush_wgrad = flush_wgrad
