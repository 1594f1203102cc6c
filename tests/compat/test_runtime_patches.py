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
