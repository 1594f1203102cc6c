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
