"""The configuration real dots runs use: bf16 / fp16 mixed precision, the distributed
optimizer, overlapped gradient reduce-scatter and parameter all-gather, gradient clipping, on
the CPU backend (gloo) in one process and under torchrun.

References are independent runs of the plain fp32 optimizer: the distributed optimizer and
the overlap flags change where state lives and when communication happens, not the math, so
with fp32 parameters they must reproduce its losses, weights and Adam moments; bf16 must track
fp32 within a bf16 tolerance. Checkpoints move between the two optimizers and between
data-parallel sizes.
"""

import pytest
import torch

from pretrain_runs import CONSTANT_LR, flags, losses, run

# 12 steps of 16 samples, checkpoints at 6 and 12; plain fp32 Adam unless a test says otherwise.
BASE = dict(train_iters=12, global_batch_size=16, eval_iters=0, log_interval=3,
            save_interval=6, **CONSTANT_LR)
# Every real run's flags; 20000-element buckets give the tiny model ~20 buckets, so the
# overlapped reduce-scatter and all-gather run bucket by bucket.
DISTOPT = dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
               overlap_param_gather=True, ddp_bucket_size=20000)
UPSTREAM_CORRUPTION_WARNING = "param range exceeds unpadded buffer"
# bf16 runs of the same weights under another data-parallel size may differ by bf16 rounding
# of differently ordered reductions (measured on the 2-core CI machine: identical).
BF16_RESHARD_REL = 2e-3


def train(data, out, nproc=1, **changes):
    """Run pretrain into out/ckpt; returns (iteration -> loss, stdout)."""
    out.mkdir(parents=True, exist_ok=True)
    values = dict(BASE, save=out / "ckpt", dots_loss_csv=out / "losses.csv")
    values.update(changes)
    if values["save"] is None:
        values["save_interval"] = None
    proc = run(flags(data, out, **values), nproc=nproc)
    assert UPSTREAM_CORRUPTION_WARNING not in proc.stdout + proc.stderr
    return losses(out / "losses.csv"), proc.stdout


def checkpoint_tensors(directory):
    """Every tensor of a torch_dist checkpoint, by key, as float64."""
    from megatron_dots.convert.dist_reader import DistCheckpointReader

    reader = DistCheckpointReader(str(directory))
    return {key: reader.load(key).double() for key in reader.tensors()}


def assert_close_curves(curve, reference, iterations, rel):
    assert sorted(curve) == list(iterations)
    for iteration in iterations:
        assert curve[iteration] == pytest.approx(reference[iteration], rel=rel, abs=0), (
            iteration, curve, reference)


