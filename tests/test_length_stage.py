"""The length stage (dots.llm1's final long-context continued pretraining), at tiny size on CPU.

Stage 1 trains 3 iterations at --seq-length 64 on one blend and saves; stage 2 is a new run that
`--load`s it at --seq-length 128 on new data with --dots-new-data-stage. It must continue the
iteration, the optimizer, the LR schedule (in tokens) and the consumed tokens (so
--dots-batch-stages switches where it should), start the new data at its first sample, re-plan
activation recompute for the longer sequences within --dots-recompute-budget-gb, and resume
inside stage 2 exactly. Also: the RoPE base against Hugging Face's rotary embedding and float64
math, and bad input (lengths above max_position_embeddings, a length change without
--dots-new-data-stage, an implicit RoPE-base change).
"""

import math
import os

import pytest
import torch

from launch import TESTS
from pretrain_runs import VOCAB, as_flags, losses, read_csv, run

WORKER = os.path.join(TESTS, "parallel", "length_stage_worker.py")
S1, S2 = 64, 128
# 512-token batches (8 x 64 or 4 x 128 sequences) until 2Ki tokens are consumed, then 1Ki.
BATCH_STAGES = "0:512,2Ki:1Ki"
# dots-tiny: ~5 MiB of parameters, gradients and Adam state; a 4 x 64 micro-batch saves
# ~7 MiB of activations, a 4 x 128 one twice that: stage 1 fits without recompute, stage 2
# does not (checked below, from stage 1's measurement).
FLAGS = dict(
    dots_model="dots-tiny", micro_batch_size=4, train_iters=8, lr=3e-3, min_lr=3e-4,
    lr_decay_style="WSD", lr_warmup_iters=2, lr_wsd_decay_iters=3,
    dots_batch_stages=BATCH_STAGES, tokenizer_type="NullTokenizer", vocab_size=VOCAB,
    log_interval=4, eval_iters=0, dots_recompute_budget_gb=0.015, dots_recompute_bucket=64,
)
STAGE2 = dict(seq_length=S2, max_position_embeddings=S2, dots_new_data_stage=True)


def pretrain(out, name, data_path, returncode=0, **changes):
    """One run of the worker (`megatron-dots pretrain` + the planner's records in NAME.json)."""
    values = {**FLAGS, "data_cache_path": out / "cache", "dots_loss_csv": out / f"{name}.csv",
              **changes}
    args = (["--planner-json", str(out / f"{name}.json"), "--data-path", *map(str, data_path)]
            + as_flags(values))
    return run(args, script=WORKER, returncode=returncode)


@pytest.fixture(scope="module")
def stages(data, tmp_path_factory):
    from training_data import write_progressions

    out = tmp_path_factory.mktemp("stages")
    long_data = [write_progressions(str(out / "long"), VOCAB, seed=3)]
    procs = {
        "stage1": pretrain(out, "stage1", ["0.6", data[0], "0.4", data[1]], seq_length=S1,
                           max_position_embeddings=S1, save=out / "s1", exit_interval=3),
    }
    # One command line for stage 2's first job and its requeued ones: --load finds nothing
    # yet, so the run continues --pretrained-checkpoint's training state (--dots-new-data-stage).
    stage2 = dict(STAGE2, pretrained_checkpoint=out / "s1")
    procs["stage2"] = pretrain(out, "stage2", long_data, load=out / "s2", save=out / "s2",
                               save_interval=6, **stage2)
    procs["resumed"] = pretrain(out, "resumed", long_data, load=out / "s2" / "iter_0000006",
                                **stage2)
    return out, long_data, procs


def rows(out, name):
    return {int(r["iteration"]): r for r in read_csv(out / f"{name}.csv")}


def common_state(directory):
    from megatron_dots.training.checkpointing import load_common_state

    return load_common_state(str(directory))


def test_stage_two_resumes_exactly(stages):
    """A checkpoint saved inside stage 2, loaded with the same stage-2 flags, continues the
    uninterrupted stage-2 run bit for bit (losses, learning rates, batches)."""
    out, _, procs = stages
    assert sorted(losses(out / "stage1.csv")) == [1, 2, 3]
    assert sorted(losses(out / "stage2.csv")) == [4, 5, 6, 7, 8]
    whole, resumed = rows(out, "stage2"), rows(out, "resumed")
    assert sorted(resumed) == [7, 8]
    for iteration in (7, 8):
        for key in ("loss", "lr", "grad_norm", "consumed_samples", "global_batch_size"):
            assert resumed[iteration][key] == whole[iteration][key], (iteration, key)
    assert "(its training state: --dots-new-data-stage)" in procs["stage2"].stdout
    assert "saved in this data stage; continuing its data at sample 20" in procs["resumed"].stdout
    assert "length stage" not in procs["resumed"].stdout


