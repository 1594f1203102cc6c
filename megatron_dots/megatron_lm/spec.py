"""`--spec` entry points for Megatron-LM core_v0.19.x and main (no edit of Megatron-LM).

    python pretrain_gpt.py $(megatron-dots megatron-lm-args dots.llm1) \\
        --spec megatron_dots.megatron_lm.spec dots_spec  <parallel, data, optimizer flags>

Megatron-LM calls the named function as ``fn(config, vp_stage=...)`` with its
`GPTModelConfig` and builds its stock `GPTModel` from the block spec we return: the dense
first layers and dots MoE layers (`DotsMoELayer`, `DotsRouter`) of this (virtual) pipeline
stage. The config is checked first (`model_config.dots_config_from_model_config`): a flag a
dots model cannot have is an error naming it, before any module is built.

`--spec` passes no arguments, so the backend follows `--transformer-impl` (`local`: our
TE-free `grouped` path; `transformer_engine`: TE modules) in `dots_spec`, and is fixed in
`dots_spec_te`, `dots_spec_grouped`, `dots_spec_sequential`.

Not on this path: `DotsGPTModel`'s all-to-all overlap layer plan (Megatron-LM builds its fixed
`GPTModel`) -- use the launcher (`python -m megatron_dots.megatron_lm.launch`) for that.

A silent stock model: core_v0.19.0's `import_module` logs and swallows an ImportError, then
builds its stock spec. `import megatron_dots` therefore raises `MegatronDotsImportError` (a
RuntimeError) for anything that breaks it, and every call here prints one line on rank 0
("megatron-dots: --spec ... built ..."); a run whose log lacks it did not use our modules.
"""

import os
import sys
from typing import Optional

from ..compat.versions import HAVE_TE
from ..model.specs import get_dots_decoder_block_spec
from .arguments import DotsArgumentError
from .model_config import dots_config_from_model_config

SPEC_MODULE = __name__

# --transformer-impl -> our backend.
_IMPL_BACKENDS = {"local": "grouped", "transformer_engine": "te"}


def backend_for_transformer_impl(impl: str) -> str:
    """Our backend for Megatron-LM's --transformer-impl; errors name the flag."""
    if impl not in _IMPL_BACKENDS:
        raise DotsArgumentError(f"--transformer-impl {impl}: the dots spec supports "
                                f"{' or '.join(_IMPL_BACKENDS)}")
    backend = _IMPL_BACKENDS[impl]
    if backend == "te" and not HAVE_TE:
        raise DotsArgumentError(
            "--transformer-impl transformer_engine (Megatron-LM's default) needs Transformer "
            "Engine, which is not importable here: pass --transformer-impl local (our TE-free "
            f"grouped experts + SDPA path), or --spec {SPEC_MODULE} dots_spec_grouped")
    return backend


def build_block_spec(config, vp_stage: Optional[int] = None, backend: Optional[str] = None):
    """Check `config` (GPTModelConfig or TransformerConfig) and return the dots block spec of
    this (virtual) pipeline stage."""
    dots = dots_config_from_model_config(config)
    transformer = getattr(config, "transformer", config)
    if not isinstance(transformer.moe_layer_freq, list):
        transformer.moe_layer_freq = dots.moe_layer_pattern  # `--moe-layer-freq 1`: all MoE
    backend = backend or backend_for_transformer_impl(transformer.transformer_impl)
    block = get_dots_decoder_block_spec(transformer, backend=backend, vp_stage=vp_stage)
    if os.environ.get("RANK", "0") == "0":
        print(f"megatron-dots: --spec {SPEC_MODULE} built the dots block spec (backend "
              f"{backend}, vp_stage {vp_stage}, {len(block.layer_specs)} layers: "
              f"{dots.first_k_dense} dense then MoE with {dots.num_moe_experts} experts top-"
              f"{dots.moe_router_topk} + {dots.num_shared_experts} shared)",
              file=sys.stderr, flush=True)
    return block


def dots_spec(config, vp_stage: Optional[int] = None):
    """Dots block spec; backend from --transformer-impl."""
    return build_block_spec(config, vp_stage)


def dots_spec_te(config, vp_stage: Optional[int] = None):
    """Dots block spec with Transformer Engine modules."""
    return build_block_spec(config, vp_stage, backend="te")


def dots_spec_grouped(config, vp_stage: Optional[int] = None):
    """Dots block spec on the TE-free fast path (torch grouped-GEMM experts, SDPA)."""
    return build_block_spec(config, vp_stage, backend="grouped")


def dots_spec_sequential(config, vp_stage: Optional[int] = None):
    """Dots block spec with Megatron-Core's local modules (SequentialMLP experts)."""
    return build_block_spec(config, vp_stage, backend="sequential")
