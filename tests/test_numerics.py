"""Numerical faults in training (`training/numerics.py`): NaN / Inf steps are skipped, counted
and, K in a row, stop the run with a checkpoint; loss spikes are logged, counted and, with
--dots-skip-loss-spikes, skipped; the decision is the same on every rank; counters and the
spike window survive a resume.

End-to-end runs call `megatron_dots.training.pretrain.main` in a child interpreter: this file
run as a script (`python tests/test_numerics.py PLAN.json`, or under torchrun) wraps, for the
test only, the loss function (a NaN or a factor at chosen steps), a gradient (a NaN on chosen
ranks), the data (a reference run that leaves out one batch) and `train_step` (a digest of the
parameters and the optimizer state after every step), then runs the plan's runs one after
another in the same process.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import REPO_ROOT, _env, describe, torchrun  # noqa: E402
from pretrain_runs import CONSTANT_LR, flags, read_csv  # noqa: E402

THIS = os.path.abspath(__file__)

# ----------------------------------------------------------------------------- unit tests


def test_spike_detector_judges_against_the_median_of_a_full_window():
    from megatron_dots.training.numerics import LossSpikeDetector

    detector = LossSpikeDetector(factor=2.0, window=3)
    for loss in (4.0, 3.0):
        detector.record(loss)
        assert detector.threshold() is None and not detector.is_spike(100.0)
    detector.record(30.0)  # an outlier in the window moves a median little
    assert detector.threshold() == 2.0 * 4.0
    assert detector.is_spike(8.5) and not detector.is_spike(8.0) and not detector.is_spike(7.0)
    for bad in (math.nan, math.inf):
        assert not detector.is_spike(bad)
        detector.record(bad)  # ignored
    assert detector.history() == [4.0, 3.0, 30.0]
    detector.record(2.0)  # the oldest leaves: median of 3, 30, 2
    assert detector.threshold() == 6.0
    resumed = LossSpikeDetector(2.0, 2, history=[9.0, 1.0, 3.0, math.nan])
    assert resumed.history() == [1.0, 3.0] and resumed.threshold() == 4.0
    assert LossSpikeDetector(2.0, 1, history=[0.0]).threshold() is None  # no positive median


NUMERIC_FLAGS = dict(check_for_nan_in_loss_and_grad=True, fp16=False,
                     dots_skip_loss_spikes=False, dots_max_consecutive_nan_steps=3,
                     dots_loss_spike_factor=None, dots_loss_spike_window=None)


def guard(**changes):
    from megatron_dots.training.numerics import NumericsGuard

    return NumericsGuard(argparse.Namespace(**dict(NUMERIC_FLAGS, **changes)),
                         SimpleNamespace(loss_window=[]))


def fake_chunk(*grads):
    """What the check reads of a Megatron-Core DDP chunk: its gradient buffers."""
    return SimpleNamespace(buffers=[SimpleNamespace(grad_data=torch.tensor(g)) for g in grads],
                           expert_parallel_buffers=[])


def test_check_finds_nan_and_inf_in_loss_and_gradients(single_process_world):
    good = fake_chunk([1.0, -2.0], [3e30, 3e30])
    assert not guard().check(2.0, [good]).skip
    for loss, chunk, grads_finite in ((math.nan, good, True), (math.inf, good, True),
                                      (2.0, fake_chunk([1.0], [0.0, math.nan]), False),
                                      (2.0, fake_chunk([-math.inf, 1.0]), False)):
        verdict = guard().check(loss, [good, chunk])
        assert verdict.skip and verdict.nan and verdict.grads_finite is grads_finite
        assert verdict.loss_finite == math.isfinite(loss)
        # --no-check-for-nan-in-loss-and-grad: seen, not skipped; fp16: the loss scaler's.
        assert not guard(check_for_nan_in_loss_and_grad=False).check(loss, [chunk]).skip
        assert guard(fp16=True).check(loss, [chunk]).skip == (not math.isfinite(loss))


def test_guard_counts_logs_and_stops_after_k_consecutive_skips(single_process_world, capsys):
    nan_guard = guard(dots_loss_spike_factor=2.0, dots_loss_spike_window=2,
                      dots_skip_loss_spikes=True)
    state = SimpleNamespace(iteration=0, consumed_samples=0, nan_iters=0, spike_iters=0,
                            loss_window=[])
    bad_grads = fake_chunk([math.nan])
    plan = [(3.0, []), (math.nan, []), (3.2, [bad_grads]), (2.8, []), (7.0, []),
            (math.nan, []), (9.0, [])]
    stops = []
    for loss, chunks in plan:
        verdict = nan_guard.check(loss, chunks or [fake_chunk([0.0])])
        state.iteration += 1
        state.consumed_samples += 8
        stops.append(nan_guard.after_step(state, loss, None, verdict))
    # Steps 2 and 3 NaN, 5 (7.0 > 2 x median(3.0, 2.8)) and 7 spikes, 6 NaN: 5-7 in a row.
    assert stops[:6] == [None] * 6 and stops[6].startswith(
        "3 consecutive steps (iterations 5-7) skipped for NaN/Inf in the loss or gradients, or "
        "loss spikes (--dots-max-consecutive-nan-steps 3)")
    assert "parameters are those after iteration 4" in stops[6]
    assert (state.nan_iters, state.spike_iters, state.loss_window) == (3, 2, [3.0, 2.8])
    out = capsys.readouterr().out
    assert " WARNING: iteration 2: NaN/Inf in the loss (nan) and" not in out  # loss only
    assert " WARNING: iteration 2: NaN/Inf in the loss (nan): skipped the optimizer update" in out
    assert " WARNING: iteration 3: NaN/Inf in the gradients: skipped the optimizer update" in out
    assert (" WARNING: iteration 5: loss spike: 7.000000E+00 > 2 x the median of the last 2 "
            "steps = 5.800000E+00: skipped the optimizer update") in out


def test_unskipped_spikes_join_the_window_and_good_steps_reset_the_count(single_process_world):
    spikes = guard(dots_loss_spike_factor=2.0, dots_loss_spike_window=3)
    state = SimpleNamespace(iteration=0, consumed_samples=0, nan_iters=0, spike_iters=0,
                            loss_window=[])
    for loss in (1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0):
        verdict = spikes.check(loss, [fake_chunk([0.0])])
        state.iteration += 1
        assert spikes.after_step(state, loss, 1.0, verdict) is None and not verdict.skip
    # 5.0 was a spike twice, then the median of the window moved to the new level.
    assert state.spike_iters == 2 and state.loss_window == [5.0, 5.0, 5.0]
    counting = guard()
    for loss in (math.nan, math.nan, 1.0, math.nan, math.nan):
        state.iteration += 1
        assert counting.after_step(state, loss, None, counting.check(loss, [])) is None


def test_flags_defaults_and_errors():
    from megatron_dots.training.arguments import ArgumentError, parse_args

    base = ["--dots-model", "dots-tiny", "--micro-batch-size", "2", "--seq-length", "64",
            "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "500"]
    args = parse_args(base)
    assert (args.check_for_nan_in_loss_and_grad, args.dots_max_consecutive_nan_steps,
            args.dots_loss_spike_factor, args.dots_loss_spike_window,
            args.dots_skip_loss_spikes) == (True, 5, None, None, False)
    assert not parse_args(base + ["--no-check-for-nan-in-loss-and-grad"]
                          ).check_for_nan_in_loss_and_grad
    assert parse_args(base + ["--check-for-nan-in-loss-and-grad"]).check_for_nan_in_loss_and_grad
    spikes = parse_args(base + ["--dots-loss-spike-factor", "3"])
    assert (spikes.dots_loss_spike_factor, spikes.dots_loss_spike_window) == (3.0, 100)
    for argv, needle in (
            (["--dots-max-consecutive-nan-steps", "0"], "must be at least 1, got 0"),
            (["--dots-loss-spike-factor", "1"], "must be a number above 1"),
            (["--dots-loss-spike-factor", "nan"], "must be a number above 1"),
            (["--dots-loss-spike-window", "8"], "--dots-loss-spike-window needs "
                                                "--dots-loss-spike-factor"),
            (["--dots-skip-loss-spikes"], "--dots-skip-loss-spikes needs --dots-loss-spike-factor"),
            (["--dots-loss-spike-factor", "2", "--dots-loss-spike-window", "0"],
             "--dots-loss-spike-window must be at least 1"),
            (["--no-check-for-nan-in-loss-and-grad", "--dots-max-consecutive-nan-steps", "2"],
             "skips none")):
        with pytest.raises(ArgumentError, match=needle):
            parse_args(base + argv)


def test_log_line_shows_spikes_only_with_detection():
    from megatron_dots.training.metrics import log_line

    def line(spikes):
        return log_line(3, 10, 24, 1.0, 0.1, 100, 1e-3, 8, 5.0, None, 2, 1, {}, spikes=spikes)

    assert "number of skipped iterations:   2 | number of nan iterations:   1 | number of " \
        "loss spikes:   4 |" in line(4)
    assert "loss spikes" not in line(None)


# ----------------------------------------------------------------------------- end to end
# The comparison with a run that leaves the NaN step's batch out is exact only if nothing
# else remembers that batch: the router's expert bias, which finalize_model_grads moves from
# the step's token counts before the verdict (as in Megatron-LM), is held still here.
LINEAR_LR = dict(lr_decay_style="linear", lr_decay_iters=10, lr_warmup_iters=0,
                 lr_wsd_decay_iters=None, eval_iters=0, log_interval=1,
                 moe_router_bias_update_rate=0)
SPIKES = dict(dots_loss_spike_factor=3, dots_loss_spike_window=2)


def run_plan(out, runs, nproc=1):
    """Run `runs` (dicts: name, argv and injections) in one child interpreter (or under
    torchrun); returns {name: {rc, stdout, stderr, steps}} (rank 0's, and per rank in
    "ranks")."""
    plan = out / "plan.json"
    plan.write_text(json.dumps({"out": str(out / "result"), "runs": runs}))
    if nproc > 1:
        proc = torchrun(THIS, nproc, str(plan), timeout=300)
    else:
        proc = subprocess.run([sys.executable, THIS, str(plan)], cwd=REPO_ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    ranks = [json.loads((out / f"result.rank{r}.json").read_text()) for r in range(nproc)]
    return {name: dict(result, ranks=[rank[name] for rank in ranks])
            for name, result in ranks[0].items()}


def by_step(result):
    return {step["step"]: step for step in result["steps"]}


def log_lines(stdout):
    return {int(l.split("iteration")[1].split("/")[0]): l for l in stdout.splitlines()
            if "| consumed samples:" in l}


def counters(line):
    return tuple(int(line.split(f"number of {what}:")[1].split("|")[0])
                 for what in ("skipped iterations", "nan iterations", "loss spikes")
                 if f"number of {what}:" in line)


def dots_state(checkpoint_dir):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(checkpoint_dir))["dots"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("numerics")

    def argv(name, **changes):
        return flags(data, out, dots_loss_csv=out / name / "losses.csv", **changes)

    return out, run_plan(out, [
        dict(name="nan", nan=[3], argv=argv("nan", train_iters=6, save=out / "nan" / "ckpt",
                                            **LINEAR_LR)),
        # The same data without the third batch (the datasets built as large as the run's).
        dict(name="reference", skip_batch=3, extra_samples=8,
             argv=argv("reference", train_iters=5, **LINEAR_LR)),
        dict(name="stop", nan=[3, 4, 5, 6, 7, 8],
             argv=argv("stop", train_iters=8, save=out / "stop", eval_iters=0, log_interval=10,
                       dots_max_consecutive_nan_steps=3)),
        dict(name="spike", nan=[2], spike={"5": 20.0},
             argv=argv("spike", train_iters=7, save=out / "spike", eval_iters=0, log_interval=1,
                       dots_skip_loss_spikes=True, tensorboard_dir=out / "spike_tb", **SPIKES)),
        dict(name="spike_applied", spike={"4": 20.0},
             argv=argv("spike_applied", train_iters=5, eval_iters=0, log_interval=1, **SPIKES,
                       **CONSTANT_LR)),
        # The first step after the resume: a spike only a restored window can see.
        dict(name="resume", spike={"1": 20.0},
             argv=argv("resume", train_iters=8, load=out / "spike", eval_iters=0,
                       log_interval=1, dots_skip_loss_spikes=True, **SPIKES)),
    ])


def test_nan_step_is_skipped_and_training_goes_on_as_without_its_batch(runs):
    out, results = runs
    nan, reference = results["nan"], results["reference"]
    assert nan["rc"] == reference["rc"] == 0, nan["stderr"]
    steps = by_step(nan)
    assert [steps[i]["updated"] for i in range(1, 7)] == [True, True, False, True, True, True]
    # Parameters and optimizer state (Adam moments, step count) untouched by step 3.
    for what in ("params", "optimizer"):
        assert steps[3][what] == steps[2][what] != steps[1][what]
        assert steps[4][what] != steps[3][what]
    lines = log_lines(nan["stdout"])
    assert counters(lines[2]) == (0, 0) and counters(lines[3]) == counters(lines[6]) == (1, 1)
    assert "grad norm: n/a" in lines[3] and "grad norm: n/a" not in lines[4]
    assert (" WARNING: iteration 3: NaN/Inf in the loss (nan) and the gradients: skipped the "
            "optimizer update") in nan["stdout"]
    # Later steps are the reference run's, which never saw the third batch; the learning rate
    # did not advance on the skipped step (as Megatron-LM), so it matches too.
    rows = read_csv(out / "nan" / "losses.csv")
    ref_rows = read_csv(out / "reference" / "losses.csv")
    assert math.isnan(float(rows[2]["loss"]))
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in ref_rows[:2]]
    assert [float(r["loss"]) for r in rows[3:]] == pytest.approx(
        [float(r["loss"]) for r in ref_rows[2:]], rel=1e-6, abs=0)
    lrs, ref_lrs = [float(r["lr"]) for r in rows], [float(r["lr"]) for r in ref_rows]
    assert lrs[2] == lrs[1] > lrs[3] and lrs[3:] == ref_lrs[2:]
    saved = dots_state(out / "nan" / "ckpt" / "iter_0000006")
    assert (saved["nan_iters"], saved["skipped_iters"], saved["spike_iters"]) == (1, 1, 0)


def test_consecutive_nan_steps_stop_the_run_with_a_checkpoint(runs):
    out, results = runs
    stop = results["stop"]
    assert stop["rc"] == 2
    assert ("error: 3 consecutive steps (iterations 3-5) skipped for NaN/Inf in the loss or "
            "gradients (--dots-max-consecutive-nan-steps 3): the run has diverged or its data "
            "is bad. The parameters are those after iteration 2") in stop["stderr"]
    steps = by_step(stop)
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert steps[2]["params"] == steps[3]["params"] == steps[5]["params"]
    # The stop logs a line (--log-interval 10) and saves; the tracker names that checkpoint.
    lines = log_lines(stop["stdout"])
    assert list(lines) == [5] and counters(lines[5]) == (3, 3)
    assert "saved checkpoint" in stop["stdout"]
    assert (out / "stop" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    saved = dots_state(out / "stop" / "iter_0000005")
    assert (saved["nan_iters"], saved["skipped_iters"], saved["consumed_samples"]) == (3, 3, 40)


def test_loss_spike_is_logged_counted_and_skipped_on_request(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = runs
    spike = results["spike"]
    assert spike["rc"] == 0, spike["stderr"]
    steps = by_step(spike)
    assert [steps[i]["updated"] for i in range(1, 8)] == [True, False, True, True, False,
                                                          True, True]
    assert steps[5]["params"] == steps[4]["params"] != steps[6]["params"]
    lines = log_lines(spike["stdout"])
    # (skipped, nan, spikes): the NaN step 2 stays out of the window (steps 1 and 3 fill it).
    assert [counters(lines[i]) for i in range(1, 8)] == [
        (0, 0, 0), (1, 1, 0), (1, 1, 0), (1, 1, 0), (2, 1, 1), (2, 1, 1), (2, 1, 1)]
    warning = next(l for l in spike["stdout"].splitlines() if "loss spike:" in l)
    assert warning.startswith(" WARNING: iteration 5: loss spike: ")
    assert "> 3 x the median of the last 2 steps" in warning
    assert warning.endswith("skipped the optimizer update")
    events = EventAccumulator(str(out / "spike_tb"))
    events.Reload()
    assert {tag: [(e.step, e.value) for e in events.Scalars(f"numerics/{tag}")][::2]
            for tag in ("skipped-iterations", "nan-iterations", "loss-spikes")} == {
        "skipped-iterations": [(1, 0), (3, 1), (5, 2), (7, 2)],
        "nan-iterations": [(1, 0), (3, 1), (5, 1), (7, 1)],
        "loss-spikes": [(1, 0), (3, 0), (5, 1), (7, 1)]}

    applied = results["spike_applied"]
    steps = by_step(applied)
    assert all(s["updated"] for s in steps.values())
    assert steps[4]["params"] != steps[3]["params"]
    lines = log_lines(applied["stdout"])
    assert counters(lines[3]) == (0, 0, 0) and counters(lines[4]) == (0, 0, 1)
    assert (" the update was applied (--dots-skip-loss-spikes skips such steps)"
            in applied["stdout"])


def test_counters_and_spike_window_survive_a_resume(runs):
    out, results = runs
    resume = results["resume"]
    assert resume["rc"] == 0, resume["stderr"]
    lines = log_lines(resume["stdout"])
    assert list(lines) == [8] and counters(lines[8]) == (3, 1, 2)
    assert " WARNING: iteration 8: loss spike: " in resume["stdout"]
    assert not by_step(resume)[1]["updated"]


def test_every_rank_skips_when_one_pipeline_stage_has_nan_gradients(data, tmp_path):
    """Pipeline parallel 2 with the distributed optimizer and both overlaps: only the first
    stage's gradients hold the NaN (the loss, on the last stage, is finite), yet both stages
    skip the step, and go on training together."""
    results = run_plan(tmp_path, [dict(
        name="pp2", grad_nan={"2": [0]},
        argv=flags(data, tmp_path, train_iters=4, eval_iters=0, log_interval=1,
                   pipeline_model_parallel_size=2, use_distributed_optimizer=True,
                   overlap_grad_reduce=True, overlap_param_gather=True,
                   dots_loss_csv=tmp_path / "losses.csv", **CONSTANT_LR))], nproc=2)
    pp2 = results["pp2"]
    for rank in pp2["ranks"]:
        assert rank["rc"] == 0, rank["stderr"]
        steps = by_step(rank)
        assert [steps[i]["updated"] for i in range(1, 5)] == [True, False, True, True]
        assert steps[2]["params"] == steps[1]["params"] != steps[3]["params"]
        assert math.isfinite(steps[2]["loss"])
    assert (" WARNING: iteration 2: NaN/Inf in the gradients: skipped the optimizer update"
            in pp2["stdout"])
    assert counters(log_lines(pp2["stdout"])[4]) == (1, 1)


# ----------------------------------------------------------------------------- the child


def _digest(tensors) -> str:
    import hashlib

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _optimizer_tensors(optimizer):
    """Main parameters and every state tensor of a Megatron-Core optimizer (chained or not)."""
    tensors = []
    for sub in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                tensors.append(param)
                tensors += [v for _, v in sorted(inner.state.get(param, {}).items())
                            if torch.is_tensor(v)]
    return tensors


def _child(plan_path: str) -> None:
    """Run a plan's runs with the test-only injections; writes OUT.rankR.json."""
    import contextlib
    import io

    import megatron_dots  # noqa: F401
    from megatron_dots.training import data as data_module
    from megatron_dots.training import step as step_module
    from megatron_dots.training.pretrain import main

    plan = json.loads(open(plan_path).read())
    rank = int(os.environ.get("RANK", "0"))
    run, current = {}, {"step": 0, "factor": 1.0, "record": []}
    real_loss, real_forward_backward = step_module.lm_loss_func, step_module.forward_backward
    real_train_step, real_micro_batches = step_module.train_step, data_module.micro_batches
    real_build_datasets = data_module.build_datasets

    def lm_loss_func(loss_mask, output_tensor):
        loss, report = real_loss(loss_mask, output_tensor)
        if current["factor"] != 1.0:  # NaN or a spike, in the loss and so in its gradients
            loss = loss * current["factor"]
            report = {"lm loss": loss.detach().clone()}
        return loss, report

    def forward_backward(chunks, micro_batches, *args, forward_only=False, **kwargs):
        if forward_only:
            return real_forward_backward(chunks, micro_batches, *args,
                                         forward_only=True, **kwargs)
        current["step"] += 1
        step = current["step"]
        current["factor"] = (math.nan if step in run.get("nan", ())
                             else run.get("spike", {}).get(str(step), 1.0))
        try:
            loss = real_forward_backward(chunks, micro_batches, *args, **kwargs)
        finally:
            current["factor"] = 1.0
        if rank in run.get("grad_nan", {}).get(str(step), ()):
            param = next(p for p in chunks[0].parameters() if p.requires_grad)
            param.main_grad.view(-1)[0] = math.nan
        return loss

    def train_step(chunks, optimizer, *args, **kwargs):
        result = real_train_step(chunks, optimizer, *args, **kwargs)
        current["record"].append({
            "step": current["step"], "loss": result.loss, "updated": result.update_successful,
            "params": _digest(p for chunk in chunks for p in chunk.parameters()),
            "optimizer": _digest(_optimizer_tensors(optimizer))})
        return result

    def micro_batches(dataset, consumed, global_batch, *args, **kwargs):
        if "skip_batch" in run and consumed // global_batch + 1 >= run["skip_batch"]:
            consumed += global_batch
        return real_micro_batches(dataset, consumed, global_batch, *args, **kwargs)

    def build_datasets(args, tokenizer, train_samples, valid_samples):
        return real_build_datasets(args, tokenizer, train_samples + run.get("extra_samples", 0),
                                   valid_samples)

    step_module.lm_loss_func, step_module.forward_backward = lm_loss_func, forward_backward
    step_module.train_step, data_module.micro_batches = train_step, micro_batches
    data_module.build_datasets = build_datasets

    results = {}
    for spec in plan["runs"]:
        run.clear()
        run.update(spec)
        current.update(step=0, record=[])
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(spec["argv"])
        results[spec["name"]] = {"rc": rc, "stdout": stdout.getvalue(),
                                 "stderr": stderr.getvalue(), "steps": current["record"]}
    with open(f"{plan['out']}.rank{rank}.json", "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    _child(sys.argv[1])
