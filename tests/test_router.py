"""DotsRouter against a float64 reference of the HF gate, and the aux-loss-free bias update."""

import pytest
import torch

from megatron_dots import DotsConfig
from megatron_dots.model.router import DotsRouter
from reference import hf_gate_float64


def make_router(num_experts=16, topk=4, hidden=32, scaling=2.5, rate=1e-3, aux=1e-4):
    cfg = DotsConfig.preset(
        "dots-tiny", hidden_size=hidden, num_moe_experts=num_experts, moe_router_topk=topk,
        routed_scaling_factor=scaling, bias_update_rate=rate, seq_aux_loss_coeff=aux,
    )
    router = DotsRouter(cfg.to_transformer_config())
    router.set_layer_number(1)
    return router


def routed(probs, routing_map):
    """(weights sorted by expert index, expert indices) per token from Megatron's dense form."""
    idx = torch.nonzero(routing_map)[:, 1].view(routing_map.shape[0], -1)
    return probs.gather(1, idx), idx


@pytest.mark.parametrize("bias_scale", [0.0, 0.2, 1.0])
def test_gate_matches_float64_hf_reference(seeded, bias_scale):
    router = make_router()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.3)
        router.expert_bias.copy_((torch.rand(16, generator=gen) * 2 - 1) * bias_scale)
    hidden = torch.randn(24, 3, 32, generator=gen)  # [s, b, h]
    router.eval()
    probs, routing_map = router(hidden)
    ref_w, ref_idx = hf_gate_float64(hidden.view(-1, 32), router.weight, router.expert_bias, 4, 2.5)
    ours_w, ours_idx = routed(probs, routing_map)
    ref_order = ref_idx.sort(dim=1)
    assert torch.equal(ours_idx, ref_order.values)
    torch.testing.assert_close(ours_w.double(), ref_w.gather(1, ref_order.indices),
                               rtol=0, atol=2e-6)
    assert probs.dtype == torch.float32
    # Weights sum to the routed scaling factor: normalised top-k x 2.5.
    torch.testing.assert_close(probs.sum(-1), torch.full((72,), 2.5), rtol=0, atol=1e-5)
    if bias_scale >= 1.0:
        unbiased = torch.topk(torch.sigmoid(hidden.view(-1, 32) @ router.weight.t()), 4).indices
        assert not torch.equal(unbiased.sort(1).values, ours_idx), "bias should change choices"


def test_gate_is_fp32_even_for_bf16_input(seeded):
    router = make_router()
    hidden = torch.randn(8, 2, 32)
    router.eval()
    probs32, map32 = router(hidden)
    probs16, map16 = router(hidden.bfloat16())
    assert probs16.dtype == torch.float32
    # The gate upcasts; only the bf16 rounding of the input differs.
    assert (map16 == map32).float().mean() > 0.9


def test_load_counters_count_training_tokens_only(seeded):
    router = make_router()
    hidden = torch.randn(10, 2, 32)
    router.train()
    _, routing_map = router(hidden)
    assert torch.equal(router.local_tokens_per_expert, routing_map.sum(0).float())
    with torch.no_grad():  # e.g. recomputation or evaluation: not counted
        router(hidden)
    load = router.take_expert_load()
    assert torch.equal(load, routing_map.sum(0).float())
    assert load.sum() == 20 * 4
    assert router.expert_load.sum() == 0


def test_seq_aux_loss_gradient_reaches_gate_weight(seeded):
    router = make_router(aux=0.5)
    router.train()
    hidden = torch.randn(16, 2, 32, requires_grad=True)
    probs, _ = router(hidden)
    # Zero upstream gradient: only the attached sequence aux loss produces a weight gradient.
    (probs * 0).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def apply_bias_update(router):
    """Megatron-Core's own update, as finalize_model_grads runs it."""
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    new = get_updated_expert_bias(
        router.local_tokens_per_expert.clone()[None], router.expert_bias[None],
        router.config.moe_router_bias_update_rate,
    )[0]
    router.expert_bias.copy_(new)
    router.local_tokens_per_expert.zero_()


def test_bias_update_sign_rule_and_rate(seeded):
    rate = 0.01
    router = make_router(num_experts=8, topk=2, rate=rate)
    router.train()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 5.0  # feature 0 pushes every token towards experts 0 and ...
        router.weight[1, 0] = 4.0  # ... 1: a skewed load
    hidden = torch.zeros(32, 1, 32)
    hidden[..., 0] = 1.0
    hidden[..., 1:] = torch.randn(32, 1, 31) * 0.01
    router(hidden)
    load = router.local_tokens_per_expert.clone()
    before = router.expert_bias.clone()
    apply_bias_update(router)
    step = router.expert_bias - before
    mean = load.mean()
    expected = torch.sign(mean - load) * rate
    torch.testing.assert_close(step, expected)
    assert (step[:2] < 0).all() and (step[2:] > 0).all()  # overloaded down, idle up


def test_bias_update_moves_toward_balance(seeded):
    router = make_router(num_experts=8, topk=2, rate=0.01)
    router.train()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.2)
        router.weight[:2, 0] += 2.0  # a feature every token has favours experts 0 and 1
    hidden = torch.randn(64, 2, 32, generator=gen)
    hidden[..., 0] = 1.0

    def imbalance():
        with torch.no_grad():
            _, routing_map = router(hidden)
        load = routing_map.sum(0).float()
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(50):
        router(hidden)
        apply_bias_update(router)
    end = imbalance()
    assert start > 2.5, start
    assert end < 1.25, (start, end)
    # The bias did it: it now disfavours the experts that were overloaded.
    assert router.expert_bias[:2].max() < router.expert_bias[2:].min()


@pytest.mark.parametrize(
    "field,value",
    [("moe_router_score_function", "softmax"), ("moe_router_enable_expert_bias", False),
     ("moe_router_dtype", None)],
)
def test_router_refuses_non_dots_config(seeded, field, value):
    cfg = DotsConfig.preset("dots-tiny").to_transformer_config()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        DotsRouter(cfg)


def test_counters_and_bias_stay_fp32_under_bf16_cast(seeded):
    """Float16Module casts the module with .bfloat16(); bf16 cannot count past 256 exactly."""
    router = make_router(num_experts=4, topk=1).bfloat16()
    assert router.weight.dtype == torch.bfloat16
    for name in ("expert_bias", "local_tokens_per_expert", "expert_load"):
        assert getattr(router, name).dtype == torch.float32, name
    router.train()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.0  # every token to expert 0
    hidden = torch.zeros(257, 1, 32, dtype=torch.bfloat16)
    hidden[..., 0] = 1.0
    router(hidden)
    router(hidden)
    assert router.local_tokens_per_expert[0].item() == 514  # 514 is not a bf16 number
