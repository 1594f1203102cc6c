"""Pretrain flags: bad combinations fail before any work, naming the flags; batch stages."""

import pytest

from megatron_dots.training import arguments
from megatron_dots.training.arguments import ArgumentError, parse_args
from megatron_dots.training.batch_stages import (
    BatchStageError,
    global_batch_size,
    parse_batch_stages,
    total_samples,
)

BASE = ["--dots-model", "dots-tiny", "--micro-batch-size", "2", "--seq-length", "64",
        "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", "500"]


def error(argv, world_size=1):
    with pytest.raises(ArgumentError) as info:
        parse_args(BASE + argv, world_size)
    return str(info.value)


def test_valid_flags_fill_derived_values():
    args = parse_args(BASE + ["--global-batch-size", "8", "--pipeline-model-parallel-size", "2",
                              "--num-layers-per-virtual-pipeline-stage", "1"], world_size=4)
    assert args.data_parallel_size == 2 and args.virtual_pipeline_model_parallel_size == 2
    assert args.dots_config.num_layers == 4 and args.lr_decay_iters == 10
    explicit = parse_args(BASE[2:] + ["--num-layers", "2", "--hidden-size", "32",
                                      "--num-attention-heads", "2", "--num-experts", "4",
                                      "--moe-router-topk", "2", "--ffn-hidden-size", "64",
                                      "--moe-ffn-hidden-size", "16", "--kv-channels", "16",
                                      "--num-query-groups", "2", "--vocab-size", "500"])
    assert (explicit.dots_config.num_moe_experts, explicit.dots_config.hidden_size) == (4, 32)
    assert parse_args(BASE).global_batch_size == 2  # default: one micro-batch per DP rank
    dots_flags = parse_args(BASE + ["--dots-first-k-dense", "2", "--dots-shared-experts", "1"])
    assert (dots_flags.dots_config.first_k_dense, dots_flags.dots_config.num_shared_experts) \
        == (2, 1)  # the --dots-* model flags reach the config (they were once ignored)


@pytest.mark.parametrize("argv, world, needles", [
    (["--expert-model-parallel-size", "3"], 3, ["--expert-model-parallel-size 3",
                                                "num_moe_experts 8"]),
    (["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4"], 4,
     ["--expert-model-parallel-size 4 must divide the data parallel size 2"]),
    (["--global-batch-size", "6"], 2, ["--global-batch-size", "--micro-batch-size 2",
                                       "data parallel size 2"]),
    (["--tensor-model-parallel-size", "3"], 3, ["--tensor-model-parallel-size 3",
                                                "num_attention_heads 4"]),
    (["--pipeline-model-parallel-size", "3"], 3, ["--pipeline-model-parallel-size 3",
                                                  "num_layers 4"]),
    (["--tensor-model-parallel-size", "2"], 3, ["world size 3"]),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "2"], 2, ["not a multiple of --pipeline-model-parallel-size 2"]),
    (["--virtual-pipeline-model-parallel-size", "2"], 1, ["needs --pipeline-model-parallel-size"]),
    (["--sequence-parallel"], 1, ["--sequence-parallel needs --tensor-model-parallel-size"]),
    (["--seq-length", "1000"], 1, ["--seq-length 1000", "--max-position-embeddings 256"]),
    (["--global-batch-size", "4", "--dots-batch-stages", "0:128"], 1, ["not both"]),
    (["--dots-batch-stages", "0:100"], 1, ["--dots-batch-stages", "--seq-length 64"]),
    (["--dots-batch-stages", "1K:128"], 1, ["first stage must start at 0"]),
    (["--dots-batch-stages", "0:192"], 2, ["--dots-batch-stages stage 0:192",
                                           "--micro-batch-size 2 x data parallel size 2"]),
    (["--lr-decay-style", "WSD"], 1, ["--lr-wsd-decay-iters"]),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "8", "--lr-warmup-iters", "4"], 1,
     ["--lr-warmup-iters 4 + --lr-wsd-decay-iters 8"]),
    (["--min-lr", "1"], 1, ["--min-lr 1.0 exceeds --lr"]),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], 1, ["not both"]),
    (["--save-interval", "5"], 1, ["--save-interval needs --save"]),
    (["--exit-signal-handler"], 1, ["--exit-signal-handler needs --save"]),
    (["--load", "/nonexistent/ckpt"], 1, ["--load /nonexistent/ckpt"]),
    (["--split", "0,1,1"], 1, ["--split"]),
    (["--bf16", "--fp16"], 1, ["--bf16 or --fp16, not both"]),
    (["--overlap-param-gather", "--overlap-grad-reduce"], 1,
     ["--overlap-param-gather needs --use-distributed-optimizer"]),
    (["--overlap-param-gather", "--use-distributed-optimizer"], 1,
     ["--overlap-param-gather needs --overlap-grad-reduce"]),
    (["--bf16", "--loss-scale", "1024", "--hysteresis", "4"], 1,
     ["--loss-scale, --hysteresis need --fp16"]),
    (["--fp16", "--initial-loss-scale", "0"], 1, ["--initial-loss-scale must be positive"]),
    (["--overlap-grad-reduce", "--ddp-bucket-size", "0"], 1,
     ["--ddp-bucket-size must be positive"]),
    (["--ddp-bucket-size", "20000"], 1, ["--ddp-bucket-size needs --overlap-grad-reduce"]),
    (["--num-experts", "0"], 1, ["--num-experts"]),
    (["--micro-batch-size", "0"], 1, ["--micro-batch-size must be positive"]),
    (["--dots-recompute-budget-gb", "0"], 1, ["--dots-recompute-budget-gb must be positive"]),
    (["--dots-recompute-budget-gb", "8", "--dots-recompute-bucket", "0"], 1,
     ["--dots-recompute-bucket must be >= 1"]),
    (["--dots-recompute-budget-gb", "8", "--dots-recompute-margin", "1.5"], 1,
     ["--dots-recompute-margin must be in [0, 1)"]),
    (["--delay-wgrad-compute"], 1, ["--delay-wgrad-compute needs --dots-a2a-overlap"]),
    (["--dots-a2a-overlap"], 1, ["--dots-a2a-overlap", "--expert-model-parallel-size > 1"]),
    (["--overlap-moe-expert-parallel-comm", "--expert-model-parallel-size", "2",
      "--pipeline-model-parallel-size", "2", "--global-batch-size", "8"], 4,
     ["--dots-a2a-overlap", "--num-layers-per-virtual-pipeline-stage"]),
])
def test_bad_combinations_name_the_flags(argv, world, needles):
    message = error(argv, world)
    for needle in needles:
        assert needle in message, message


