"""HF <-> Megatron name/layout mapping: bit-exact round trips and clear errors."""

import pytest
import torch

from megatron_dots.convert import hf_mapping
from reference import hf_state_dict, make_hf_model, tiny_config


@pytest.fixture(scope="module")
def hf_and_cfg():
    cfg = tiny_config(num_query_groups=2)  # GQA exercises the per-group qkv interleave
    return make_hf_model(cfg, seed=21, bias_scale=0.4), cfg


def test_round_trip_is_bit_exact(hf_and_cfg):
    hf, cfg = hf_and_cfg
    original = hf_state_dict(hf)
    full = hf_mapping.hf_to_mcore(original, cfg, padded_vocab_size=cfg.padded_vocab_size(4))
    back = hf_mapping.mcore_to_hf(full, cfg)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


def test_every_hf_tensor_is_used_once(hf_and_cfg):
    hf, cfg = hf_and_cfg
    sources = [s for key in hf_mapping.mcore_keys(cfg) for s in hf_mapping.hf_sources(key)]
    assert sorted(sources) == sorted(hf_state_dict(hf))


def test_qkv_interleave_layout(hf_and_cfg):
    hf, cfg = hf_and_cfg
    sd = hf_state_dict(hf)
    qkv = hf_mapping.hf_to_mcore(sd, cfg, keys=["decoder.layers.0.self_attention.linear_qkv.weight"])
    qkv = next(iter(qkv.values()))
    d, per_group = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    block = (per_group + 2) * d
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    v = sd["model.layers.0.self_attn.v_proj.weight"]
    g = 1  # second query group: [q heads of group 1, k_1, v_1]
    assert torch.equal(qkv[g * block: g * block + per_group * d], q[g * per_group * d: (g + 1) * per_group * d])
    assert torch.equal(qkv[g * block + per_group * d: g * block + (per_group + 1) * d], k[g * d: (g + 1) * d])
    assert torch.equal(qkv[(g + 1) * block - d: (g + 1) * block], v[g * d: (g + 1) * d])


def test_vocab_padding_is_zero_and_stripped(hf_and_cfg):
    hf, cfg = hf_and_cfg
    full = hf_mapping.hf_to_mcore(hf_state_dict(hf), cfg, padded_vocab_size=cfg.vocab_size + 64)
    emb = full["embedding.word_embeddings.weight"]
    assert emb.shape[0] == cfg.vocab_size + 64 and not emb[cfg.vocab_size:].any()
    assert hf_mapping.mcore_to_hf({"output_layer.weight": full["output_layer.weight"]}, cfg)[
        "lm_head.weight"].shape[0] == cfg.vocab_size


def test_te_and_local_names_map_to_the_same_hf_tensors(hf_and_cfg):
    _, cfg = hf_and_cfg
    local = [hf_mapping.hf_sources(k) for k in hf_mapping.mcore_keys(cfg, "sequential")]
    te = [hf_mapping.hf_sources(k) for k in hf_mapping.mcore_keys(cfg, "te")]
    assert sorted(map(tuple, local)) == sorted(map(tuple, te))


def test_fused_expert_layout_round_trip(hf_and_cfg):
    hf, _ = hf_and_cfg
    in_memory = hf.state_dict()
    again = hf_mapping.fuse_hf_experts(hf_mapping.unfuse_hf_experts(in_memory))
    assert set(again) == set(in_memory)
    assert all(torch.equal(again[k], in_memory[k]) for k in in_memory)


def test_errors_name_the_key(hf_and_cfg):
    hf, cfg = hf_and_cfg
    sd = hf_state_dict(hf)
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(hf_mapping.MappingError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        hf_mapping.hf_to_mcore(sd, cfg)
    with pytest.raises(hf_mapping.MappingError, match="decoder.layers.0.mystery"):
        hf_mapping.hf_sources("decoder.layers.0.mystery.weight")
