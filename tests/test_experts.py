"""TorchGroupedExperts (grouped GEMM experts) against Megatron-Core's SequentialMLP.

The two backends are built from the same seed: weights must be identical, and the grouped
experts must give the sequential experts' outputs and gradients (fp32: to rounding; bf16: to
bf16 tolerance), also with experts that receive no tokens, with delayed weight gradients, and
through distributed checkpoints written by one backend and read by the other. EP / expert-TP
layouts are covered by tests/test_parallel.py (``grouped-*`` layouts).
"""

import pytest
import torch

from megatron_dots import build_dots_model
from megatron_dots.model.experts import TorchGroupedExperts
from megatron_dots.model.grouped_gemm import (
    group_offsets,
    grouped_linear,
    grouped_weight_grad,
    kernel_for,
)
from reference import tiny_config

COUNTS = [5, 0, 17, 1, 0, 9, 30, 2]  # 8 experts, two without tokens


def reference_linear(x, weight, counts):
    chunks = torch.split(x.double(), counts)
    return torch.cat([c @ w.double().t() for c, w in zip(chunks, weight)])


@pytest.mark.parametrize("dtype,kernel", [(torch.float32, "grouped_mm"),
                                          (torch.bfloat16, "grouped_mm"),
                                          (torch.float64, "loop")])
def test_grouped_gemms_against_float64(dtype, kernel):
    gen = torch.Generator().manual_seed(0)
    tokens, n, k = sum(COUNTS), 24, 16
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    weight = torch.randn(len(COUNTS), n, k, generator=gen).to(dtype)
    dy = torch.randn(tokens, n, generator=gen).to(dtype)
    offs = group_offsets(torch.tensor(COUNTS), x.device)
    assert kernel_for(x, weight.transpose(1, 2)) == kernel
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]

    out = grouped_linear(x, weight, offs)
    expected = reference_linear(x, weight, COUNTS)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 4)

    wgrad = grouped_weight_grad(dy, x, offs, COUNTS)
    expected_w = torch.stack([d.double().t() @ c.double() if len(c) else torch.zeros(n, k).double()
                              for d, c in zip(torch.split(dy, COUNTS), torch.split(x, COUNTS))])
    torch.testing.assert_close(wgrad.double(), expected_w, rtol=tol, atol=tol * 8)
    assert wgrad[1].abs().max() == 0 and wgrad[4].abs().max() == 0  # experts without tokens


def test_unaligned_operands_take_the_loop():
    x = torch.randn(10, 6)  # 24-byte rows: not 16-byte aligned for the grouped kernel
    weight = torch.randn(2, 4, 6)
    assert kernel_for(x, weight.transpose(1, 2)) == "loop"
    offs = group_offsets(torch.tensor([3, 7]), x.device)
    torch.testing.assert_close(grouped_linear(x, weight, offs).double(),
                               reference_linear(x, weight, [3, 7]), rtol=1e-5, atol=1e-6)