def test_a2a_overlap_flags():
    args = parse_args(BASE + ["--dots-a2a-overlap", "--delay-wgrad-compute",
                              "--expert-model-parallel-size", "2"], world_size=2)
    assert args.dots_a2a_overlap and args.delay_wgrad_compute
    alias = parse_args(BASE + ["--overlap-moe-expert-parallel-comm", "--global-batch-size", "8",
                               "--expert-model-parallel-size", "2",
                               "--pipeline-model-parallel-size", "2",
                               "--num-layers-per-virtual-pipeline-stage", "1"], world_size=4)
    assert alias.dots_a2a_overlap and not alias.delay_wgrad_compute
    assert not parse_args(BASE).dots_a2a_overlap


def test_precision_and_distributed_optimizer_flags():
    """What every real run passes validates on a CPU-only machine too (the CPU backend runs
    it); fp16 gets Megatron-LM's loss-scaling defaults."""
    args = parse_args(BASE + ["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
                              "--overlap-param-gather", "--global-batch-size", "4"],
                      world_size=2)
    assert args.bf16 and args.use_distributed_optimizer
    assert args.overlap_grad_reduce and args.overlap_param_gather
    fp16 = parse_args(BASE + ["--fp16"], 1)
    assert (fp16.initial_loss_scale, fp16.min_loss_scale, fp16.loss_scale_window,
            fp16.hysteresis, fp16.loss_scale) == (2.0 ** 32, 1.0, 1000.0, 2, None)


def test_data_and_tokenizer_flags(tmp_path):
    no_data = [a for a in BASE if a != "--mock-data"]
    with pytest.raises(ArgumentError, match="no training data"):
        parse_args(no_data, 1)
    with pytest.raises(ArgumentError, match=r"\.bin does not exist.*preprocess"):
        parse_args(no_data + ["--data-path", str(tmp_path / "corpus")], 1)
    with pytest.raises(ArgumentError, match="--data-path or --mock-data, not both"):
        parse_args(BASE + ["--data-path", str(tmp_path / "corpus")], 1)
    no_tok = [a for a in BASE if a not in ("--tokenizer-type", "NullTokenizer", "--vocab-size",
                                           "500")]
    with pytest.raises(ArgumentError, match="--tokenizer-model"):
        parse_args(no_tok, 1)
    with pytest.raises(ArgumentError, match="--tokenizer-model .*missing.model: no such"):
        parse_args(no_tok + ["--tokenizer-model", str(tmp_path / "missing.model")], 1)
    with pytest.raises(ArgumentError, match="--dots-model PRESET or the model size flags"):
        parse_args(BASE[2:], 1)


def test_pretrain_main_fails_fast_without_side_effects(tmp_path, capsys):
    from megatron_dots.training.pretrain import main

    save = tmp_path / "ckpt"
    code = main(BASE + ["--expert-model-parallel-size", "3", "--save", str(save)])
    assert code == 2
    assert "error: --expert-model-parallel-size 3" in capsys.readouterr().err
    assert not save.exists()


def test_batch_stages_follow_consumed_tokens():
    # The paper's schedule with 8Ki-token sequences: 8192, 12288, 16384 sequences.
    stages = parse_batch_stages("0:64Mi,6T:96Mi,8.3T:128Mi", 8192)
    assert [s.global_batch_size for s in stages] == [8192, 12288, 16384]
    assert global_batch_size(stages, 6 * 10**12 - 1) == 8192
    assert global_batch_size(stages, 6 * 10**12) == 12288
    assert global_batch_size(stages, 9 * 10**12) == 16384
    with pytest.raises(BatchStageError, match="did you mean 64Mi = 8192 sequences"):
        parse_batch_stages("0:64M", 8192)
    with pytest.raises(BatchStageError, match="must increase"):
        parse_batch_stages("0:1Ki,2K:2Ki,1K:4Ki", 1024)
    small = parse_batch_stages("0:512,2Ki:1Ki", 64)
    # 4 steps of 8 sequences (2048 tokens), then 16 per step.
    assert total_samples(small, 64, 6) == 4 * 8 + 2 * 16


def test_every_flag_has_help():
    parser = arguments.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.option_strings
