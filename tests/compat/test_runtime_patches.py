"""Runtime patches (megatron_dots/compat/runtime_patches.py): each one fails without the patch."""

import glob
import json
import os
import textwrap

import pytest
import torch

from launch import describe, python_snippet, torchrun
from megatron_dots.compat.runtime_patches import (
    applied_patches,
    apply_runtime_patches,
    as_split_sizes,
)
from megatron_dots.compat.versions import HAVE_TE, MCORE_016


def test_apply_is_idempotent_and_reports_sites():
    first = apply_runtime_patches()
    second = apply_runtime_patches()
    assert first == second == applied_patches()
    for site, description in applied_patches(include_skipped=True):
        assert site.startswith("megatron/core/") and description
    from megatron.core.tensor_parallel.mappings import _AllToAll

    fwd = _AllToAll.forward
    assert getattr(fwd, "__megatron_dots_patched__", False)
    # not wrapped twice
    assert not getattr(fwd.__wrapped_original__, "__megatron_dots_patched__", False)


@pytest.mark.skipif(HAVE_TE, reason="the defect only shows without Transformer Engine")
def test_te_general_gemm_nameerror_without_patch():
    """moe_utils.py (0.16.1): RouterGatingLinearFunction uses te_general_gemm unbound w/o TE."""
    code = textwrap.dedent(
        """
        import json, torch
        from megatron.core.transformer.moe import moe_utils
        inp = torch.randn(3, 5, 8, requires_grad=True)
        w = torch.randn(4, 8, requires_grad=True)
        res = {"defined_before": hasattr(moe_utils, "te_general_gemm")}
        try:
            moe_utils.router_gating_linear(inp, w, None, torch.float32)
            res["unpatched"] = "ok"
        except NameError as exc:
            res["unpatched"] = "NameError: " + str(exc)
        from megatron_dots.compat.runtime_patches import apply_runtime_patches
        apply_runtime_patches()
        out = moe_utils.router_gating_linear(inp, w, None, torch.float32)
        out.sum().backward()
        res["patched_close"] = bool(torch.allclose(out, inp @ w.t(), atol=1e-6))
        want = torch.ones(3 * 5, 4).t() @ inp.detach().reshape(-1, 8)
        res["grad_close"] = bool(torch.allclose(w.grad, want, atol=1e-5))
        print("RESULT" + json.dumps(res))
        """
    )
    proc = python_snippet(code)
    assert proc.returncode == 0, describe(proc)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    if res["defined_before"]:
        pytest.skip("te_general_gemm already defined in this megatron-core release (fixed)")
    assert res["unpatched"].startswith("NameError") and "te_general_gemm" in res["unpatched"]
    assert res["patched_close"] and res["grad_close"]


def test_as_split_sizes():
    import numpy as np

    assert as_split_sizes(None) is None
    for value in (torch.tensor([1, 2]), np.array([1, 2]), (1, 2), [np.int64(1), 2]):
        out = as_split_sizes(value)
        assert out == [1, 2] and all(type(v) is int for v in out)


def test_all_to_all_tensor_split_sizes_gloo(tmp_path):
    """mappings.py:_AllToAll.forward with tensor split sizes: TypeError unpatched, ok patched."""
    proc = torchrun("compat/a2a_split_worker.py", 2, str(tmp_path), timeout=120)
    assert proc.returncode == 0, describe(proc)
    results = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(tmp_path, "rank*.json")))]
    assert len(results) == 2
    for res in results:
        assert res["unpatched"].startswith("TypeError"), res
        assert "all_to_all_single" in res["unpatched"], res
        for kind, status in res["patched"].items():
            assert status == {"equal": True, "grad_ok": True}, (kind, res)
    assert results[0]["expected"] == [0.0, 1.0, 10.0, 11.0, 12.0]
    assert results[1]["expected"] == [2.0, 3.0, 4.0, 5.0, 13.0, 14.0, 15.0]


def test_sites_exist_on_016():
    if not MCORE_016:
        pytest.skip("site list checked on megatron-core 0.16")
    sites = [s for s, _ in applied_patches()]
    assert "megatron/core/tensor_parallel/mappings.py:_AllToAll.forward" in sites
    if not HAVE_TE:
        assert any("te_general_gemm" in s for s in sites)


