"""A Megatron-LM model config read back as a `DotsConfig`.

Megatron-LM core_v0.19+ hands a `--spec` function its `GPTModelConfig` (a `TransformerConfig`
under `.transformer` plus the GPT fields: vocabulary, RoPE, embeddings); core_v0.16 has only the
`TransformerConfig`. `dots_config_from_model_config` accepts either, checks every field against
what a dots model needs and names the Megatron-LM flag to change for each one that disagrees
(all of them at once). Fields Megatron-LM does not know (token ids) come from `base`.
"""

from typing import List, Optional

import torch.nn.functional as F

from ..config import DotsConfig, DotsConfigError
from .arguments import (
    CONFIG_FLAGS, FIXED_ARGS, UNSUPPORTED_ARGS, DotsArgumentError, first_k_dense, with_flags,
)

# TransformerConfig field -> DotsConfig field, and the flag of each.
_SHAPE = {
    "num_layers": "num_layers", "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels", "ffn_hidden_size": "ffn_hidden_size",
    "num_moe_experts": "num_moe_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_router_topk": "moe_router_topk",
    "moe_router_topk_scaling_factor": "routed_scaling_factor",
    "layernorm_epsilon": "norm_epsilon", "add_qkv_bias": "attention_bias",
    "init_method_std": "init_method_std", "moe_router_bias_update_rate": "bias_update_rate",
}
_FLAGS = {**CONFIG_FLAGS, "init_method_std": "--init-method-std",
          "moe_router_bias_update_rate": "--moe-router-bias-update-rate"}

# The values a dots model needs are arguments.FIXED_ARGS / UNSUPPORTED_ARGS, keyed by Megatron-LM
# args attribute; the config field of the same name holds each, except these (field, negated).
_CONFIG_FIELDS = {
    "swiglu": ("gated_linear_unit", False),
    "use_rope_scaling": ("rope_scaling", False),
    "untie_embeddings_and_output_weights": ("share_embeddings_and_output_weights", True),
}


def _required_config_values():
    """Config field -> (the value a dots model needs, the flag that sets it)."""
    required = {}
    for attr, (value, flag) in {**FIXED_ARGS, **UNSUPPORTED_ARGS}.items():
        field, negated = _CONFIG_FIELDS.get(attr, (attr, False))
        required[field] = (not value if negated else value, flag)
    return required


_REQUIRED = _required_config_values()


def dots_config_from_model_config(config, base: Optional[DotsConfig] = None) -> DotsConfig:
    """The DotsConfig a Megatron-LM `GPTModelConfig` (or bare `TransformerConfig`) describes.

    Raises DotsArgumentError listing every field a dots model cannot have, each with the flag.
    Vocabulary: Megatron-LM knows only the padded size (`--padded-vocab-size`, or the
    tokenizer's size padded), which becomes `vocab_size`; without GPT fields `base`'s is kept.
    """
    base = base or DotsConfig()
    transformer = getattr(config, "transformer", config)
    gpt = config if transformer is not config else None
    problems: List[str] = []

    for field, (value, flag) in _REQUIRED.items():
        # A field this release (or a bare TransformerConfig) lacks counts as its dots value.
        owner = gpt if gpt is not None and hasattr(gpt, field) else transformer
        got = getattr(owner, field, value)
        if got != value:
            problems.append(f"{field} is {got!r}; dots models need {flag}")
    if transformer.gated_linear_unit and transformer.activation_func is not F.silu:
        problems.append(f"activation_func is {transformer.activation_func!r}; dots models need "
                        "--swiglu (SiLU)")
    balancing = _one(transformer.moe_router_load_balancing_type)
    if balancing not in ("seq_aux_loss", "none"):
        problems.append(f"moe_router_load_balancing_type is {balancing!r}; dots models need "
                        "--moe-router-load-balancing-type seq_aux_loss (or none)")

    fields = {}
    for field, dots_field in _SHAPE.items():
        value = getattr(transformer, field)
        if value is None:
            problems.append(f"{field} is not set ({_FLAGS[field]})")
        else:
            fields[dots_field] = value
    fields["attention_bias"] = bool(fields.get("attention_bias"))
    coeff = _one(transformer.moe_aux_loss_coeff)
    fields["seq_aux_loss_coeff"] = 0.0 if balancing == "none" else float(coeff or 0.0)

    try:
        fields["first_k_dense"] = first_k_dense(transformer.moe_layer_freq)
    except DotsArgumentError as err:
        problems.append(str(err))
    shared = transformer.moe_shared_expert_intermediate_size
    width = fields.get("moe_ffn_hidden_size")
    if shared is None:
        fields["num_shared_experts"] = 0
    elif width and shared % width == 0:
        fields["num_shared_experts"] = shared // width
    else:
        problems.append(f"moe_shared_expert_intermediate_size {shared} is not a multiple of "
                        f"--moe-ffn-hidden-size {width} (--moe-shared-expert-intermediate-size "
                        "= shared experts x --moe-ffn-hidden-size)")
    if gpt is not None:
        fields.update(vocab_size=gpt.vocab_size, max_position_embeddings=gpt.seq_length,
                      rotary_base=float(gpt.rotary_base),
                      make_vocab_size_divisible_by=gpt.make_vocab_size_divisible_by)
    if problems:
        raise DotsArgumentError("the Megatron-LM model config does not describe a dots model: "
                                + "; ".join(problems))
    try:
        return base.replace(**fields)
    except DotsConfigError as err:
        raise DotsArgumentError(f"the Megatron-LM model config: {with_flags(err)}") from None


def _one(value):
    """Megatron-Core keeps per-loss-type lists for some router fields; dots uses one type."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else list(value)
    return value
