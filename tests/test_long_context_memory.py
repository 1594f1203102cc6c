"""Long-context activation memory on the TE-free path (bench/long_context_memory.py at small
width, CPU): what each layer keeps for backward grows linearly in the sequence length, matches
`plan.activations`' analytic model, and holds no s x s tensor, also when Megatron-LM's
dataloader hands the layers its causal mask; `SDPACoreAttention` runs that mask as SDPA's
``is_causal`` with the same outputs and gradients as the unfused reference."""

import os
import sys

import pytest
import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from launch import REPO_ROOT
from megatron_dots.model import attention as sdpa_attention
from megatron_dots.model.attention import (
    CausalMaskCheck, SDPACoreAttention, is_plain_causal_mask)
from reference import tiny_config

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))

import long_context_memory as bench  # noqa: E402

LENGTHS = (1024, 2048, 4096)
NOISE = 0.01  # the counter tells storages apart by address and size (a few KB of reuse)


@pytest.fixture(scope="module")
def model(single_process_world):
    return bench.build_model("dots-tiny", 2, None, "fp32", torch.device("cpu"), max(LENGTHS))


@pytest.fixture(scope="module")
def records(model):
    cfg, gpt = model
    return {(s, mask): bench.annotate(cfg, bench.measure(cfg, gpt, s, mask), "fp32")
            for s in LENGTHS for mask in ("none", "causal")}


def test_saved_bytes_per_layer_grow_linearly_and_stay_far_below_one_score_matrix(records):
    kinds = set()
    for s in LENGTHS[:-1]:
        short, long = records[(s, "none")], records[(2 * s, "none")]
        for number, entry in long["layers"].items():
            kinds.add(entry["kind"])
            for region in bench.REGIONS + ("measured_total",):
                once, twice = short["layers"][number][region], entry[region]
                assert twice > 0 and abs(twice - 2 * once) <= NOISE * twice, (s, number, region)
    assert kinds == {"dense", "moe"}
    s = LENGTHS[-1]
    for entry in records[(s, "none")]["layers"].values():
        # one s x s fp32 matrix is 64 MiB at 4096; the attention core keeps 3 MiB, the layer 25
        assert entry["attn_core"] < records[(s, "none")]["one_score_matrix_fp32"] / 16
        assert entry["measured_total"] < records[(s, "none")]["one_score_matrix_fp32"] / 2
        # what Megatron-Core's unfused attention would keep: at least every head's fp32 scores
        assert entry["unfused_attn_core_predicted"] >= records[(s, "none")][
            "all_heads_scores_fp32"]


def test_saved_bytes_match_the_analytic_model_per_region(records):
    for (s, mask), record in records.items():
        for number, entry in record["layers"].items():
            for region in bench.REGIONS:
                predicted, measured = entry["predicted"][region], entry[region]
                assert abs(predicted - measured) <= NOISE * max(measured, 1), (
                    s, mask, number, region, predicted, measured)


def test_megatron_lm_causal_mask_keeps_no_s_by_s_tensor(records, model, monkeypatch):
    """The dataloader's [1, 1, s, s] mask: the same bytes as without it. Applied as a general
    mask instead (what happened before `CausalMaskCheck`), SDPA keeps an s x s float bias in
    every layer: the counter sees it, so the comparison above can fail."""
    for s in LENGTHS:
        plain, masked = records[(s, "none")], records[(s, "causal")]
        for number, entry in masked["layers"].items():
            expected = plain["layers"][number]["measured_total"]
            assert abs(entry["measured_total"] - expected) <= NOISE * expected, (s, number)
    cfg, gpt = model
    monkeypatch.setattr(SDPACoreAttention, "_runs_as_causal", staticmethod(lambda *a: False))
    s = LENGTHS[0]
    general = bench.measure(cfg, gpt, s, "causal")
    for number, entry in general["layers"].items():
        extra = entry["attn_core"] - records[(s, "none")]["layers"][number]["attn_core"]
        assert extra >= 4 * s * s, (number, extra)


def attention_pair():
    tc = tiny_config().to_transformer_config()
    kwargs = dict(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal,
                  attention_type="self")
    return tc, SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)


def run(module, tensors, mask):
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = module(*inputs, mask)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), [t.grad for t in inputs]


def test_causal_mask_runs_as_is_causal_with_the_unfused_numerics(seeded, monkeypatch):
    tc, sdpa, unfused = attention_pair()
    gen = torch.Generator().manual_seed(3)
    s, b, heads, d = 40, 2, tc.num_attention_heads, tc.kv_channels
    tensors = [torch.randn(s, b, heads, d, generator=gen) for _ in range(3)]
    mask = bench.causal_mask(s, torch.device("cpu")).expand(b, 1, s, s)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention.F, "scaled_dot_product_attention", spy)
    ours, our_grads = run(sdpa, tensors, mask)
    assert calls[-1].get("is_causal") is True and "attn_mask" not in calls[-1]
    ref, ref_grads = run(unfused, tensors, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b_ in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
    # a mask that differs in one element is applied as given
    other = mask.clone()
    other[1, 0, s - 1, 0] = True
    masked, _ = run(sdpa, tensors, other)
    assert "attn_mask" in calls[-1]
    torch.testing.assert_close(masked[:, 0], ours[:, 0])
    assert not torch.allclose(masked[s - 1, 1], ours[s - 1, 1])


def test_plain_causal_mask_check(monkeypatch):
    s = 37
    causal = bench.causal_mask(s, torch.device("cpu"))
    monkeypatch.setattr(sdpa_attention, "_CHECK_BLOCK_ELEMENTS", 3 * s)  # several row blocks
    assert is_plain_causal_mask(causal) and is_plain_causal_mask(causal.expand(3, 1, s, s))
    assert is_plain_causal_mask(causal[0, 0])
    for row, col in ((0, 0), (5, 6), (36, 0), (20, 21)):
        changed = causal.clone()
        changed[0, 0, row, col] = ~changed[0, 0, row, col]
        assert not is_plain_causal_mask(changed), (row, col)
    assert not is_plain_causal_mask(causal.float())
    assert not is_plain_causal_mask(causal[..., :-1])  # not square
    # remembered per tensor; an in-place change or another tensor is checked again
    check, seen = CausalMaskCheck(), []
    monkeypatch.setattr(sdpa_attention, "is_plain_causal_mask",
                        lambda m: seen.append(1) or is_plain_causal_mask(m))
    assert check(causal) and check(causal) and check(causal.detach()) and len(seen) == 1
    causal[0, 0, 3, 2] = True
    assert not check(causal) and len(seen) == 2
    assert check(bench.causal_mask(s, torch.device("cpu"))) and len(seen) == 3