@pytest.fixture(scope="module")
def dp2_plain(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2_plain")
    return out, train(data, out, nproc=2)[0]


@pytest.fixture(scope="module")
def dp2_distributed(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2_distributed")
    curve, stdout = train(data, out, nproc=2, **DISTOPT)
    return out, curve, stdout


def test_distributed_optimizer_with_overlap_matches_the_plain_optimizer(dp2_plain,
                                                                        dp2_distributed):
    """DP=2, fp32: same losses, weights and Adam moments after 12 steps (gradients reduced
    bucket by bucket during the backward, parameters gathered in the next forward)."""
    (plain_dir, plain), (dist_dir, dist, stdout) = dp2_plain, dp2_distributed
    assert "grad norm: " in stdout and "grad norm: n/a" not in stdout
    assert_close_curves(dist, plain, range(1, 13), rel=1e-6)
    ours = checkpoint_tensors(dist_dir / "ckpt" / "iter_0000012")
    theirs = checkpoint_tensors(plain_dir / "ckpt" / "iter_0000012")
    # The distributed optimizer also stores its fp32 main parameters (plain fp32 Adam's are
    # the model's own); every key the plain optimizer wrote must be there and equal.
    assert set(theirs) <= set(ours)
    moments = [k for k in theirs if k.startswith("optimizer.state.exp_avg")]
    assert len(moments) > 20
    for key, value in theirs.items():
        scale = value.abs().max().item() or 1.0
        assert (ours[key] - value).abs().max().item() <= 1e-5 * scale, key
    for key in (k for k in ours if k.startswith("optimizer.state.param.")):
        model_key = key[len("optimizer.state.param."):]
        torch.testing.assert_close(ours[key], theirs[model_key], rtol=0, atol=0)


def test_distributed_optimizer_resume_is_exact(data, dp2_distributed, tmp_path):
    """Same layout: a run resumed at 6 reproduces the uninterrupted one (master weights,
    Adam moments and step, loss scale, RNG and data position all restored)."""
    dist_dir, dist, _ = dp2_distributed
    resumed, stdout = train(data, tmp_path, nproc=2, load=dist_dir / "ckpt" / "iter_0000006",
                            **DISTOPT)
    assert "resumed from" in stdout and "at iteration 6" in stdout
    assert_close_curves(resumed, dist, range(7, 13), rel=1e-7)


def test_distributed_checkpoint_resumes_in_one_process_with_the_plain_optimizer(
        data, dp2_distributed, tmp_path):
    """DP=2 distributed optimizer -> DP=1 plain optimizer: the state reshards, the run goes
    on as it would have (same global batch; only the reduction order differs)."""
    dist_dir, dist, _ = dp2_distributed
    resumed, _ = train(data, tmp_path, load=dist_dir / "ckpt" / "iter_0000006")
    assert_close_curves(resumed, dist, range(7, 13), rel=1e-5)


def test_plain_checkpoint_resumes_under_the_distributed_optimizer(data, dp2_plain, tmp_path):
    """And back: plain optimizer state loads into the distributed optimizer's shards."""
    plain_dir, plain = dp2_plain
    resumed, _ = train(data, tmp_path, nproc=2, load=plain_dir / "ckpt" / "iter_0000006",
                       **DISTOPT)
    assert_close_curves(resumed, plain, range(7, 13), rel=1e-6)


def test_bf16_distributed_checkpoint_resumes_with_the_plain_mixed_precision_optimizer(
        data, tmp_path):
    """bf16: the distributed optimizer's fp32 main weights (``optimizer.state.param.*``) become
    the plain mixed-precision optimizer's (``optimizer.state.fp32_param.*``); without them the
    plain run would step from its random initial weights and its loss would jump."""
    saved, _ = train(data, tmp_path / "dp2", nproc=2, bf16=True, train_iters=8, save_interval=4,
                     **DISTOPT)
    resumed, stdout = train(data, tmp_path / "dp1", bf16=True, train_iters=8, save=None,
                            load=tmp_path / "dp2" / "ckpt" / "iter_0000004")
    assert "optimizer state of a distributed optimizer loaded into a plain optimizer, " \
        "bf16/fp16 parameters" in stdout
    assert_close_curves(resumed, saved, range(5, 9), rel=BF16_RESHARD_REL)


def test_distributed_checkpoint_resumes_on_dp4_with_expert_parallelism(data, dp2_distributed,
                                                                        tmp_path):
    """DP=2 -> DP=4 x EP=2 (4 processes): dense state resharded over four ranks, expert state
    split over two expert-parallel ranks."""
    dist_dir, dist, _ = dp2_distributed
    resumed, _ = train(data, tmp_path, nproc=4, load=dist_dir / "ckpt" / "iter_0000006",
                       expert_model_parallel_size=2, **DISTOPT)
    assert_close_curves(resumed, dist, range(7, 13), rel=1e-5)


def test_optimizer_state_of_another_precision_is_refused(data, dp2_distributed, tmp_path):
    """An fp32 checkpoint's optimizer state does not silently become a bf16 run's: the error
    names the checkpoint, both precisions and the ways out; --no-load-optim takes the weights."""
    dist_dir, _, _ = dp2_distributed
    checkpoint = dist_dir / "ckpt" / "iter_0000006"
    proc = run(flags(data, tmp_path, **dict(BASE, load=checkpoint, bf16=True, save=None,
                                             save_interval=None)), returncode=2)
    assert f"error: --load {checkpoint}: the checkpoint was trained in fp32 and this run is " \
        "bf16" in proc.stderr and "--no-load-optim" in proc.stderr
    curve, _ = train(data, tmp_path, load=checkpoint, bf16=True, no_load_optim=True,
                     train_iters=8, save=None)
    assert sorted(curve) == [7, 8]


# bf16 against fp32 from the same converted weights: 20 steps at a constant learning rate.
BF16_STEPS = 20
# Losses of 16-bit runs stay within this relative distance of fp32's (measured over 20 steps:
# bf16 4.9e-3, bf16 + distributed optimizer + overlap 4.7e-3, fp16 4.5e-3; DP4 x EP2 bf16
# against one fp32 process 1.1e-3 over 6 steps).
BF16_REL = 1e-2


@pytest.fixture(scope="module")
def fp32_curve(data, converted_start, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    return train(data, out, load=converted_start, train_iters=BF16_STEPS, save=None)[0]


@pytest.mark.parametrize("precision", [
    pytest.param(dict(bf16=True), id="bf16"),
    pytest.param(dict(bf16=True, **DISTOPT), id="bf16-distributed-overlap"),
    pytest.param(dict(fp16=True, loss_scale=4096), id="fp16-fixed-loss-scale"),
])
def test_mixed_precision_tracks_fp32(data, converted_start, fp32_curve, tmp_path, precision):
    """bf16 / fp16 parameters with fp32 main weights in the optimizer, started from the same
    loaded weights (which must reach the optimizer's main copy, not only the model)."""
    curve, _ = train(data, tmp_path, load=converted_start, train_iters=BF16_STEPS, save=None,
                     **precision)
    assert_close_curves(curve, fp32_curve, range(1, BF16_STEPS + 1), rel=BF16_REL)
    assert curve[BF16_STEPS] < curve[1] - 0.5  # it learns, not just stays close
    assert curve != fp32_curve  # 16-bit really ran: the losses are not fp32's


def test_fp16_dynamic_loss_scale_skips_overflowing_steps(data, converted_start, tmp_path):
    """fp16 with dynamic loss scaling from 2^28: scaled gradients overflow fp16, each overflow
    is a skipped step that halves the scale (--hysteresis 1) and logs no grad norm; once the
    gradients fit, steps update (the scale holds: no growth within 1000 clean steps) and the
    loss falls."""
    curve, stdout = train(data, tmp_path, load=converted_start, train_iters=16, save=None,
                          fp16=True, initial_loss_scale=2 ** 28, hysteresis=1, log_interval=1)
    lines = [line for line in stdout.splitlines() if "| consumed samples:" in line]
    assert len(lines) == 16 and all("loss scale: " in line for line in lines)
    scales = [float(line.split("loss scale: ")[1].split(" ")[0]) for line in lines]
    skipped = [int(line.split("number of skipped iterations:")[1].split("|")[0])
               for line in lines]
    updated = ["grad norm: n/a" not in line for line in lines]
    scale, count = 2.0 ** 28, 0
    for line, now_scale, now_count, step_updated in zip(lines, scales, skipped, updated):
        assert now_count == count + (0 if step_updated else 1), line
        assert now_scale == (scale if step_updated else scale / 2), line
        scale, count = now_scale, now_count
    first_update = updated.index(True)
    assert first_update >= 2 and sum(updated) >= 6  # both regimes are exercised
    assert max(curve[15], curve[16]) < curve[first_update + 1] - 0.1


@pytest.fixture(scope="module")
def fp32_single(data, converted_start, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32_single")
    return train(data, out, load=converted_start, train_iters=6, save=None)[0]


@pytest.mark.parametrize("layout,nproc,precision,rel", [
    pytest.param(dict(expert_model_parallel_size=2), 4, dict(bf16=True), BF16_REL,
                 id="dp4-ep2-bf16"),
    # fp32 (measured: 5.7e-8, 3.8e-8 and 7.6e-8 from one process over 6 steps)
    pytest.param(dict(expert_model_parallel_size=2, dots_a2a_overlap=True,
                      delay_wgrad_compute=True), 2, {}, 1e-5, id="ep2-a2a-overlap"),
    pytest.param(dict(pipeline_model_parallel_size=2), 2, {}, 1e-5, id="pp2"),
    pytest.param(dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
                 2, {}, 1e-5, id="pp2-vpp2"),
])
def test_layouts_with_the_distributed_optimizer_train_like_one_process(
        data, converted_start, fp32_single, tmp_path, layout, nproc, precision, rel):
    """Expert and pipeline parallelism with the distributed optimizer and both overlaps (with
    virtual pipeline stages the schedule starts each chunk's parameter gather; with the
    all-to-all overlap schedule, its combined 1F1B launches the gradient reduce-scatter)."""
    curve, _ = train(data, tmp_path, nproc=nproc, load=converted_start, train_iters=6,
                     save=None, **layout, **precision, **DISTOPT)
    assert_close_curves(curve, fp32_single, range(1, 7), rel=rel)
