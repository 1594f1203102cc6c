"""`DotsRouter`: the dots.llm1 gate on top of Megatron-Core's `TopKRouter`.

The gate is `s = sigmoid(x.float() @ W.float().T)`; the experts are the top-k of `s + b` where
`b` (`expert_bias`, HF `e_score_correction_bias`) only selects; the weights are the chosen `s`
normalised to sum one and multiplied by `routed_scaling_factor`. Megatron-Core's TopKRouter
implements that math (sigmoid score function, expert bias, top-k scaling factor); this class
pins the configuration it needs, computes the gate in fp32 on whatever device the input is on
(upstream moves the weight to CUDA), and keeps per-expert load counters for telemetry that,
unlike `local_tokens_per_expert`, survive `finalize_model_grads`.

The aux-loss-free bias update (`b += rate * sign(mean_load - load)`) runs in Megatron-Core's
`finalize_model_grads` from `local_tokens_per_expert`, which this router fills.
"""

from typing import Optional

import torch

from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter


class DotsRouter(TopKRouter):
    """Sigmoid top-k router with a selection-only bias and load statistics."""

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        _check_router_config(config)
        if pg_collection is None:  # as MoELayer does: Megatron-Core's global groups
            pg_collection = get_default_pg_collection()
        # kwargs: e.g. is_mtp_layer (megatron-core 0.19)
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.register_buffer(
            "expert_load",
            torch.zeros(config.num_moe_experts, dtype=torch.float32, device=self.weight.device),
            persistent=False,
        )

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """fp32 logits `x @ W.T`, computed where the input lives."""
        return router_gating_linear(input, self.weight, self.bias, torch.float32)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        # Count like upstream counts for the bias update: only in passes that build a graph,
        # so recomputation and evaluation do not count twice.
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                counted = routing_map
                if padding_mask is not None:
                    counted = routing_map & ~padding_mask.reshape(-1, 1)
                self.expert_load += counted.sum(dim=0).to(self.expert_load.dtype)
        return probs, routing_map

    def take_expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last call (this rank's tokens), then reset."""
        load = self.expert_load.clone()
        self.expert_load.zero_()
        return load

    def _apply(self, fn, *args, **kwargs):
        # Float16Module casts every floating buffer; the bias and counters stay fp32.
        result = super()._apply(fn, *args, **kwargs)
        for name in ("expert_bias", "local_tokens_per_expert", "expert_load"):
            buf = getattr(self, name, None)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return result


def _check_router_config(config) -> None:
    expected = {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_dtype": "fp32",
        "moe_router_pre_softmax": False,
        "moe_router_num_groups": None,
        "moe_router_group_topk": None,
        "moe_expert_capacity_factor": None,
        "moe_router_force_load_balancing": False,
        "moe_input_jitter_eps": None,
    }
    for field, value in expected.items():
        actual = getattr(config, field, value)
        if actual != value:
            raise ValueError(
                f"DotsRouter needs TransformerConfig.{field}={value!r}, got {actual!r}; build the "
                "config with DotsConfig.to_transformer_config()"
            )
    if not config.moe_router_topk_scaling_factor:
        raise ValueError("DotsRouter needs TransformerConfig.moe_router_topk_scaling_factor")
