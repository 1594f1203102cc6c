"""`megatron-dots pretrain` end to end on CPU: loss falls, resume continues the same curve,
batch stages, telemetry and logs, a killed save, and multi-process layouts (torchrun, gloo)
that must reproduce the single-process losses from the same converted starting weights."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from launch import REPO_ROOT, _env
from pretrain_runs import CONSTANT_LR, flags, losses, read_csv, run


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run(flags(data, out, save=out / "ckpt", save_interval=10,
                     tensorboard_dir=out / "tb"))
    return out, proc


def test_loss_falls_and_logs_like_megatron(uninterrupted):
    out, proc = uninterrupted
    curve = losses(out / "ckpt" / "losses.csv")
    assert sorted(curve) == list(range(1, 21))
    assert curve[20] < curve[1] - 1.0, curve
    line = next(l for l in proc.stdout.splitlines() if "iteration       20/      20" in l)
    for field in ("consumed samples:          160", "learning rate:", "lm loss:", "grad norm:",
                  "throughput per GPU (TFLOP/s/GPU):", "tokens per second:", "host-rss-gib:"):
        assert field in line, line
    assert "validation at iteration 20" in proc.stdout
    # WSD: warmup 2, stable, anneal over the last 5 iterations to --min-lr.
    lrs = {int(r["iteration"]): float(r["lr"]) for r in read_csv(out / "ckpt" / "losses.csv")}
    assert lrs[1] == pytest.approx(1.5e-3) and lrs[2] == lrs[15] == pytest.approx(3e-3)
    assert lrs[16] < 3e-3 and lrs[20] == pytest.approx(3e-4)


def test_recompute_budget_trains_the_same_curve(data, uninterrupted, tmp_path):
    """--dots-recompute-budget-gb: the planner calibrates, then recomputes to fit a budget
    that cannot hold every activation, and the loss curve is the run without recompute."""
    out, _ = uninterrupted
    # dots-tiny here: ~5 MiB of parameters, gradients and Adam state; ~36 MiB of activations
    # per micro-batch of 4 x 64 tokens without recompute.
    proc = run(flags(data, tmp_path, dots_recompute_budget_gb=0.03,
                     dots_loss_csv=tmp_path / "losses.csv"))
    assert losses(tmp_path / "losses.csv") == losses(out / "ckpt" / "losses.csv")
    lines = [l for l in proc.stdout.splitlines() if l.startswith(" recompute planner")]
    assert "first steps calibrate" in lines[0]
    assert "1 calibrating" in lines[1]
    for line in lines[2:]:
        share = int(line.split("layer passes recomputed ")[1].split("%")[0])
        assert 0 < share and "WARNING" not in line, line


def test_tensorboard_and_expert_load_csv(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = uninterrupted
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    loss = events.Scalars("lm loss")
    assert [e.step for e in loss] == list(range(1, 21))
    curve = losses(out / "ckpt" / "losses.csv")
    assert all(e.value == pytest.approx(curve[e.step], rel=1e-6) for e in loss)
    tags = set(events.Tags()["scalars"])
    assert {"learning-rate", "grad-norm", "expert_load/max_share",
            "expert_load/bias_norm/layer_02", "lm loss validation"} <= tags
    rows = read_csv(out / "ckpt" / "expert_load.csv")
    # dots-tiny: layer 1 dense, layers 2-4 MoE; one row per MoE layer every 5 iterations.
    assert [(int(r["iteration"]), int(r["layer"])) for r in rows] == [
        (i, layer) for i in (5, 10, 15, 20) for layer in (2, 3, 4)]
    for row in rows:
        shares = [float(row[f"share_{e}"]) for e in range(8)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-4)
        # 5 iterations x 8 sequences x 64 tokens x top-2.
        assert int(row["tokens"]) == 5 * 8 * 64 * 2
        assert float(row["bias_norm"]) > 0  # the aux-loss-free bias moved


def test_resume_continues_the_same_loss_curve(data, uninterrupted, tmp_path):
    out, _ = uninterrupted
    resumed = run(flags(data, tmp_path, load=out / "ckpt" / "iter_0000010",
                        save=tmp_path / "ckpt"))
    assert "resumed from" in resumed.stdout and "at iteration 10" in resumed.stdout
    first, second = losses(out / "ckpt" / "losses.csv"), losses(tmp_path / "ckpt" / "losses.csv")
    assert sorted(second) == list(range(11, 21))
    for iteration in range(11, 21):
        assert second[iteration] == pytest.approx(first[iteration], rel=1e-6, abs=0), iteration


def test_trained_checkpoint_exports_to_hf(uninterrupted, tmp_path):
    from megatron_dots.convert.mcore_to_hf import convert_mcore_to_hf

    out, _ = uninterrupted
    hf = convert_mcore_to_hf(str(out / "ckpt"), str(tmp_path / "hf"), progress=False)
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["model_type"] == "dots1" and config["num_hidden_layers"] == 4


def test_batch_stages_grow_the_global_batch(data, tmp_path):
    # 8 sequences (512 tokens) per step until 2Ki tokens are consumed, then 16.
    run(flags(data, tmp_path, train_iters=6, global_batch_size=None,
              dots_batch_stages="0:512,2Ki:1Ki", dots_loss_csv=tmp_path / "losses.csv",
              eval_iters=0, **CONSTANT_LR))
    rows = read_csv(tmp_path / "losses.csv")
    assert [int(r["global_batch_size"]) for r in rows] == [8, 8, 8, 8, 16, 16]
    assert [int(r["consumed_samples"]) for r in rows] == [8, 16, 24, 32, 48, 64]


def test_kill_during_save_keeps_the_last_good_checkpoint(data, tmp_path):
    # The second save dies (SIGKILL) after megatron-core has written part of the checkpoint.
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from megatron.core import dist_checkpointing\n"
        "from megatron_dots.training import checkpointing\n"
        "real, calls = dist_checkpointing.save, []\n"
        "def dying_save(state, directory, *a, **k):\n"
        "    calls.append(directory)\n"
        "    real(state, directory, *a, **k)\n"
        "    if len(calls) == 2:\n"
        "        os.remove(os.path.join(directory, '.metadata'))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpointing.dist_checkpointing.save = dying_save\n"
        "from megatron_dots.training.pretrain import main\n"
        "if __name__ == '__main__':  # megatron's writer spawns a manager that imports us\n"
        "    sys.exit(main(sys.argv[1:]))\n")
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:  # a file, not a pipe: megatron's orphaned helpers keep it
        proc = subprocess.Popen([sys.executable, str(script),
                                 *flags(data, tmp_path, train_iters=10, save=ckpt,
                                        save_interval=4)],
                                cwd=REPO_ROOT, env=_env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # and the writer's manager process
            except ProcessLookupError:
                pass
    assert code == -signal.SIGKILL, log.read_text()[-4000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (ckpt / "iter_0000008").exists()
    # The next run resumes from iteration 4 (and replaces the dead partial directory).
    resumed = run(flags(data, tmp_path, train_iters=10, save=ckpt, load=ckpt, save_interval=4))
    assert "at iteration 4" in resumed.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000004", "iter_0000008", "iter_0000010"]
    assert sorted(losses(ckpt / "losses.csv")) == list(range(1, 11))


@pytest.fixture(scope="module")
def single_process_curve(data, converted_start, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(flags(data, out, train_iters=4, load=converted_start, global_batch_size=16,
              dots_loss_csv=out / "losses.csv", eval_iters=0, **CONSTANT_LR))
    return losses(out / "losses.csv")


@pytest.mark.parametrize("layout", [
    pytest.param([], id="dp2"),
    pytest.param(["--expert-model-parallel-size", "2"], id="ep2"),
    pytest.param(["--pipeline-model-parallel-size", "2"], id="pp2"),
    pytest.param(["--expert-model-parallel-size", "2", "--dots-a2a-overlap",
                  "--delay-wgrad-compute"], id="ep2-a2a-overlap"),
])
def test_multi_process_layouts_train_like_one_process(layout, data, converted_start,
                                                      single_process_curve, tmp_path):
    proc = run(flags(data, tmp_path, train_iters=4, load=converted_start, global_batch_size=16,
                     dots_loss_csv=tmp_path / "losses.csv", eval_iters=0, **CONSTANT_LR)
               + layout, nproc=2)
    overlap = " schedule: all-to-all overlap (combined 1F1B, shared experts during dispatch, "
    assert (overlap + "delayed expert wgrad)" in proc.stdout) == ("--dots-a2a-overlap" in layout)
    curve = losses(tmp_path / "losses.csv")
    assert sorted(curve) == [1, 2, 3, 4]
    # Same weights, same global batch: the first loss agrees to float32 reduction order,
    # later ones after Adam steps to a looser bound; and training makes progress.
    assert curve[1] == pytest.approx(single_process_curve[1], rel=1e-5)
    for iteration in (2, 3, 4):
        assert curve[iteration] == pytest.approx(single_process_curve[iteration], rel=2e-3)
    assert curve[4] < curve[1]


def test_skewed_router_bias_rebalances(seeded):
    """finalize_model_grads moves the bias against the overloaded expert: with the learning
    rate at zero only the bias changes, and the routing becomes balanced."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_dots.model import build_dots_model_chunks
    from megatron_dots.training import train_step, wrap_with_ddp
    from reference import tiny_config

    cfg = tiny_config(bias_update_rate=0.01, seq_aux_loss_coeff=0.0)
    tc = cfg.to_transformer_config()
    chunks = wrap_with_ddp(build_dots_model_chunks(cfg, tc, backend="sequential"), tc)
    routers = [m for m in chunks[0].modules() if type(m).__name__ == "DotsRouter"]
    with torch.no_grad():
        for router in routers:  # a skewed start: expert 0 wins a top-2 slot for every token
            router.expert_bias[0] = 0.1
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=0.0, weight_decay=0.0, clip_grad=0.0,
                        params_dtype=torch.float32), chunks)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (2, 4, 33), generator=gen)
    weights = [p.detach().clone() for p in chunks[0].parameters()]

    def top_share():
        load = torch.stack([r.take_expert_load() for r in routers])
        return (load / load.sum(dim=1, keepdim=True)).max(dim=1).values

    shares = []
    for _ in range(40):
        train_step(chunks, optimizer, list(batch), 32, 4)
        shares.append(top_share())
    bias = torch.stack([r.expert_bias for r in routers])
    shares = torch.stack(shares)  # [step, layer]: the busiest expert's share of the slots
    assert (shares[0] > 0.4).all(), shares[0]  # expert 0 takes almost half (uniform: 1/8)
    lead = bias[:, 0] - bias[:, 1:].mean(dim=1)  # selection depends on bias differences
    assert (lead < 0.05).all(), bias  # expert 0 pushed down, the others up
    assert (shares[-10:].mean(dim=0) < 0.2).all(), shares[-10:]
    assert (shares[-10:] < 0.25).all(), shares[-10:]
    # Only the bias moved (learning rate zero).
    assert all(torch.equal(a, b) for a, b in zip(weights, chunks[0].parameters()))


def test_token_ids_outside_the_vocabulary_name_their_dataset(data, tmp_path):
    """A dataset tokenized for a larger vocabulary (or a damaged .bin) stops the run with one
    line naming its .bin before the batch reaches the embedding."""
    from training_data import write_progressions

    wide = write_progressions(str(tmp_path / "wide"), 4000, documents=100, seed=3)
    proc = run(flags([data[0], wide], tmp_path, train_iters=3, eval_iters=0, **CONSTANT_LR),
               returncode=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {wide}.bin: sample "), proc.stderr
    assert "outside the model's vocabulary of 512 ids" in errors[0]
    assert "Traceback" not in proc.stderr
