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
from .arguments import CONFIG_FLAGS, DotsArgumentError, first_k_dense, with_flags

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

# Fields a dots model needs at one value: field -> (value, what to pass). A field this
# megatron-core release does not have counts as its dots value.
_TRANSFORMER_FIXED = {
    "normalization": ("RMSNorm", "--normalization RMSNorm"),
    "qk_layernorm": (True, "--qk-layernorm"),
    "gated_linear_unit": (True, "--swiglu"),
    "add_bias_linear": (False, "--disable-bias-linear"),
    "moe_router_score_function": ("sigmoid", "--moe-router-score-function sigmoid"),
    "moe_router_enable_expert_bias": (True, "--moe-router-enable-expert-bias"),
    "moe_router_dtype": ("fp32", "--moe-router-dtype fp32"),
    "moe_router_pre_softmax": (False, "no --moe-router-pre-softmax"),
    "moe_router_num_groups": (None, "no --moe-router-num-groups"),
    "moe_shared_expert_gate": (False, "no --moe-shared-expert-gate"),
    "multi_latent_attention": (False, "no --multi-latent-attention"),
    "mtp_num_layers": (None, "no --mtp-num-layers"),
    "rotary_interleaved": (False, "no --rotary-interleaved"),
    "moe_latent_size": (None, "no --moe-latent-size"),
    "experimental_attention_variant": (None, "no --experimental-attention-variant"),
}
_GPT_FIXED = {
    "position_embedding_type": ("rope", "--position-embedding-type rope"),
    "share_embeddings_and_output_weights": (False, "--untie-embeddings-and-output-weights"),
    "rotary_percent": (1.0, "--rotary-percent 1.0"),
    "rope_scaling": (False, "no --use-rope-scaling"),
}


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

    def need(owner, fixed):
        for field, (value, flag) in fixed.items():
            got = getattr(owner, field, value)
            if got != value:
                problems.append(f"{field} is {got!r}; dots models need {flag}")

    need(transformer, _TRANSFORMER_FIXED)
    if gpt is not None:
        need(gpt, _GPT_FIXED)
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
