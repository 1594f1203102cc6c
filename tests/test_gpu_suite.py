"""bench/gpu_suite.sh: the dry run (every step at smoke size on CPU) passes end to end, so the
script a lent GPU will run cannot rot; a failing or hanging step is recorded and the suite
goes on. The GPU numbers themselves belong in bench/README.md, not here."""

import json
import os
import subprocess
import sys

import pytest
import torch

from launch import REPO_ROOT, _env

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))

import gpu_suite  # noqa: E402

STEPS = ["layer_bench", "grouped_vs_sequential", "a2a_overlap", "recompute", "sft", "plan",
         "pretrain", "a2a_timing", "analysis", "megatron_lm", "long_context"]


@pytest.mark.heavy
def test_dry_run_runs_every_step(tmp_path):
    env = dict(_env(), GPU_SUITE_DRY_RUN="1")
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "bench", "gpu_suite.sh"),
                           str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["dry_run"] is True and list(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["status"] in ("ok", "derived") and step["rows"], (name, step)
        assert not any(row["ok"] is False for row in step["rows"]), (name, step["rows"])
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.count("\n| layer_bench | ok |") == 1 and "| pretrain | ok |" in table
    # Each benchmark's own report is there; layer_bench compared ours with Megatron-Core's
    # sequential experts on the same weights (fp32 on CPU: to rounding).
    layer = json.loads((tmp_path / "layer_bench.json").read_text())
    assert set(layer["results"]) == {"ours-layer", "ours-moe", "mcore-layer", "mcore-moe",
                                     "hf-moe", "experts-balanced"}
    for case, result in layer["results"].items():
        assert result["ms"] > 0 and result["tflops"] > 0 and result["tokens_per_s"] > 0, case
    check = layer["ours_vs_mcore"]
    assert check["routing_identical"] is True
    assert check["layer"] < 1e-5 and check["moe"] < 1e-5
    assert check["reference_abs_max"] > 0.1  # not a comparison of near-zero outputs
    # The pretrain step ran the real configuration (bf16, distributed optimizer, overlap).
    log = (tmp_path / "pretrain.log").read_text()
    assert "training ended at iteration 3" in log
    for name in ("a2a_overlap.json", "recompute_bench.json"):
        assert json.loads((tmp_path / name).read_text())["results"]
    # The SFT workload ran every strategy on padded variable-length micro-batches; the planner
    # is predicted to fit every step and `none` not to (the smoke budget binds).
    sft = json.loads((tmp_path / "sft_bench.json").read_text())
    assert list(sft["results"]) == ["planner", "static", "full", "none"]
    for name, result in sft["results"].items():
        assert result["status"] == "ok" and result["common_tokens_per_s"] > 0, name
        assert result["common_padded_tokens_per_s"] > result["common_tokens_per_s"], name
    assert sft["results"]["planner"]["steps_over_budget_predicted"] == 0
    assert sft["results"]["none"]["steps_over_budget_predicted"] >= 1
    assert sft["speedup"]["planner_over_static_common"] > 0
    # The plan step planned and ran both layouts (the plan of exactly pretrain's flags).
    plan = json.loads((tmp_path / "plan_bench.json").read_text())["results"]
    assert list(plan) == ["mbs1", "mbs2-budget"]
    for name, entry in plan.items():
        assert entry["measured"]["rc"] == 0 and entry["measured"]["step_time_s"] > 0, name
        assert entry["planned"]["counted_gib"] > 0 and entry["planned"]["fits"], name
    # --dots-a2a-timing ran in both schedules (torchrun, gloo, EP 2) and reported its shares.
    timing = json.loads((tmp_path / "a2a_timing.json").read_text())["results"]
    assert list(timing) == ["plain", "overlap"]
    assert all(r["status"] == "ok" and 0 < r["a2a_share"] <= 1 for r in timing.values())
    # `analyze` ran both analyses (fp32 only on CPU) and reported its throughput.
    analysis = json.loads((tmp_path / "analysis.json").read_text())["results"]
    assert list(analysis) == ["fp32"] and set(analysis["fp32"]["losses"]) == {"low", "high"}
    # The long-context step measured both lengths with and without Megatron-LM's causal mask.
    long_context = json.loads((tmp_path / "long_context_memory.json").read_text())["records"]
    assert [(r["seq_length"], r["mask"]) for r in long_context] == [
        (128, "none"), (128, "causal"), (512, "none"), (512, "causal")]
    assert (tmp_path / "long_context_memory.md").read_text().count("| 512 | causal |") == 2


def long_context_report(attn_core, sizes=(1024, 2048)):
    """A long_context_memory.json with one MoE layer per length keeping 100 bytes per token
    outside attention and `attn_core(s)` in it, without and with the causal mask."""
    records = []
    for s in sizes:
        for mask in ("none", "causal"):
            layer = {"kind": "moe", "rest": 60 * s, "attn_core": attn_core(s, mask),
                     "mlp": 40 * s}
            layer["measured_total"] = layer["predicted_total"] = 100 * s + layer["attn_core"]
            records.append({"seq_length": s, "mask": mask, "layers": {"2": layer},
                            "one_score_matrix_fp32": 4.0 * s * s, "total_bytes": 0})
    return {"records": records}


def test_long_context_rows_flag_a_kept_score_matrix(tmp_path):
    """The suite's check of the long-context report: linear bytes pass; an attention core that
    keeps an s x s matrix fails the growth rows, one that keeps it only with the causal mask
    fails the mask rows."""
    def rows(report):
        (tmp_path / "long_context_memory.json").write_text(json.dumps(report))
        return {row["metric"]: row["ok"]
                for row in gpu_suite.long_context_rows(str(tmp_path), True)}

    linear = rows(long_context_report(lambda s, mask: 20 * s))
    assert len(linear) == 9 and not any(ok is False for ok in linear.values()), linear
    quadratic = rows(long_context_report(lambda s, mask: 20 * s + 4 * s * s))
    assert quadratic["attn cores: bytes(2048) / bytes(1024)"] is False
    assert quadratic["layers: bytes(2048) / bytes(1024)"] is False
    masked = rows(long_context_report(lambda s, mask: 20 * s + 4 * s * s * (mask == "causal")))
    assert masked["attn cores: bytes(2048) / bytes(1024)"] is True
    assert masked["s 2048: bytes with causal mask / without"] is False


def test_a_failing_or_hanging_step_is_recorded_and_the_suite_goes_on(tmp_path):
    def rows(out, dry):
        return [gpu_suite._row("ran", True, "True", True)]

    plan = [
        dict(name="fails", limit_s=60, rows=rows, gpu=None,
             dry=[sys.executable, "-c", "import sys; sys.exit(3)"]),
        dict(name="hangs", limit_s=1, rows=rows, gpu=None,
             dry=[sys.executable, "-c", "import time; time.sleep(60)"]),
        dict(name="works", limit_s=60, rows=rows, gpu=None,
             dry=[sys.executable, "-c", "print('fine')"]),
    ]
    code = gpu_suite.main([str(tmp_path), "--dry-run"], plan=plan)
    assert code == 1
    steps = json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]
    assert steps["fails"]["status"] == "failed" and steps["fails"]["rc"] == 3
    assert steps["hangs"]["status"] == "timed out after 1 s"
    assert steps["works"]["status"] == "ok"
    assert (tmp_path / "works.log").read_text().strip() == "fine"
    no_time = gpu_suite.main([str(tmp_path / "late"), "--dry-run", "--budget-s", "5"],
                             plan=plan[2:])
    late = json.loads((tmp_path / "late" / "gpu_suite.json").read_text())["steps"]
    assert no_time == 1 and late["works"]["status"] == "not started (suite budget spent)"


