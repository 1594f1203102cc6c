"""Layer / block specs: backend selection and which layers each pipeline stage builds."""

import pytest
import torch

from megatron_dots import DotsConfig
from megatron_dots.compat.versions import HAVE_TE
from megatron_dots.model.moe import DotsMoELayer
from megatron_dots.model.specs import get_dots_decoder_block_spec, resolve_expert_backend


def test_backend_resolution():
    assert resolve_expert_backend("auto") == ("te" if HAVE_TE else "grouped")
    assert resolve_expert_backend("sequential") == "sequential"
    assert resolve_expert_backend("grouped") == "grouped"
    with pytest.raises(ValueError, match="grouped_gemm.*choose one of"):
        resolve_expert_backend("grouped_gemm")


@pytest.mark.skipif(HAVE_TE, reason="checks the error raised when Transformer Engine is absent")
def test_te_backend_without_te_is_a_clear_error():
    with pytest.raises(ValueError, match="Transformer Engine"):
        resolve_expert_backend("te")


@pytest.mark.parametrize("backend,attention,experts", [
    ("grouped", "SDPACoreAttention", "TorchGroupedExperts"),
    ("sequential", "DotProductAttention", "SequentialMLP"),
])
def test_backend_modules(single_process_world, backend, attention, experts):
    from megatron_dots import build_dots_model

    model = build_dots_model(DotsConfig.preset("dots-tiny"), backend=backend)
    layer = model.decoder.layers[1]
    assert type(layer.self_attention.core_attention).__name__ == attention
    assert type(layer.mlp.experts).__name__ == experts
    assert type(layer.input_layernorm).__name__ == "DotsRMSNorm"


def kinds(block_spec):
    return ["moe" if spec.submodules.mlp.module is DotsMoELayer else "dense"
            for spec in block_spec.layer_specs]


@pytest.mark.parametrize(
    "pp,vpp,expected",
    [
        (1, None, {(0, None): ["dense", "moe", "moe", "moe"]}),
        (2, None, {(0, None): ["dense", "moe"], (1, None): ["moe", "moe"]}),
        (2, 2, {(0, 0): ["dense"], (1, 0): ["moe"], (0, 1): ["moe"], (1, 1): ["moe"]}),
    ],
)
def test_stages_build_their_slice_of_the_layer_pattern(single_process_world, pp, vpp, expected):
    tc = DotsConfig.preset("dots-tiny").to_transformer_config(
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=None if pp == 1 else torch.float32,
    )
    for (pp_rank, vp_stage), layers in expected.items():
        spec = get_dots_decoder_block_spec(tc, backend="sequential", vp_stage=vp_stage,
                                           pp_rank=pp_rank)
        assert kinds(spec) == layers, (pp_rank, vp_stage)


def test_block_spec_needs_a_per_layer_pattern(single_process_world):
    tc = DotsConfig.preset("dots-tiny").to_transformer_config()
    tc.moe_layer_freq = 1
    with pytest.raises(ValueError, match="moe_layer_freq"):
        get_dots_decoder_block_spec(tc, backend="sequential")
