"""Megatron-Core GPT MoE training on CPU + gloo through the CPU backend, via torchrun.

A single-process reference run (TP=PP=EP=1) initialises a tiny model with a fixed seed, saves
its full state dict and records per-sample losses, grad norms and router expert biases for 2
iterations. Each 2-process layout loads its shards of that state dict and must reproduce the
reference: losses to 1e-5, grad norms to 1e-5 (relative), expert biases exactly.
Every iteration is ``get_forward_backward_func()`` over Megatron DDP chunks +
``finalize_model_grads`` (incl. the router expert-bias update) + Megatron optimizer step.
"""

import glob
import json
import os

import pytest
import torch

from launch import describe, torchrun

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo tests")

WORKER = "compat/mcore_cpu_worker.py"
LOSS_ATOL = 1e-5


def _records(out_dir):
    files = sorted(glob.glob(os.path.join(out_dir, "rank*.json")))
    return [json.load(open(f)) for f in files]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore_cpu_ref")
    ref_dir, out = str(root / "ref"), str(root / "out")
    proc = torchrun(WORKER, 1, "--layout", "ref", "--ref-dir", ref_dir, "--out", out, timeout=120)
    assert proc.returncode == 0, describe(proc)
    (record,) = _records(out)
    assert len(record["losses"]) == 8  # 2 iterations x 4 samples
    # the expert-bias update ran (sign updates of +-rate)
    assert any(abs(b) > 0 for biases in record["expert_bias"].values() for b in biases)
    return ref_dir, record


@pytest.mark.parametrize("layout", ["tp2sp", "ep2", "pp2", "pp2vpp2"])
def test_layout_matches_single_process(layout, reference, tmp_path):
    ref_dir, ref = reference
    out = str(tmp_path / layout)
    proc = torchrun(WORKER, 2, "--layout", layout, "--ref-dir", ref_dir, "--out", out, timeout=150)
    assert proc.returncode == 0, describe(proc)
    records = _records(out)
    assert len(records) == 2

    seen = {}
    for rec in records:
        for key, loss in rec["losses"].items():
            assert abs(loss - ref["losses"][key]) <= LOSS_ATOL, (layout, rec["rank"], key, loss)
            seen[key] = loss
        for got, want in zip(rec["grad_norms"], ref["grad_norms"]):
            assert got == pytest.approx(want, rel=1e-5), (layout, rec["grad_norms"])
        assert len(rec["grad_norms"]) == 2
        for key, bias in rec["expert_bias"].items():
            assert bias == pytest.approx(ref["expert_bias"][key], abs=1e-7), (layout, key)
    assert set(seen) == set(ref["losses"])  # every sample of both iterations was checked
    layers = {k.split(":")[1] for rec in records for k in rec["expert_bias"]}
    assert layers == {"0", "1", "2", "3"}


def test_batch_p2p_comm_is_refused(reference, tmp_path):
    ref_dir, _ = reference
    proc = torchrun(
        WORKER, 2, "--layout", "pp2vpp2_batchp2p", "--ref-dir", ref_dir,
        "--out", str(tmp_path), timeout=120,
    )
    assert proc.returncode != 0
    assert "batch_p2p_comm=True is not supported on the megatron_dots CPU backend" in (
        proc.stdout + proc.stderr
    )


def test_batch_p2p_comm_corrupts_without_guard(reference, tmp_path):
    """Why the guard exists: gloo + PP=2 x VPP=2 + batch_p2p_comm=True gives wrong losses."""
    ref_dir, ref = reference
    out = str(tmp_path / "out")
    proc = torchrun(
        WORKER, 2, "--layout", "pp2vpp2_batchp2p", "--ref-dir", ref_dir, "--out", out,
        "--no-batch-p2p-guard", timeout=150,
    )
    assert proc.returncode == 0, describe(proc)  # no error ...
    diffs = [
        abs(loss - ref["losses"][key])
        for rec in _records(out)
        for key, loss in rec["losses"].items()
    ]
    assert diffs and max(diffs) > 1e-3  # ... but silently wrong