def test_tokens_are_counted_across_the_switch(stages):
    """Consumed tokens continue in tokens: stage 2's --dots-batch-stages switch to 1Ki-token
    batches comes after 2Ki tokens, i.e. after stage 2's first step (1.5Ki tokens from stage 1
    + 512), not at once (24 stage-1 samples x 128 = 3Ki would be past the threshold)."""
    out, _, procs = stages
    seq = {i: S1 if i <= 3 else S2 for i in range(1, 9)}
    table = {**rows(out, "stage1"), **rows(out, "stage2")}
    batches = [int(table[i]["global_batch_size"]) for i in range(1, 9)]
    assert batches == [8, 8, 8, 4, 8, 8, 8, 8]
    assert [int(table[i]["consumed_samples"]) for i in range(1, 9)] == [
        8, 16, 24, 28, 36, 44, 52, 60]
    tokens = 0
    for i in range(1, 9):
        tokens += batches[i - 1] * seq[i]
        if i in (3, 6, 8):
            saved = common_state(out / ("s1" if i == 3 else "s2") / f"iter_{i:07d}")
            dots = saved["dots"]
            assert (saved["iteration"], dots["consumed_tokens"]) == (i, tokens)
            assert dots["seq_length"] == seq[i]
            assert dots["data_stage_start"] == (0 if i == 3 else 24)
    assert tokens == 3 * 512 + 512 + 4 * 1024
    stdout = procs["stage2"].stdout
    assert "global batch: from 0 tokens 4 sequences x 128 = 512 tokens; from 2Ki tokens 8 " \
           "sequences x 128 = 1,024 tokens" in stdout
    assert "global batch: from 0 tokens 8 sequences x 64 = 512 tokens" in procs["stage1"].stdout
    assert "--seq-length 64 (1,536 tokens consumed); this run trains at --seq-length 128" in stdout
    assert "LR schedule position: 24 samples of 64 tokens = 12 samples of 128 tokens" in stdout


def test_lr_schedule_continues_in_tokens(stages):
    """Every logged learning rate, stage 1 and stage 2, is the WSD schedule (warmup 2, anneal
    over the last 3 of 8 iterations) evaluated in float64 at the tokens consumed: the schedule
    neither restarts nor jumps at the switch."""
    out, _, _ = stages
    table = {**rows(out, "stage1"), **rows(out, "stage2")}
    cumulative, tokens = {}, 0
    for i in range(1, 9):
        tokens += int(table[i]["global_batch_size"]) * (S1 if i <= 3 else S2)
        cumulative[i] = tokens
    warmup, anneal, end = cumulative[2], cumulative[5], cumulative[8]
    top, bottom = FLAGS["lr"], FLAGS["min_lr"]

    def wsd(t):
        if t <= warmup:
            return top * t / warmup
        if t <= anneal:
            return top
        return bottom + (top - bottom) * (1.0 - (t - anneal) / (end - anneal))

    for i in range(1, 9):  # the lr logged after step i is the next step's
        assert float(table[i]["lr"]) == pytest.approx(wsd(cumulative[i]), rel=1e-12), i
    assert float(table[8]["lr"]) == pytest.approx(bottom)


@pytest.mark.heavy
def test_new_data_starts_at_its_first_sample(stages):
    """Stage 2's first step reads the new data's first global batch: its loss is the loss of a
    --finetune run from the same weights on the same data (whose first step starts at
    sample 0), computed before either updates anything."""
    out, long_data, procs = stages
    first = pretrain(out, "finetune", long_data, load=out / "s1", finetune=True, train_iters=7,
                     exit_interval=1, seq_length=S2, max_position_embeddings=S2)
    assert "starting at iteration 0" in first.stdout
    assert losses(out / "finetune.csv")[1] == losses(out / "stage2.csv")[4]
    assert ("--dots-new-data-stage: a new data stage begins at iteration 4: --data-path long "
            "from its first sample (24 samples consumed before)") in procs["stage2"].stdout