def test_aux_loss_scale_after_a_bare_backward():
    """A plain backward through an aux loss leaves a 0-d scale; the schedule's [1]-shaped
    set_loss_scale then fails upstream (0.16.1 and 0.19.2) and works with the patch."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    apply_runtime_patches()
    original = MoEAuxLossAutoScaler.set_loss_scale.__wrapped_original__
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    try:
        for setter, should_fail in ((original, True), (MoEAuxLossAutoScaler.set_loss_scale, False)):
            MoEAuxLossAutoScaler.main_loss_backward_scale = None
            out = torch.ones(3, requires_grad=True)
            aux = (out * 2).sum()
            MoEAuxLossAutoScaler.apply(out, aux).sum().backward()  # a bare backward
            assert MoEAuxLossAutoScaler.main_loss_backward_scale.dim() == 0
            if should_fail:
                with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
                    setter(torch.tensor([0.5]))
            else:
                setter(torch.tensor([0.5]))
                assert MoEAuxLossAutoScaler.main_loss_backward_scale.tolist() == [0.5]
                setter(torch.tensor([0.25]))  # later steps copy into it as upstream does
                assert MoEAuxLossAutoScaler.main_loss_backward_scale.tolist() == [0.25]
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = saved


def _combined_step_postprocess_calls(schedule_fn, b_virtual_microbatch_id, monkeypatch):
    """Which backward post-processings `schedule_fn` (a combined_1f1b interleaved step) runs
    for a backward-only step of `b_virtual_microbatch_id` (chunk = id % 2); the combined
    forward/backward itself is stubbed out."""
    from megatron.core.pipeline_parallel import combined_1f1b

    monkeypatch.setattr(combined_1f1b, "combined_forward_backward_step",
                        lambda *args, **kwargs: (None, None, None))
    calls = []
    schedule_fn(
        config=type("Config", (), {"high_priority_a2a_comm_stream": False})(),
        forward_step_func=None, data_iterator=[None, None], model=[object(), object()],
        num_microbatches=4, forward_data_store=[],
        forward_step_helper_preprocess=None, forward_step_helper_postprocess=None,
        backward_step_helper_preprocess=lambda vmb, chunk: (None, None, None),
        backward_step_helper_postprocess=calls.append,
        get_microbatch_id_in_model_chunk=lambda vmb, forward: vmb // 2,
        get_model_chunk_id=lambda vmb, forward: vmb % 2,
        check_first_val_step=lambda value: value,
        is_first_microbatch_for_model_chunk=lambda vmb: vmb < 2,
        collect_non_loss_data=False,
        f_virtual_microbatch_id=None, b_virtual_microbatch_id=b_virtual_microbatch_id,
    )
    return calls


def test_combined_1f1b_runs_backward_postprocess_for_chunk_0(monkeypatch):
    """combined_1f1b.py (0.16.1) skips the backward post-processing (the overlapped grad-sync
    launch) when the backward chunk is 0; with the patch (or on 0.19) it runs once per step."""
    from megatron.core.pipeline_parallel import combined_1f1b, schedules

    apply_runtime_patches()
    current = combined_1f1b.combined_1f1b_schedule_for_interleaved_pipelining
    assert schedules.combined_1f1b_schedule_for_interleaved_pipelining is current
    for vmb in (4, 5):  # chunk 0, chunk 1
        assert _combined_step_postprocess_calls(current, vmb, monkeypatch) == [vmb]
    original = getattr(current, "__wrapped_original__", None)
    if MCORE_016:
        assert original is not None, "patch 4 not applied on megatron-core 0.16"
        assert _combined_step_postprocess_calls(original, 4, monkeypatch) == []  # the defect
        assert _combined_step_postprocess_calls(original, 5, monkeypatch) == [5]
    else:
        assert original is None  # fixed upstream: not patched


def test_row_parallel_linear_backward_dw():
    """layers.py (0.16.1): RowParallelLinear has no backward_dw, so delay_wgrad_compute's
    Attention/MLP.backward_dw raise AttributeError on the local path; the patch adds the no-op
    ColumnParallelLinear already has."""
    proc = python_snippet(
        "from megatron.core.tensor_parallel.layers import RowParallelLinear as R\n"
        "print('RESULT', hasattr(R, 'backward_dw'))\n"
        "import megatron_dots\n"
        "print('RESULT', hasattr(R, 'backward_dw'), "
        "getattr(R.backward_dw, '__megatron_dots_patched__', False))\n")
    assert proc.returncode == 0, describe(proc)
    lines = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if MCORE_016:
        assert lines == [["False"], ["True", "True"]]
    else:
        assert lines == [["True"], ["True", "False"]]  # upstream has it: left alone


# Patches 6-9: the distributed optimizer with torch's Adam (no apex / Transformer Engine).
distrib_optimizer = pytest.importorskip("megatron.core.optimizer.distrib_optimizer")
needs_torch_adam = pytest.mark.skipif(
    distrib_optimizer.HAVE_APEX_OR_TE, reason="the defect is in the torch-optimizer branch")


def _distributed(bucket_size=None, steps=0):
    from tiny_optimizer import one_step, tiny_chunks_and_optimizer

    chunks, optimizer, _ = tiny_chunks_and_optimizer(distributed=True, bucket_size=bucket_size)
    for step in range(steps):
        one_step(chunks, optimizer, seed=step)
    return chunks, optimizer.chained_optimizers[0]


def _original(monkeypatch, name):
    cls = distrib_optimizer.DistributedOptimizer
    monkeypatch.setattr(cls, name, getattr(cls, name).__wrapped_original__)


@needs_torch_adam
def test_distributed_optimizer_state_dict_before_its_first_step(seeded, monkeypatch):
    """Patch 6: loading a checkpoint builds the state dict of a fresh optimizer first."""
    _, optimizer = _distributed()
    groups = optimizer.state_dict()["optimizer"]["param_groups"]
    assert groups and all(group["step"] == 0 for group in groups)
    _original(monkeypatch, "state_dict")
    with pytest.raises(AssertionError):
        optimizer.state_dict()


@needs_torch_adam
def test_fully_reshardable_state_belongs_to_its_parameters(seeded, monkeypatch):
    """Patch 7: with several buckets the saved fp32 main weight of each parameter must be that
    parameter's (fp32 model: equal to the model weight); upstream saves other parameters'
    after the first bucket and zero-pads the last."""
    chunks, optimizer = _distributed(bucket_size=20000, steps=1)
    assert len(optimizer.buffers[0].buckets) > 3
    model_sd = chunks[0].module.sharded_state_dict()
    # The state is numbered in the buffer's parameter order.
    params = [p for buffer in optimizer.buffers for p in buffer.param_index_map]

    def wrong_main_weights():
        state = optimizer.sharded_param_state_fully_reshardable(model_sd, False, {})
        wrong = [i for i, tensors in state.items()
                 if not torch.equal(tensors["param"].data, params[i].detach().float())]
        return wrong, len(state)

    wrong, total = wrong_main_weights()
    assert not wrong and total > 20
    method = distrib_optimizer.DistributedOptimizer.sharded_param_state_fully_reshardable
    if not getattr(method, "__megatron_dots_patched__", False):
        # Fixed upstream (megatron-core 0.20): the patch stood down and said so.
        assert any("sharded_param_state_fully_reshardable" in site and "fixed upstream" in why
                   for site, why in applied_patches(include_skipped=True))
        return
    _original(monkeypatch, "sharded_param_state_fully_reshardable")
    wrong, _ = wrong_main_weights()
    assert len(wrong) > total // 2


@needs_torch_adam
def test_set_main_param_and_optimizer_states_without_step(seeded, monkeypatch):
    """Patch 8: the fully reshardable load hands over param / exp_avg / exp_avg_sq only."""
    chunks, optimizer = _distributed(steps=1)
    param = next(p for p in chunks[0].module.parameters() if p.requires_grad)
    tensors = {k: v.clone() for k, v in  # what the fully reshardable loader passes
               optimizer._get_main_param_and_optimizer_states(param).items() if k != "step"}
    tensors["exp_avg"].fill_(0.5)
    with torch.no_grad():  # as upstream's loaders call it
        optimizer._set_main_param_and_optimizer_states(param, tensors)
        after = optimizer._get_main_param_and_optimizer_states(param)
        assert torch.equal(after["exp_avg"], tensors["exp_avg"])
        _original(monkeypatch, "_set_main_param_and_optimizer_states")
        with pytest.raises(KeyError, match="step"):
            optimizer._set_main_param_and_optimizer_states(param, tensors)


@needs_torch_adam
def test_loaded_adam_steps_are_per_parameter(seeded, monkeypatch):
    """Patch 9: after load_state_dict every parameter's step is its own tensor; a shared one
    is advanced once per parameter by torch's Adam."""
    chunks, optimizer = _distributed(steps=1)

    def steps_after_load_and_step():
        optimizer.load_state_dict(optimizer.state_dict())
        states = list(optimizer.optimizer.state.values())
        shared = len({id(state["step"]) for state in states}) == 1
        optimizer.step()
        return shared, sorted({state["step"].item() for state in states})

    assert steps_after_load_and_step() == (False, [2.0])
    _original(monkeypatch, "load_state_dict")
    shared, steps = steps_after_load_and_step()
    assert shared and steps[0] > 10


