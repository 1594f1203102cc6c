"""Our Megatron-Core dots model against transformers' Dots1ForCausalLM on the same weights, with
the TE-free fast path (``grouped``: grouped-GEMM experts, SDPA) and Megatron-Core's local modules
(``sequential``)."""

import pytest
import torch

from megatron_dots import build_dots_model
from megatron_dots.convert.sharding import load_full_state_dict
from reference import make_hf_model, mcore_full_state, tiny_config

TOLERANCE = 1e-4


def megatron_logits(model, cfg, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., : cfg.vocab_size]


BACKENDS = ("grouped", "sequential")


def build_from_hf(hf_model, cfg, backend="sequential"):
    model = build_dots_model(cfg, backend=backend)
    load_full_state_dict(model, mcore_full_state(hf_model, cfg))
    return model.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_scale,rotary_base", [(0.0, 1e4), (0.5, 1e4), (0.5, 1e7)])
def test_logits_match_hf(seeded, bias_scale, rotary_base, backend):
    cfg = tiny_config(rotary_base=rotary_base)
    hf = make_hf_model(cfg, seed=11, bias_scale=bias_scale)
    model = build_from_hf(hf, cfg, backend)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    ours = megatron_logits(model, cfg, tokens)
    with torch.no_grad():
        ref = hf(tokens).logits
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= TOLERANCE, diff
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors


def test_bias_changes_expert_choice_and_we_follow_it(seeded):
    """The same weights with and without e_score_correction_bias route differently; we match both."""
    cfg = tiny_config()
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(6))
    biased = make_hf_model(cfg, seed=12, bias_scale=0.8)
    unbiased = make_hf_model(cfg, seed=12, bias_scale=0.0)

    chosen = {}
    for name, hf in (("biased", biased), ("unbiased", unbiased)):
        gate = hf.model.layers[cfg.first_k_dense].mlp.gate
        captured = []
        handle = gate.register_forward_hook(lambda m, i, o: captured.append(o[2].sort(-1).values))
        with torch.no_grad():
            ref = hf(tokens).logits
        handle.remove()
        chosen[name] = captured[0]
        ours = megatron_logits(build_from_hf(hf, cfg), cfg, tokens)
        assert (ours - ref).abs().max().item() <= TOLERANCE
    changed = (chosen["biased"] != chosen["unbiased"]).any(-1).float().mean().item()
    assert changed > 0.2, f"bias changed the experts of only {changed:.0%} of tokens"


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loss_and_gradients_match_hf(seeded, backend):
    """Train-mode loss and every parameter gradient equal HF's (aux loss off: HF has none)."""
    from megatron_dots.convert import hf_mapping
    from megatron_dots.convert.sharding import local_grads

    cfg = tiny_config(seq_aux_loss_coeff=0.0)
    hf = make_hf_model(cfg, seed=13, bias_scale=0.3).train()
    model = build_dots_model(cfg, backend=backend).train()
    load_full_state_dict(model, mcore_full_state(hf, cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)

    ours = model(inputs, positions, None, labels=labels).float().mean()
    ours.backward()
    ref = hf(tokens, labels=tokens).loss  # transformers shifts the labels itself
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5, (ours.item(), ref.item())

    hf_grads = hf_mapping.unfuse_hf_experts(
        {name: p.grad for name, p in hf.named_parameters() if p.grad is not None}
    )
    grads = local_grads(model)
    checked = 0
    for key, grad in grads.items():
        sources = hf_mapping.hf_sources(key)
        if not all(s in hf_grads for s in sources):
            continue  # e.g. the expert bias: a buffer, not trained by gradients
        expected = hf_mapping.to_mcore(
            key, [hf_grads[s] for s in sources], cfg, cfg.padded_vocab_size()
        )
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=key)
        checked += 1
    # every parameter (a grouped-experts weight counts once per expert) was compared
    assert checked == len(grads) >= sum(1 for _ in model.parameters())
