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
"""

import contextlib
from typing import List, Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer

from ..convert.sharding import unwrap_model
from .measure import active_counter

MODES = ("none", "core_attn", "mlp", "core_attn+mlp", "full")


def _region(name: str, layer: int):
    counter = active_counter()
    return counter.region(layer, name) if counter is not None else contextlib.nullcontext()


class PlannedRecomputeLayer:
    """Mixin for a Megatron-Core `TransformerLayer`; see the module docstring."""

    recompute_mode: str = "none"
    calibrate: bool = False

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

    def forward(self, *args, **kwargs):
        mode = self.recompute_mode if self.training and torch.is_grad_enabled() else "none"
        self._apply_module_flags(mode)
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


def set_modes(chunk, modes: Optional[List[str]], calibrate: bool = False) -> None:
    """Give each decoder layer of `chunk` its mode (None: ``none`` everywhere)."""
    layers = decoder_layers(chunk)
    if modes is not None and len(modes) != len(layers):
        raise ValueError(f"plan has {len(modes)} layer modes, the chunk has {len(layers)} layers")
    for i, layer in enumerate(layers):
        mode = "none" if modes is None else modes[i]
        if mode not in MODES:
            raise ValueError(f"unknown recompute mode {mode!r}; expected one of {MODES}")
        layer.recompute_mode = mode
        layer.calibrate = calibrate