def build_pair(**overrides):
    """The same tiny model built with both backends from one seed."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cfg = tiny_config(**overrides)
    models = {}
    for backend in ("sequential", "grouped"):
        torch.manual_seed(7)
        model_parallel_cuda_manual_seed(7)
        models[backend] = build_dots_model(cfg, backend=backend)
    return cfg, models


def experts_of(model, layer=1):
    return model.decoder.layers[layer].mlp.experts


def test_grouped_init_equals_sequential(seeded):
    _, models = build_pair()
    grouped, sequential = experts_of(models["grouped"]), experts_of(models["sequential"])
    assert isinstance(grouped, TorchGroupedExperts)
    for e, expert in enumerate(sequential.local_experts):
        assert torch.equal(grouped.weight1[e], expert.linear_fc1.weight)
        assert torch.equal(grouped.weight2[e], expert.linear_fc2.weight)
    for param in (grouped.weight1, grouped.weight2):
        assert param.allreduce is True and param.tensor_model_parallel  # EP=1: dense DP
    assert grouped.weight1.partition_dim == 1 and grouped.weight2.partition_dim == 2


def run_experts(experts, x, probs, counts):
    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    out, bias = experts(x, torch.tensor(counts), probs)
    assert bias is None
    gen = torch.Generator().manual_seed(3)
    out.backward(torch.randn(out.shape, generator=gen).to(out.dtype))
    return out.detach(), x.grad, probs.grad


def expert_grads(experts):
    if isinstance(experts, TorchGroupedExperts):
        return experts.weight1.grad, experts.weight2.grad
    return (torch.stack([e.linear_fc1.weight.grad for e in experts.local_experts]),
            torch.stack([e.linear_fc2.weight.grad for e in experts.local_experts]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_sequential(seeded, dtype):
    cfg, models = build_pair()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(COUNTS), cfg.hidden_size, generator=gen).to(dtype)
    probs = torch.rand(sum(COUNTS), generator=gen)  # the router's fp32 weights
    results = {}
    for backend, model in models.items():
        experts = experts_of(model).to(dtype)
        results[backend] = (*run_experts(experts, x, probs, COUNTS), *expert_grads(experts))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    names = ("output", "input grad", "probs grad", "fc1 grad", "fc2 grad")
    for name, ours, ref in zip(names, results["grouped"], results["sequential"]):
        assert ours.dtype == ref.dtype, name
        torch.testing.assert_close(ours.float(), ref.float(), **tol, msg=name)
        assert ref.abs().max() > 0, name
    # experts without tokens get exact zero weight gradients, not garbage
    for grad in results["grouped"][3:]:
        assert grad[1].abs().max() == 0 and grad[4].abs().max() == 0


def test_no_tokens_at_all(seeded):
    cfg, models = build_pair()
    experts = experts_of(models["grouped"])
    x = torch.zeros(0, cfg.hidden_size, requires_grad=True)
    out, _ = experts(x, torch.zeros(cfg.num_moe_experts, dtype=torch.long), torch.zeros(0))
    out.sum().backward()
    assert out.shape == (0, cfg.hidden_size)
    assert experts.weight1.grad.abs().max() == 0 and experts.weight2.grad.abs().max() == 0


def test_token_count_mismatch_is_an_error(seeded):
    cfg, models = build_pair()
    experts = experts_of(models["grouped"])
    with pytest.raises(ValueError, match="tokens_per_expert sums to 3 but 4 tokens"):
        experts(torch.randn(4, cfg.hidden_size), torch.tensor([3] + [0] * 7), torch.rand(4))


def test_delayed_weight_gradients(seeded):
    """With delay_wgrad the backward leaves weight grads for backward_dw(), which gives the
    immediate path's gradients (over two micro-batches) and runs the registered DDP hooks."""
    cfg, models = build_pair()
    experts = experts_of(models["grouped"])
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(sum(COUNTS), cfg.hidden_size, generator=gen),
                torch.rand(sum(COUNTS), generator=gen)) for _ in range(2)]

    immediate = []
    for x, probs in batches:
        immediate.append(run_experts(experts, x, probs, COUNTS))
    expected = [g.clone() for g in expert_grads(experts)]

    experts.weight1.grad = experts.weight2.grad = None
    experts.delay_wgrad = True
    calls = []
    experts.register_wgrad_accumulation_and_reduce_hooks(lambda: calls.append(1))
    for (x, probs), (out, dx, dprobs) in zip(batches, immediate):
        delayed = run_experts(experts, x, probs, COUNTS)
        assert experts.weight1.grad is None and experts.weight2.grad is None
        for a, b in zip(delayed, (out, dx, dprobs)):
            assert torch.equal(a, b)  # dgrad is unchanged by the split
    experts.backward_dw()
    assert calls == [1]
    for ours, ref in zip(expert_grads(experts), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    experts.backward_dw()  # nothing pending: no change
    for ours, ref in zip(expert_grads(experts), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_delayed_weight_gradients_into_main_grad(seeded):
    """Without module hooks (DDP hooked the parameters), backward_dw adds into main_grad."""
    cfg, models = build_pair()
    experts = experts_of(models["grouped"])
    x = torch.randn(sum(COUNTS), cfg.hidden_size)
    probs = torch.rand(sum(COUNTS))
    run_experts(experts, x, probs, COUNTS)
    expected = [g.clone() for g in expert_grads(experts)]
    experts.weight1.grad = experts.weight2.grad = None
    for param in (experts.weight1, experts.weight2):
        param.main_grad = torch.ones_like(param)
    experts.delay_wgrad = True
    run_experts(experts, x, probs, COUNTS)
    experts.backward_dw()
    assert experts.weight1.grad is None
    torch.testing.assert_close(experts.weight1.main_grad, expected[0] + 1)
    torch.testing.assert_close(experts.weight2.main_grad, expected[1] + 1)


def sharded_layout(model):
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    layout = {}

    def visit(value):
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, ShardedTensor):
            layout.setdefault(value.key, set()).add(
                (value.global_shape, value.global_offset, value.local_shape))
        elif isinstance(value, ShardedObject):
            layout.setdefault(value.key, set()).add((value.global_shape, value.global_offset))

    visit(sharded)
    return layout


def test_sharded_state_dict_matches_sequential(seeded):
    """Both backends write the same global tensors (keys, shapes) and _extra_state objects."""
    _, models = build_pair()
    grouped, sequential = sharded_layout(models["grouped"]), sharded_layout(models["sequential"])
    assert set(grouped) == set(sequential)
    expert_key = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    assert expert_key in grouped
    for key in grouped:
        ours = {entry[0] for entry in grouped[key]}  # global shapes agree
        assert ours == {entry[0] for entry in sequential[key]}, key


@pytest.mark.parametrize("save_with,load_with", [("grouped", "sequential"),
                                                 ("sequential", "grouped")])
def test_checkpoints_load_across_backends(seeded, tmp_path, save_with, load_with):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_dots.convert.sharding import local_tensors
    from megatron_dots.training.checkpointing import load_checkpoint, save_checkpoint

    cfg, models = build_pair()
    with torch.no_grad():
        for param in models[save_with].parameters():
            param.add_(torch.randn_like(param) * 0.1)
    path = save_checkpoint([models[save_with]], str(tmp_path), 1, cfg)
    torch.manual_seed(99)
    model_parallel_cuda_manual_seed(99)
    target = build_dots_model(cfg, backend=load_with)
    load_checkpoint([target], path, load_rng=False)
    saved = {key: t for _, key, t in local_tensors(models[save_with])}
    loaded = {key: t for _, key, t in local_tensors(target)}
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key


@pytest.mark.parametrize("overlap_grad_reduce", [False, True])
def test_delayed_weight_gradients_through_megatron_ddp(seeded, overlap_grad_reduce):
    """Megatron-Core DDP with delay_wgrad_compute hooks the experts module instead of its
    weights: after backward the expert main_grads are still empty, backward_dw fills them with
    what the immediate path gives (and, with overlapped reduction, marks them ready)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_dots.training.step import wrap_with_ddp

    cfg, immediate = build_pair()
    _, delayed = build_pair()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(16).expand(2, 16)
    grads = {}
    for name, model in (("immediate", immediate["grouped"]), ("delayed", delayed["grouped"])):
        experts = [m for m in model.modules() if isinstance(m, TorchGroupedExperts)]
        if name == "delayed":
            for module in experts:
                module.delay_wgrad = True
                module.weight1.skip_backward_post_hook = True
                module.weight2.skip_backward_post_hook = True
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
            delay_wgrad_compute=name == "delayed")
        (ddp,) = wrap_with_ddp([model], model.config, ddp_config)
        ddp.zero_grad_buffer()
        loss = ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        if name == "delayed":
            assert all(m.weight1.main_grad.abs().max() == 0 for m in experts)
            for module in experts:
                module.backward_dw()
        ddp.finish_grad_sync()
        grads[name] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    assert grads["immediate"].keys() == grads["delayed"].keys()
    for key, expected in grads["immediate"].items():
        torch.testing.assert_close(grads["delayed"][key], expected, rtol=1e-6, atol=1e-8,
                                   msg=key)
    assert grads["immediate"]["decoder.layers.1.mlp.experts.weight1"].abs().max() > 0


def test_kernel_refusal_falls_back_to_the_loop(monkeypatch, caplog):
    """If torch's kernel raises on operands that passed the checks, the loop takes over (once
    warned) and the result is still right."""
    from megatron_dots.model import grouped_gemm

    def refuse(*args, **kwargs):
        raise RuntimeError("no grouped GEMM kernel for this device")

    monkeypatch.setattr(grouped_gemm, "_GROUPED_MM", refuse)
    monkeypatch.setattr(grouped_gemm, "_REFUSED", set())
    x = torch.randn(sum(COUNTS), 16)
    weight = torch.randn(len(COUNTS), 24, 16)
    offs = group_offsets(torch.tensor(COUNTS), x.device)
    assert kernel_for(x, weight.transpose(1, 2)) == "grouped_mm"
    with caplog.at_level("WARNING"):
        out = grouped_linear(x, weight, offs)
    torch.testing.assert_close(out.double(), reference_linear(x, weight, COUNTS),
                               rtol=1e-5, atol=1e-5)
    assert "refused" in caplog.text and kernel_for(x, weight.transpose(1, 2)) == "loop"
