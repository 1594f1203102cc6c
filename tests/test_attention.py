"""SDPACoreAttention against Megatron-Core's unfused DotProductAttention (same inputs, fp32)."""

import pytest
import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_dots.model.attention import SDPACoreAttention
from reference import tiny_config


def attention_pair(**overrides):
    tc = tiny_config(**overrides).to_transformer_config()
    kwargs = dict(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal,
                  attention_type="self")
    return tc, SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)


def qkv(tc, s=24, b=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    heads, groups, d = tc.num_attention_heads, tc.num_query_groups, tc.kv_channels
    shapes = ((s, b, heads, d), (s, b, groups, d), (s, b, groups, d))
    return [torch.randn(shape, generator=gen).requires_grad_(True) for shape in shapes]


def run(module, tensors, mask=None, grad=None):
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = module(*inputs, mask)
    out.backward(torch.ones_like(out) if grad is None else grad)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("groups", [4, 2])  # MHA (dots) and grouped-query attention
def test_causal_attention_equals_unfused(seeded, groups):
    tc, sdpa, unfused = attention_pair(num_query_groups=groups)
    tensors = qkv(tc)
    grad = torch.randn(24, 2, tc.num_attention_heads * tc.kv_channels,
                       generator=torch.Generator().manual_seed(1))
    (ours, our_grads), (ref, ref_grads) = run(sdpa, tensors, grad=grad), run(unfused, tensors,
                                                                             grad=grad)
    assert ours.shape == ref.shape == (24, 2, tc.num_attention_heads * tc.kv_channels)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip("qkv", our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # causal: the first position attends to itself only, so its output is its value
    heads = tc.num_attention_heads
    first_value = tensors[2][0].detach().repeat_interleave(heads // groups, dim=1)
    torch.testing.assert_close(ours[0].view(2, heads, -1), first_value)


def test_explicit_mask_follows_megatron_convention(seeded):
    """True = masked out: a padding mask that hides the last 8 keys from every query."""
    tc, sdpa, unfused = attention_pair()
    tensors = qkv(tc)
    mask = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    mask[..., 16:] = True
    mask |= torch.triu(torch.ones(24, 24, dtype=torch.bool), 1)
    ours, _ = run(sdpa, tensors, mask)
    ref, _ = run(unfused, tensors, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # keys past 16 do not matter
    changed = [t.detach().clone() for t in tensors]
    changed[1][16:] += 5.0
    changed[2][16:] += 5.0
    torch.testing.assert_close(run(sdpa, changed, mask)[0], ours)


def test_unsupported_inputs_are_clear_errors(seeded):
    tc, sdpa, _ = attention_pair()
    tensors = qkv(tc)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        sdpa(*tensors, None, packed_seq_params=object())
    with pytest.raises(NotImplementedError, match="attention bias"):
        sdpa(*tensors, None, attention_bias=torch.zeros(1))
