"""Dots model components for Megatron-Core: specs, router, MoE block, grouped experts, SDPA
attention, norm, builder."""

from .attention import SDPACoreAttention
from .builder import build_dots_model, build_dots_model_chunks
from .experts import TorchGroupedExperts
from .moe import DotsMoELayer
from .norm import DotsRMSNorm
from .router import DotsRouter
from .specs import EXPERT_BACKENDS, get_dots_decoder_block_spec, get_dots_layer_spec

__all__ = [
    "build_dots_model", "build_dots_model_chunks", "DotsMoELayer", "DotsRMSNorm", "DotsRouter",
    "EXPERT_BACKENDS", "get_dots_decoder_block_spec", "get_dots_layer_spec",
    "SDPACoreAttention", "TorchGroupedExperts",
]