def test_recompute_is_replanned_for_the_longer_sequences(stages):
    """Same --dots-recompute-budget-gb in both stages: stage 1 keeps every activation, stage 2's
    micro-batches of twice the tokens would not fit, so its planner (calibrated on the new
    length) recomputes, and the measured saved-tensor peak of every step stays in budget."""
    import json

    out, _, _ = stages
    one = json.load(open(out / "stage1.json"))
    two = json.load(open(out / "stage2.json"))
    assert one["budget"] == two["budget"]
    budget = one["budget"]
    for record in (one["history"][0], two["history"][0]):
        assert record["calibration"]  # each stage measures its own length first
    planned_one = one["history"][1:]
    planned_two = two["history"][1:]
    assert len(planned_one) == 2 and len(planned_two) == 4
    peak_one = max(r["measured_peak"] for r in planned_one)
    # Without recompute a micro-batch of 4 x 128 tokens saves about twice what 4 x 64 saves.
    assert peak_one <= budget < 2 * peak_one
    for record in planned_one:
        assert set(record["modes"]) == {"none"} and record["fits"]
    for record in planned_two:
        assert set(record["modes"]) - {"none"}, record["modes"]
        assert record["fits"] and record["predicted_peak"] <= budget
        assert 0 < record["measured_peak"] <= budget


def test_length_above_the_checkpoints_max_position_embeddings(stages):
    """The checkpoint records the model's max_position_embeddings (64 here; a converted HF model
    carries its config.json's): a longer --seq-length without --max-position-embeddings raising
    it fails with exit 2, naming the flag, the value, the file and the field."""
    out, long_data, _ = stages
    proc = pretrain(out, "refused", long_data, load=out / "s1", returncode=2,
                    **{**STAGE2, "max_position_embeddings": None})
    assert "--seq-length 128 exceeds the model's max_position_embeddings 64" in proc.stderr
    # megatron-core 0.16 keeps the common state in common.pt, 0.19+ in the torch_dist metadata
    assert any(os.path.join("iter_0000003", name) in proc.stderr
               for name in ("common.pt", ".metadata"))
    assert "field dots.config.max_position_embeddings" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- in-process checks -------------------------------------------------------------------------
def base_flags(data, **changes):
    values = {"dots_model": "dots-tiny", "micro_batch_size": 4, "global_batch_size": 8,
              "seq_length": S1, "train_iters": 8, "lr": 3e-3, "tokenizer_type": "NullTokenizer",
              "vocab_size": VOCAB, **changes}
    return ["--data-path", *data] + as_flags(values)


@pytest.mark.parametrize("changes, message", [
    (dict(seq_length=512), "--seq-length 512 exceeds --max-position-embeddings 256 (the "
                           "dots-tiny preset's max_position_embeddings; give a larger "
                           "--max-position-embeddings to train longer sequences)"),
    (dict(seq_length=200, max_position_embeddings=128),
     "--seq-length 200 exceeds --max-position-embeddings 128\n"),
    (dict(dots_new_data_stage=True), "--dots-new-data-stage needs --load"),
])
def test_bad_lengths_exit_2(data, capsys, changes, message):
    from megatron_dots.training.pretrain import main

    assert main(base_flags(data, **changes)) == 2
    assert message in capsys.readouterr().err


def test_new_data_stage_decisions(data, tmp_path):
    """What a resumed run continues from, per checkpoint record: a length change needs
    --dots-new-data-stage (then the data starts at sample 0 of this run's data); a checkpoint of
    this very stage continues its position; other data at the same length continues at the
    checkpoint's count, as in Megatron-LM, with a warning."""
    from megatron_dots.training.arguments import ArgumentError, parse_args
    from megatron_dots.training.data_stage import continue_stage, data_stage

    load = ["--load", str(tmp_path)]
    long_args = parse_args(base_flags(data, seq_length=S2, global_batch_size=4) + load)
    stage1 = {"seq_length": S1, "consumed_samples": 24, "consumed_tokens": 1536,
              "data_stage": data_stage(parse_args(base_flags(data[:1])))}
    with pytest.raises(ArgumentError, match="--dots-new-data-stage to start --data-path a b at "
                                            "its first sample.*or --finetune"):
        continue_stage(long_args, stage1, 3, 24, "CKPT")
    long_args.dots_new_data_stage = True
    tokens, start, lines = continue_stage(long_args, stage1, 3, 24, "CKPT")
    assert (tokens, start) == (1536, 24) and "a new data stage begins at iteration 4" in lines[-1]
    inside = {"seq_length": S2, "consumed_samples": 40, "consumed_tokens": 3584,
              "data_stage": data_stage(long_args), "data_stage_start": 24}
    tokens, start, lines = continue_stage(long_args, inside, 7, 40, "CKPT")
    assert (tokens, start) == (3584, 24) and "continuing its data at sample 16" in lines[0]
    other = dict(inside, data_stage=dict(inside["data_stage"], data=[["z", 1, None]]))
    long_args.dots_new_data_stage = False
    tokens, start, lines = continue_stage(long_args, other, 7, 40, "CKPT")
    assert start == 24 and "WARNING" in lines[0] and "continuing at sample 40" in lines[0]
    with pytest.raises(ArgumentError, match="not both"):
        parse_args(base_flags(data, dots_new_data_stage=True, finetune=True) + load)