def test_sft_workload_pads_each_micro_batch_to_its_own_longest_conversation():
    import argparse

    import sft_bench

    args = argparse.Namespace(seed=7, steps=50, global_batch=16, micro_batch_size=4,
                              length_grouped=False, tail_share=0.15, tail_min=2048,
                              max_seq=8192, min_seq=16, median=400.0, sigma=0.7, pad_multiple=64)
    workload = sft_bench.draw_workload(args)
    lengths = [n for step in workload for mb in step for n in mb]
    assert all(len(step) == 4 and all(len(mb) == 4 for mb in step) for step in workload)
    assert min(lengths) >= 16 and max(lengths) <= 8192
    dist = sft_bench.describe_workload(workload, args)
    assert 250 <= dist["length_percentiles"]["p50"] <= 700  # many short conversations
    assert 0.05 <= dist["share_at_least_tail_min"] <= 0.25  # and a long tail
    assert dist["token_share_at_least_tail_min"] > 0.4
    grouped = sft_bench.describe_workload(
        sft_bench.draw_workload(argparse.Namespace(**{**vars(args), "length_grouped": True})), args)
    assert grouped["real_over_padded_tokens"] > dist["real_over_padded_tokens"]

    step_batches = sft_bench.sft_step_batches(args, 1000, torch.device("cpu"))
    batches, seq, fields, _ = step_batches(0, workload[0])
    for batch, mb, s in zip(batches, workload[0], fields["seq"]):
        assert s % 64 == 0 and max(mb) <= s < max(mb) + 64
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(t.shape == (4, s) for t in batch.values())
        assert batch["loss_mask"].sum(dim=1).tolist() == [float(n) for n in mb]
        assert (batch["tokens"][batch["loss_mask"] == 0] == sft_bench.PAD_ID).all()
    assert seq == max(fields["seq"]) and fields["tokens"] == sum(map(sum, workload[0]))
    assert fields["padded_tokens"] == sum(4 * s for s in fields["seq"])
