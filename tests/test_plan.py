"""`megatron-dots plan`: one layout, --search, JSON / PNG, the shipped sbatch layouts, bad input.

Exactness of the memory items is tested in test_plan_static.py (against built models) and
test_plan_activations.py (against the saved-tensor counter); the step time in
test_plan_step_time.py. Here: what the command reports and refuses, and that the layouts we ship
fit the GPUs they are written for.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_dots.config import DotsConfig
from megatron_dots.plan.cli import main as plan_main
from megatron_dots.plan.evaluate import plan_layout
from megatron_dots.plan.from_pretrain import layout_from_pretrain_flags
from megatron_dots.plan.hardware import Hardware
from megatron_dots.plan.layout import Layout, LayoutError
from megatron_dots.plan.search import candidate_layouts
from megatron_dots.recompute.budget import GIB

from test_slurm_examples import paths, printed_args, world_size  # noqa: F401  (fixture)

LLM1 = ["--dots-model", "dots.llm1", "--gpus", "256", "--gpu", "h100", "--seq-length", "8192",
        "--global-batch-size", "8192", "--no-progress"]
LLM1_LAYOUT = ["--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "2",
               "--expert-model-parallel-size", "8", "--micro-batch-size", "1"]


def run_plan(capsys, *argv):
    code = plan_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_layout_json_has_the_documented_fields(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, _ = run_plan(capsys, *LLM1, *LLM1_LAYOUT, "--json", str(path))
    assert code == 0, out
    (entry,) = json.loads(path.read_text())["layouts"]
    for key in ("flags", "fits", "worst_rank_memory_gib", "step_time_s", "mfu",
                "tokens_per_s_per_gpu", "gpu_hours_per_trillion_tokens", "total_parameters",
                "active_parameters", "per_rank"):
        assert key in entry, key
    assert entry["fits"] is True
    assert (entry["total_parameters"], entry["active_parameters"]) == \
        DotsConfig.preset("dots.llm1").num_parameters()
    assert round(entry["total_parameters"] / 1e9, 2) == 142.77
    assert round(entry["active_parameters"] / 1e9, 2) == 14.02
    assert [r["pp_rank"] for r in entry["per_rank"]] == [0, 1]
    worst = max(r["total_gib"] for r in entry["per_rank"])
    assert entry["worst_rank_memory_gib"] == pytest.approx(worst)
    for rank in entry["per_rank"]:
        assert sum(rank["breakdown_gib"].values()) == pytest.approx(rank["total_gib"])
    # Throughput figures agree with each other.
    tokens = 8192 * 8192
    assert entry["tokens_per_s_per_gpu"] == pytest.approx(tokens / entry["step_time_s"] / 256)
    assert entry["gpu_hours_per_trillion_tokens"] == pytest.approx(
        1e12 / entry["tokens_per_s_per_gpu"] / 3600)
    assert 0 < entry["mfu"] < 1
    # The flags are pretrain's: they parse and validate for 256 GPUs.
    flags = entry["flags"]
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == "8"
    assert "--use-distributed-optimizer" in flags and "--sequence-parallel" in flags
    assert "worst" in out and "GPU hours per trillion tokens" in out


def test_a_layout_that_does_not_fit_exits_1_and_names_the_rank(capsys):
    code, out, _ = run_plan(capsys, *LLM1, "--expert-model-parallel-size", "8",
                            "--pipeline-model-parallel-size", "2", "--gpu-memory-gb", "40")
    assert code == 1
    assert "DOES NOT FIT" in out and "pp rank" in out


def test_the_planner_budget_brings_activations_under_it():
    cfg = DotsConfig.preset("dots.llm1")
    hw = Hardware.preset("h100")
    base = Layout(gpus=256, tp=4, pp=2, ep=8, micro_batch_size=1, global_batch_size=8192,
                  seq_length=8192)
    plain = plan_layout(cfg, base, hw, 80.0)
    budget = plan_layout(cfg, base.replace(recompute_budget_gib=60.0), hw, 80.0)
    assert plain.worst.total_bytes > budget.worst.total_bytes
    for rank in budget.ranks:
        counted = rank.static.total() + rank.activations.peak_bytes
        assert counted <= 60.0 * GIB * 1.001
    recomputed = {k: v for k, v in budget.ranks[0].activations.recompute.items() if k != "none"}
    assert sum(recomputed.values()) > 0, budget.ranks[0].activations.recompute
    # Recomputing costs time.
    assert budget.step.step_time_s > plain.step.step_time_s


def test_search_ranks_fitting_layouts_fastest_first(tmp_path, capsys):
    path = tmp_path / "search.json"
    code, out, _ = run_plan(capsys, "--dots-model", "dots-mini", "--gpus", "16", "--gpu", "h100",
                            "--seq-length", "4096", "--global-batch-size", "256",
                            "--micro-batch-size", "2", "--search", "--top", "5", "--json",
                            str(path), "--no-progress")
    assert code == 0, out
    layouts = json.loads(path.read_text())["layouts"]
    assert 1 <= len(layouts) <= 5 and all(entry["fits"] for entry in layouts)
    times = [entry["step_time_s"] for entry in layouts]
    assert times == sorted(times)
    assert "layouts Megatron-Core can build on 16 GPUs" in out and "run it: torchrun" in out
    # Every candidate is a layout Megatron-Core's rules accept (our pretrain validation).
    cfg = DotsConfig.preset("dots-mini")
    base = Layout(gpus=16, global_batch_size=256, seq_length=4096, micro_batch_size=2)
    for layout in candidate_layouts(cfg, base, 8, (2,)):
        assert layout.dp % layout.ep == 0 and cfg.num_moe_experts % layout.ep == 0
        assert cfg.num_layers % (layout.pp * layout.vpp) == 0 and layout.tp <= 8


def test_png_has_memory_bars_and_timeline(tmp_path, capsys):
    png = tmp_path / "plan.png"
    code, out, _ = run_plan(capsys, "--dots-model", "dots-mini", "--gpus", "16",
                            "--seq-length", "4096", "--global-batch-size", "64",
                            "--expert-model-parallel-size", "8", "--micro-batch-size", "2",
                            "--pipeline-model-parallel-size", "2",
                            "--virtual-pipeline-model-parallel-size", "2", "--dots-a2a-overlap",
                            "--png", str(png), "--no-progress")
    assert code in (0, 1), out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("tp,gpu", [("8", "h100"), ("4", "h200")])
def test_the_shipped_dots_llm1_sbatch_layout_fits(paths, tp, gpu):  # noqa: F811
    """examples/slurm/dots_llm1.sbatch (TP 8 on H100, DOTS_TP=4 on H200), at its largest batch
    stage, with and without the all-to-all overlap."""
    for overlap in ("0", "1"):
        argv = printed_args("dots_llm1.sbatch", {**paths, "DOTS_TP": tp,
                                                 "DOTS_A2A_OVERLAP": overlap})
        cfg, layout = layout_from_pretrain_flags(argv, world_size("dots_llm1.sbatch"))
        hw = Hardware.preset(gpu)
        plan = plan_layout(cfg, layout, hw, hw.memory_gib)
        assert layout.tp == int(tp) and layout.global_batch_size == 16384
        assert plan.fits, (gpu, overlap, plan.why_not(),
                           {r.label(): r.breakdown() for r in plan.ranks})


def test_the_shipped_dots_mini_sbatch_layout_fits(paths):  # noqa: F811
    argv = printed_args("dots_mini_1node.sbatch", paths)
    cfg, layout = layout_from_pretrain_flags(argv, world_size("dots_mini_1node.sbatch"))
    hw = Hardware.preset("h100")
    plan = plan_layout(cfg, layout, hw, hw.memory_gib)
    assert plan.fits, plan.why_not()


@pytest.mark.parametrize("argv,needle", [
    (["--expert-model-parallel-size", "3"], "--expert-model-parallel-size 3 does not divide "
                                            "num_moe_experts 128"),
    (["--tensor-model-parallel-size", "64", "--gpus", "512"],
     "--tensor-model-parallel-size 64 does not divide num_attention_heads 32"),
    (["--pipeline-model-parallel-size", "4"], "does not divide num_layers 62"),
    (["--expert-model-parallel-size", "64", "--tensor-model-parallel-size", "8"],
     "does not divide the data-parallel size"),
    (["--global-batch-size", "100"], "--global-batch-size 100 is not a multiple"),
    (["--seq-length", "65536"], "exceeds the model's max_position_embeddings 32768"),
    (["--dots-a2a-overlap", "--pipeline-model-parallel-size", "2",
      "--expert-model-parallel-size", "8"], "needs --virtual-pipeline-model-parallel-size"),
])
def test_impossible_layouts_name_the_rule_and_flags(capsys, argv, needle):
    base = {"--gpus": "256", "--seq-length": "8192", "--global-batch-size": "8192"}
    for flag in argv[::1]:
        if flag in base:
            base.pop(flag)
    flat = [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit) as stop:
        plan_main(["--dots-model", "dots.llm1", "--no-progress", *flat, *argv])
    assert stop.value.code == 2
    assert needle in capsys.readouterr().err


def test_a_model_that_fits_nowhere_says_the_smallest_gpu_count(capsys):
    code, out, err = run_plan(capsys, "--dots-model", "dots.llm1", "--gpus", "8", "--search",
                              "--seq-length", "4096", "--global-batch-size", "4096",
                              "--micro-batch-size", "1", "--no-progress")
    assert code == 1
    assert "no layout fits 8 GPUs" in err and "smallest GPU count" in err
    smallest = int(err.split("on which one fits is ")[1].split()[0])
    assert smallest > 8


def test_unknown_preset_and_refused_config(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "megatron_dots.cli", "plan", "--dots-model",
                          "dots.llm9", "--gpus", "8", "--seq-length", "8", "--global-batch-size",
                          "8"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, MEGATRON_DOTS_QUIET="1"))
    assert out.returncode == 2 and "dots.llm9" in out.stderr
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SystemExit) as stop:
        plan_main(["--hf", str(tmp_path), "--gpus", "8", "--seq-length", "8",
                   "--global-batch-size", "8"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert str(config) in err and "model_type" in err, err


def test_bad_layout_object_is_refused_before_planning():
    with pytest.raises(LayoutError, match="--micro-batch-size 0"):
        Layout(gpus=8, micro_batch_size=0).check(DotsConfig.preset("dots-tiny"))
