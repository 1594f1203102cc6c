"""Layer and decoder-block specs for dots models on Megatron-Core.

A dots decoder is `first_k_dense` dense SwiGLU layers followed by dots MoE layers
(`DotsMoELayer` + `DotsRouter`), with QK-RMSNorm attention. Three backends:

* ``te``: Transformer Engine modules (fused norm + linear, TE attention, `TEGroupedMLP`
  experts). Only when Transformer Engine is importable.
* ``grouped``: our TE-free fast path: `TorchGroupedExperts` (torch grouped GEMM experts),
  `SDPACoreAttention` (torch scaled_dot_product_attention), `DotsRMSNorm` (sequence-parallel
  capable without TE/apex), Megatron-Core's local parallel linears. Always available.
* ``sequential``: Megatron-Core's local modules as they are (`SequentialMLP` experts, the
  unfused `DotProductAttention`), with `DotsRMSNorm`: the upstream reference. Always available.

``auto`` picks ``te`` when TE is installed, else ``grouped``.
"""

from typing import Optional

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from ..compat.mcore_api import DotsTransformerLayer, experts_builder, experts_spec
from ..compat.versions import HAVE_TE
from ..recompute.layer import PlannedRecomputeLayer
from .attention import SDPACoreAttention
from .experts import TorchGroupedExperts
from .moe import DotsMoELayer
from .norm import DotsRMSNorm
from .router import DotsRouter

EXPERT_BACKENDS = ("auto", "te", "grouped", "sequential")


class DotsDecoderLayer(PlannedRecomputeLayer, DotsTransformerLayer):
    """A dots decoder layer: Megatron-Core's TransformerLayer whose recompute the
    input-aware planner can switch per micro-batch (`recompute.layer`)."""


class DotsLocalSpecProvider(LocalSpecProvider):
    """Megatron-Core local modules, with an RMSNorm that supports sequence parallelism."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return DotsRMSNorm


class DotsTorchSpecProvider(DotsLocalSpecProvider):
    """The TE-free fast path: local linears, SDPA core attention (grouped experts in `_moe_spec`)."""

    def core_attention(self) -> type:
        return SDPACoreAttention


def resolve_expert_backend(name: str = "auto") -> str:
    """Validate a backend name and resolve ``auto``; errors say what is available."""
    if name not in EXPERT_BACKENDS:
        raise ValueError(
            f"unknown expert backend {name!r}; choose one of {', '.join(EXPERT_BACKENDS)}"
        )
    if name == "auto":
        return "te" if HAVE_TE else "grouped"
    if name == "te" and not HAVE_TE:
        raise ValueError(
            "expert backend 'te' needs Transformer Engine, which is not importable here; "
            "use 'grouped' (or 'auto')"
        )
    return name


def spec_provider(backend: str) -> BackendSpecProvider:
    backend = resolve_expert_backend(backend)
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return DotsTorchSpecProvider() if backend == "grouped" else DotsLocalSpecProvider()


def _attention_spec(provider: BackendSpecProvider, fused_norm: bool) -> ModuleSpec:
    qk_norm = provider.layer_norm(rms_norm=True, for_qk=True)
    linear_qkv = (
        provider.column_parallel_layer_norm_linear()
        if fused_norm
        else provider.column_parallel_linear()
    )
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _moe_spec(provider: BackendSpecProvider, backend: str) -> ModuleSpec:
    shared = MLPSubmodules(
        linear_fc1=provider.column_parallel_linear(),
        linear_fc2=provider.row_parallel_linear(),
    )
    return ModuleSpec(
        module=DotsMoELayer,
        submodules=MoESubmodules(
            experts=(experts_builder(TorchGroupedExperts) if backend == "grouped"
                     else experts_spec(provider, grouped=backend == "te")),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=shared),
            router=DotsRouter,
        ),
    )


def get_dots_layer_spec(moe: bool, backend: str = "auto") -> ModuleSpec:
    """Spec of one dots decoder layer (dense or MoE) for the given expert backend."""
    backend = resolve_expert_backend(backend)
    provider = spec_provider(backend)
    fused = backend == "te"  # TE fuses the pre-attention / pre-MLP norms into the linear
    norm = provider.layer_norm(rms_norm=True, for_qk=False)
    if moe:
        mlp = _moe_spec(provider, backend)
        pre_mlp_norm = norm
    else:
        linear_fc1 = (
            provider.column_parallel_layer_norm_linear()
            if fused
            else provider.column_parallel_linear()
        )
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=linear_fc1, linear_fc2=provider.row_parallel_linear()
            ),
        )
        pre_mlp_norm = IdentityOp if fused else norm
    return ModuleSpec(
        module=DotsDecoderLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else norm,
            self_attention=_attention_spec(provider, fused),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_dots_decoder_block_spec(
    config,
    backend: str = "auto",
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec holding the layers of this pipeline stage (and virtual stage)."""
    pattern = config.moe_layer_freq
    if not isinstance(pattern, list) or len(pattern) != config.num_layers:
        raise ValueError(
            "dots needs TransformerConfig.moe_layer_freq as a per-layer list of 0/1 of length "
            f"num_layers={config.num_layers}; got {pattern!r}"
        )
    specs = {flag: get_dots_layer_spec(moe=bool(flag), backend=backend) for flag in set(pattern)}
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    layer_specs = [specs[flag] for flag in pattern[offset : offset + count]]
    norm = spec_provider(backend).layer_norm(rms_norm=True, for_qk=False)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=norm)