def test_expert_bias_count_takes_a_padding_mask(seeded, monkeypatch):
    """Patch 10: a router with a padding mask counts only the real tokens for the bias update
    (megatron-core 0.16.1 / 0.19.2 fail to broadcast the mask over the experts)."""
    from megatron.core.transformer.moe import router as router_module

    from megatron_dots.model.router import DotsRouter
    from reference import tiny_config

    tc = tiny_config().to_transformer_config()
    router = DotsRouter(tc).train()
    router.set_layer_number(2)
    tokens = torch.randn(12, 1, tc.hidden_size)
    padding = torch.zeros(1, 12, dtype=torch.bool)
    padding[0, 7:] = True

    def count(pad):
        router.local_tokens_per_expert.zero_()
        _, routing_map = router(tokens, padding_mask=pad)
        return router.local_tokens_per_expert.clone(), routing_map

    counted, routing_map = count(padding.transpose(0, 1))
    assert counted.sum().item() == 7 * tc.moe_router_topk
    assert torch.equal(counted, routing_map[:7].sum(0).float())
    current = router_module.TopKRouter.__dict__["_apply_expert_bias"]
    if not getattr(current, "__megatron_dots_patched__", False):
        return  # megatron-core with the fix: nothing to undo
    original = current.__wrapped_original__
    monkeypatch.setattr(router_module.TopKRouter, "_apply_expert_bias",
                        getattr(original, "_torchdynamo_orig_callable", original))
    with pytest.raises(RuntimeError, match="must match the size"):
        count(padding.transpose(0, 1))
