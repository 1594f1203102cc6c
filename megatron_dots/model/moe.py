"""`DotsMoELayer`: the dots MoE block (routed experts + always-on shared experts).

output = sum_k w_k * expert_k(x) + shared(x), with w from `DotsRouter` (already multiplied by
`routed_scaling_factor`) and the shared-expert output added unscaled. It is a Megatron-Core
`MoELayer` (same route / dispatch / experts / combine stages and attribute names), so the
token dispatchers, `finalize_model_grads` and the combined-1F1B overlap schedule treat it as
their own; it adds the dots invariants and access to the router's load counters.
"""

from contextlib import contextmanager

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer

from .router import DotsRouter

# The output variants of `DotsMoELayer.ablated`: what each keeps.
ABLATIONS = {None: "routed + shared experts", "no-shared": "routed experts only",
             "shared-only": "shared experts only"}


class DotsMoELayer(MoELayer):
    """Megatron-Core MoE layer with the dots router and an unscaled shared expert."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        if getattr(config, "moe_shared_expert_gate", False):
            raise ValueError(
                "dots shared experts are ungated: set TransformerConfig.moe_shared_expert_gate=False"
            )
        if getattr(config, "moe_latent_size", None):
            raise ValueError("dots MoE layers have no latent projection (moe_latent_size)")
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            **kwargs,  # e.g. is_mtp_layer, name (megatron-core 0.19)
        )
        if not isinstance(self.router, DotsRouter):
            raise TypeError(
                f"DotsMoELayer needs a DotsRouter, the spec gave {type(self.router).__name__}"
            )

    _defer_shared_experts = False

    @contextmanager
    def deferred_shared_experts(self):
        """Within the block `shared_experts_compute` returns its input unchanged instead of
        the shared-expert output, and `compute_shared_experts` must run later on it.

        The all-to-all overlap schedule (`schedule/layer_plan.py`) uses this to
        move the shared experts out of the node that ends with the dispatch preprocessing and
        compute them while the dispatch all-to-all is in flight."""
        self._defer_shared_experts = True
        try:
            yield
        finally:
            self._defer_shared_experts = False

    def shared_experts_compute(self, hidden_states: torch.Tensor):
        if self._defer_shared_experts and self.use_shared_expert:
            return hidden_states
        return super().shared_experts_compute(hidden_states)

    def compute_shared_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The shared-expert output for `hidden_states` (the pre-MLP norm output)."""
        return super().shared_experts_compute(hidden_states)

    # None, or an `ABLATIONS` key: which part of the output `postprocess` drops.
    _ablation = None

    @contextmanager
    def ablated(self, variant):
        """Within the block the layer's output omits one part: `"no-shared"` drops the shared
        experts' output, `"shared-only"` the routed experts' (the router still routes, so its
        counters see the same selections); `None` changes nothing. For analyses
        (`analysis/ablation.py`), not training."""
        if variant not in ABLATIONS:
            raise ValueError(f"unknown MoE ablation {variant!r}; expected one of "
                             f"{sorted(k for k in ABLATIONS if k)}")
        previous, self._ablation = self._ablation, variant
        try:
            yield
        finally:
            self._ablation = previous

    def postprocess(self, output: torch.Tensor, shared_expert_output):
        if self._ablation == "no-shared":
            shared_expert_output = None
        elif self._ablation == "shared-only":
            output = torch.zeros_like(output)
        return super().postprocess(output, shared_expert_output)

    def take_expert_load(self) -> torch.Tensor:
        """Tokens this rank routed to each (global) expert since the last call; resets."""
        return self.router.take_expert_load()


def dots_moe_layers(modules) -> list:
    """Every `DotsMoELayer` inside `modules` (model chunks, wrapped or not), in order."""
    return [m for module in modules for m in module.modules() if isinstance(m, DotsMoELayer)]