def test_batch_tokens_over_a_stage_start(data):
    """total_samples from a token count: the brute-force step-by-step sum."""
    from megatron_dots.training.batch_stages import (
        global_batch_size,
        parse_batch_stages,
        total_samples,
    )

    stages = parse_batch_stages("0:512,2Ki:1Ki,5Ki:2Ki", S2)
    for start in (0, 1536, 2048, 4608):
        for steps in range(0, 9):
            tokens, samples = start, 0
            for _ in range(steps):
                batch = global_batch_size(stages, tokens)
                samples, tokens = samples + batch, tokens + batch * S2
            assert total_samples(stages, S2, steps, start_tokens=start) == samples


def test_rope_base_reaches_the_model(data, seeded):
    """--rotary-base (Megatron-LM's flag; dots.llm1's preset value 1e7) is the base of the
    built model's rotary embedding: its angles for 128 positions equal float64 math and
    Hugging Face's Dots1RotaryEmbedding at the same theta."""
    from transformers import Dots1Config
    from transformers.models.dots1.modeling_dots1 import Dots1RotaryEmbedding

    from megatron_dots.config import DotsConfig
    from megatron_dots.convert.sharding import unwrap_model
    from megatron_dots.training.arguments import parse_args
    from megatron_dots.training.loop import build_model, transformer_config

    released = DotsConfig.preset("dots.llm1")
    assert (released.rotary_base, released.max_position_embeddings) == (1e7, 32768)
    args = parse_args(base_flags(data, rotary_base=released.rotary_base, seq_length=S2))
    (chunk,) = build_model(args, transformer_config(args))
    angles = unwrap_model(chunk).rotary_pos_emb(S2).reshape(S2, -1).double()
    dim = args.dots_config.kv_channels
    inv_freq = 1.0 / (1e7 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    expected = torch.arange(S2, dtype=torch.float64)[:, None] * inv_freq[None, :]
    torch.testing.assert_close(angles, torch.cat([expected, expected], dim=-1), rtol=1e-6,
                               atol=1e-5)
    hf = Dots1RotaryEmbedding(Dots1Config(**args.dots_config.to_hf_config()))
    cos, sin = hf(torch.zeros(1, S2, dim), torch.arange(S2)[None, :])
    torch.testing.assert_close(torch.cos(angles).float(), cos[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.sin(angles).float(), sin[0], rtol=0, atol=2e-5)
    assert not math.isclose(float(angles[S2 - 1, 1]), float(S2 - 1) / 1e4 ** (2 / dim))


def test_an_implicit_rope_base_change_is_refused(data, tmp_path, single_process_world):
    """A stage switch keeps the checkpoint's RoPE base: flags that would change it silently
    (the preset's default) are refused; an explicit --rotary-base may change it."""
    from megatron_dots.training.arguments import ArgumentError, parse_args
    from megatron_dots.training.resume import _check_model

    saved = parse_args(base_flags(data, rotary_base=5e5)).dots_config.to_dict()
    implicit = parse_args(base_flags(data))
    with pytest.raises(ArgumentError, match=r"rotary_base \(checkpoint 500000.0, flags 10000.0\)"):
        _check_model(implicit, "--load", "CKPT", str(tmp_path), saved)
    for base in (5e5, 2e6):
        _check_model(parse_args(base_flags(data, rotary_base=base)), "--load", "CKPT",
                     str(tmp_path), saved)
