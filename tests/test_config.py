"""DotsConfig: presets, parameter counts, TransformerConfig and HF config.json mapping."""

import json

import pytest
import torch

from megatron_dots import DotsConfig, DotsConfigError


def test_dots_llm1_parameter_count_matches_paper():
    total, active = DotsConfig.preset("dots.llm1").num_parameters()
    # arXiv 2506.05767: 142B total, 14B activated per token.
    assert 141.5e9 < total < 143.5e9, total
    assert 13.5e9 < active < 14.5e9, active


def test_parameter_count_equals_hf_model(tiny_hf_model_and_cfg):
    model, cfg = tiny_hf_model_and_cfg
    counted = sum(p.numel() for p in model.parameters())
    assert cfg.num_parameters()[0] == counted


def test_parameter_count_equals_megatron_model(seeded):
    from megatron_dots import build_dots_model

    cfg = DotsConfig.preset("dots-tiny")
    model = build_dots_model(cfg, backend="sequential")
    counted = sum(p.numel() for p in model.parameters())
    padding = 2 * (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.hidden_size
    assert cfg.num_parameters()[0] == counted - padding


@pytest.mark.parametrize("name", ["dots.llm1", "dots-mini", "dots-tiny"])
def test_presets_build_transformer_configs(name):
    cfg = DotsConfig.preset(name)
    tc = cfg.to_transformer_config()
    assert tc.num_layers == cfg.num_layers
    assert tc.moe_layer_freq == [0] * cfg.first_k_dense + [1] * (cfg.num_layers - cfg.first_k_dense)
    assert tc.moe_router_score_function == "sigmoid"
    assert tc.moe_router_enable_expert_bias
    assert tc.moe_router_topk_scaling_factor == cfg.routed_scaling_factor
    assert tc.moe_shared_expert_intermediate_size == cfg.num_shared_experts * cfg.moe_ffn_hidden_size
    assert tc.qk_layernorm and tc.gated_linear_unit and not tc.add_bias_linear


def test_dots_llm1_shape_facts():
    cfg = DotsConfig.preset("dots.llm1")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_channels) == (62, 4096, 32, 128)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.num_shared_experts) == (128, 6, 2)
    assert cfg.rotary_base == 1e7 and cfg.routed_scaling_factor == 2.5
    assert cfg.padded_vocab_size(1) == 152064  # already a multiple of 128
    assert cfg.padded_vocab_size(8) == 152576  # Megatron pads to 128 x TP


def test_transformer_config_refuses_shape_overrides():
    with pytest.raises(DotsConfigError, match="num_layers"):
        DotsConfig.preset("dots-tiny").to_transformer_config(num_layers=3)


def test_unknown_preset_and_field():
    with pytest.raises(DotsConfigError, match="dots-huge"):
        DotsConfig.preset("dots-huge")
    with pytest.raises(DotsConfigError, match="n_layers"):
        DotsConfig.preset("dots-tiny", n_layers=3)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_attention_heads", 6, "num_query_groups"),
        ("moe_router_topk", 99, "moe_router_topk"),
        ("first_k_dense", 9, "first_k_dense"),
        ("hidden_size", 0, "hidden_size"),
        ("kv_channels", 15, "kv_channels"),
    ],
)
def test_inconsistent_fields_name_the_field(field, value, message):
    with pytest.raises(DotsConfigError, match=message):
        DotsConfig.preset("dots-tiny", **{field: value})


@pytest.mark.parametrize("name", ["dots.llm1", "dots-mini", "dots-tiny"])
def test_hf_config_round_trip(name):
    cfg = DotsConfig.preset(name)
    # Training-only fields (aux-loss coefficient, bias rate, vocab padding) are not in config.json.
    training_only = dict(make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    assert DotsConfig.from_hf_config(cfg.to_hf_config(), **training_only) == cfg


def test_hf_config_loads_in_transformers(tmp_path):
    from transformers import AutoConfig

    cfg = DotsConfig.preset("dots.llm1")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "dots1"
    assert hf.n_routed_experts == 128 and hf.num_experts_per_tok == 6
    assert hf.first_k_dense_replace == 1 and hf.routed_scaling_factor == 2.5
    assert all(t == "full_attention" for t in hf.layer_types)
    # ...and transformers' own serialisation reads back to the same DotsConfig.
    hf.save_pretrained(tmp_path / "again")
    assert DotsConfig.from_hf_config(tmp_path / "again") == cfg
    assert json.loads((tmp_path / "again" / "config.json").read_text())["n_routed_experts"] == 128


def released_style_config():
    """The field set of the released dots.llm1 config.json (transformers 4.x era)."""
    return {
        "architectures": ["Dots1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 32768,
        "max_window_layers": 62, "model_type": "dots1", "moe_intermediate_size": 1408,
        "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 128, "n_shared_experts": 2,
        "norm_topk_prob": True, "num_attention_heads": 32, "num_experts_per_tok": 6,
        "num_hidden_layers": 62, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000000, "routed_scaling_factor": 2.5,
        "sliding_window": None, "scoring_func": "noaux_tc", "tie_word_embeddings": False,
        "topk_group": 1, "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
        "eos_token_id": 151649, "bos_token_id": None,
    }


def test_released_style_config_is_dots_llm1():
    cfg = DotsConfig.from_hf_config(released_style_config())
    ref = DotsConfig.preset("dots.llm1")
    assert cfg.num_parameters() == ref.num_parameters()
    assert (cfg.rotary_base, cfg.norm_epsilon, cfg.first_k_dense) == (1e7, 1e-5, 1)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"n_group": 4}, "n_group"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"sliding_window": 4096, "max_window_layers": 10}, "sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"some_new_knob": 3}, "some_new_knob"),
        ({"num_attention_heads": 30}, "num_query_groups"),
        ({"attention_bias": True}, "o_proj"),
        ({"hidden_size": "4096"}, "hidden_size"),
        ({"num_hidden_layers": True}, "num_hidden_layers"),
        ({"rope_scaling": "yarn"}, "rope_scaling"),
        ({"rms_norm_eps": [1e-5]}, "rms_norm_eps"),
    ],
)
def test_bad_hf_config_names_file_and_field(tmp_path, change, field):
    data = released_style_config()
    data.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DotsConfigError) as err:
        DotsConfig.from_hf_config(tmp_path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_attention_bias_cannot_be_exported_to_hf():
    # transformers' Dots1 would give o_proj a bias that no Megatron tensor holds.
    with pytest.raises(DotsConfigError, match="o_proj"):
        DotsConfig.preset("dots-tiny", attention_bias=True).to_hf_config()


def test_null_optional_hf_fields_take_their_defaults():
    data = released_style_config()
    data.update(rms_norm_eps=None, routed_scaling_factor=None, initializer_range=None)
    cfg = DotsConfig.from_hf_config(data)
    assert (cfg.norm_epsilon, cfg.routed_scaling_factor, cfg.init_method_std) == (1e-6, 1.0,
                                                                                   0.006)


def test_missing_hf_field_and_file(tmp_path):
    data = released_style_config()
    del data["n_routed_experts"]
    with pytest.raises(DotsConfigError, match="n_routed_experts.*missing"):
        DotsConfig.from_hf_config(data)
    with pytest.raises(DotsConfigError, match="no such file"):
        DotsConfig.from_hf_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DotsConfigError, match="not valid JSON"):
        DotsConfig.from_hf_config(tmp_path)


def test_cpu_initialisation_when_no_cuda():
    tc = DotsConfig.preset("dots-tiny").to_transformer_config()
    assert tc.use_cpu_initialization == (not torch.cuda.is_available())
