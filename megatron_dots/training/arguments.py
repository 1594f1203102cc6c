"""Command-line arguments of `megatron-dots pretrain` / `examples/pretrain_dots.py`.

Flag names are Megatron-LM's (`--tensor-model-parallel-size`, `--global-batch-size`,
`--lr-decay-style WSD`, `--data-path`, `--save` ...) so launch scripts carry over; dots-specific
flags start with `--dots-`. `validate_args` checks every combination that can be checked
before any work (parallel layout against the model, batch divisibility, schedules, paths) and
raises `ArgumentError` naming the flags involved.
"""

import argparse
import os
from typing import List, Optional

from ..config import PRESETS, DotsConfig, DotsConfigError
from .batch_stages import BatchStageError, fixed_batch, parse_batch_stages
from .numerics import add_numerics_args, check_numerics_args
from .precision import add_precision_args, check_precision_args


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message names the flags."""


# DotsConfig fields settable from the command line, with Megatron-LM's flag names.
MODEL_FLAGS = {
    "num_layers": ("--num-layers", int),
    "hidden_size": ("--hidden-size", int),
    "num_attention_heads": ("--num-attention-heads", int),
    "num_query_groups": ("--num-query-groups", int),
    "kv_channels": ("--kv-channels", int),
    "ffn_hidden_size": ("--ffn-hidden-size", int),
    "num_moe_experts": ("--num-experts", int),
    "moe_ffn_hidden_size": ("--moe-ffn-hidden-size", int),
    "moe_router_topk": ("--moe-router-topk", int),
    "routed_scaling_factor": ("--moe-router-topk-scaling-factor", float),
    "bias_update_rate": ("--moe-router-bias-update-rate", float),
    "seq_aux_loss_coeff": ("--moe-aux-loss-coeff", float),
    "max_position_embeddings": ("--max-position-embeddings", int),
    "rotary_base": ("--rotary-base", float),
    "norm_epsilon": ("--norm-epsilon", float),
    "init_method_std": ("--init-method-std", float),
    "make_vocab_size_divisible_by": ("--make-vocab-size-divisible-by", int),
    "first_k_dense": ("--dots-first-k-dense", int),
    "num_shared_experts": ("--dots-shared-experts", int),
}

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "NullTokenizer")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


def add_dots_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `--dots-*` flags (also used by the Megatron-LM patch as extra_args_provider)."""
    group = parser.add_argument_group("dots")
    group.add_argument("--dots-model", default=None, choices=sorted(PRESETS),
                       help="dots preset whose architecture to train; Megatron-LM model flags "
                       "(--num-layers, --hidden-size, --num-experts, ...) override its fields")
    group.add_argument("--dots-first-k-dense", type=int, default=None,
                       help="number of leading dense (non-MoE) layers (dots.llm1: 1)")
    group.add_argument("--dots-shared-experts", type=int, default=None,
                       help="shared experts per MoE layer, each --moe-ffn-hidden-size wide "
                       "(dots.llm1: 2)")
    group.add_argument("--dots-expert-backend", default="auto",
                       choices=("auto", "te", "grouped", "sequential"),
                       help="layer implementation: 'te' = Transformer Engine modules "
                       "(TEGroupedMLP experts, TE attention); 'grouped' = our TE-free fast path "
                       "(torch grouped-GEMM experts, SDPA attention); 'sequential' = "
                       "Megatron-Core's local modules (SequentialMLP, unfused attention); "
                       "'auto' = te when Transformer Engine is installed, else grouped")
    group.add_argument("--dots-batch-stages", default=None, metavar="TOKENS:BATCH,...",
                       help="global batch size by consumed tokens, in tokens, e.g. "
                       "'0:64M,6T:96M,8.3T:128M' (the paper's schedule); suffixes K, M, B/G, T; "
                       "overrides --global-batch-size")
    group.add_argument("--dots-expert-load-csv", default=None, metavar="FILE",
                       help="expert-load telemetry CSV (default: SAVE/expert_load.csv when "
                       "--save is given); one row per MoE layer every --log-interval")
    group.add_argument("--dots-loss-csv", default=None, metavar="FILE",
                       help="per-iteration loss/lr/grad-norm CSV (default: SAVE/losses.csv "
                       "when --save is given)")
    group.add_argument("--dots-a2a-overlap", action="store_true", default=None,
                       help="the all-to-all overlap schedule (dots.llm1's interleaved 1F1B): "
                       "one extra warmup micro-batch, then the forward of one micro-batch and "
                       "the backward of another run layer by layer so each one's expert "
                       "dispatch/combine all-to-all hides behind the other's compute; shared "
                       "experts run during their own dispatch. Needs "
                       "--expert-model-parallel-size > 1 and, with pipeline parallelism, "
                       "--num-layers-per-virtual-pipeline-stage. Same losses and gradients as "
                       "without it")
    group.add_argument("--dots-recompute-budget-gb", type=float, default=None, metavar="GIB",
                       help="per-GPU memory budget in GiB (2^30 bytes) for parameters, "
                       "gradients, optimizer state and activations; turns on the input-aware "
                       "recompute planner, which recomputes per micro-batch only the layers "
                       "(or their attention / MLP) that its predicted peak needs. Default: "
                       "no activation recompute")
    group.add_argument("--dots-recompute-bucket", type=int, default=256, metavar="TOKENS",
                       help="sequence lengths are rounded up to a multiple of this for planning; "
                       "plans are cached per bucket (default 256)")
    group.add_argument("--dots-recompute-margin", type=float, default=0.05, metavar="FRACTION",
                       help="safety margin on predicted activation bytes (default 0.05 = 5%%)")
    return parser


def build_parser(prog: str = "megatron-dots pretrain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pretrain a dots.llm1-style MoE model with Megatron-Core (run under "
        "torchrun for several processes). Flag names follow Megatron-LM's pretrain_gpt.py.",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("model (override the --dots-model preset)")
    for field, (flag, kind) in MODEL_FLAGS.items():
        if flag.startswith("--dots-"):
            continue
        model.add_argument(flag, type=kind, default=None, dest=field,
                           help=f"DotsConfig.{field} (default: the --dots-model preset's)")
    add_dots_args(parser)

    par = parser.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="tensor parallel size (default 1)")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="pipeline parallel size (default 1)")
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                     help="layers per virtual pipeline chunk (interleaved 1F1B)")
    par.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                     help="virtual pipeline chunks per stage (alternative to the flag above)")
    par.add_argument("--expert-model-parallel-size", type=int, default=1,
                     help="expert parallel size (default 1)")
    par.add_argument("--overlap-moe-expert-parallel-comm", action="store_true",
                     dest="dots_a2a_overlap", default=None,
                     help="Megatron-LM's name for --dots-a2a-overlap")
    par.add_argument("--delay-wgrad-compute", action="store_true",
                     help="with --dots-a2a-overlap: compute the routed experts' weight "
                     "gradients after the backward's dispatch all-to-all is issued, filling "
                     "its wait (grouped / te expert backends; sequential experts and local "
                     "linear layers compute them in backward as usual)")
    par.add_argument("--sequence-parallel", action="store_true",
                     help="sequence parallelism (needs --tensor-model-parallel-size > 1)")
    par.add_argument("--distributed-backend", default=None, choices=("nccl", "gloo"),
                     help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    par.add_argument("--distributed-timeout-minutes", type=int, default=10,
                     help="timeout of torch.distributed and of Megatron-Core's process groups "
                     "(default 10, as Megatron-LM): a rank waiting in a collective on a hung "
                     "peer fails after this long instead of torch's 30 minutes")

    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, required=True,
                       help="samples per micro-batch per data-parallel rank")
    train.add_argument("--global-batch-size", type=int, default=None,
                       help="samples per optimizer step (default: micro-batch size x data "
                       "parallel size)")
    train.add_argument("--seq-length", type=int, required=True, help="tokens per sample")
    train.add_argument("--train-iters", type=int, required=True, help="optimizer steps to train")
    train.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")
    train.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                       help="optimizer (default adam, i.e. AdamW)")
    train.add_argument("--lr", type=float, required=True, help="peak learning rate")
    train.add_argument("--min-lr", type=float, default=0.0, help="final learning rate")
    train.add_argument("--lr-decay-style", default="linear", choices=LR_DECAY_STYLES,
                       help="learning-rate decay after warmup (WSD: warmup-stable-decay)")
    train.add_argument("--lr-decay-iters", type=int, default=None,
                       help="iterations to decay over (default --train-iters)")
    train.add_argument("--lr-warmup-iters", type=int, default=0, help="warmup iterations")
    train.add_argument("--lr-warmup-fraction", type=float, default=None,
                       help="warmup as a fraction of --lr-decay-iters (instead of "
                       "--lr-warmup-iters)")
    train.add_argument("--lr-wsd-decay-style", default="linear",
                       choices=("linear", "cosine", "exponential", "minus_sqrt"),
                       help="shape of the WSD anneal")
    train.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                       help="length of the WSD anneal in iterations (required with WSD)")
    train.add_argument("--weight-decay", type=float, default=0.1, help="weight decay (0.1)")
    train.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1 (0.9)")
    train.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2 (0.95)")
    train.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon (1e-8)")
    train.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping norm")

    add_precision_args(parser)
    add_numerics_args(parser)

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="*", default=None,
                      help="indexed dataset prefixes, optionally weighted: "
                      "'0.7 PREFIX1 0.3 PREFIX2' (Megatron-LM blend syntax)")
    data.add_argument("--mock-data", action="store_true",
                      help="Megatron-Core's synthetic GPT data instead of --data-path")
    data.add_argument("--split", default="969,30,1",
                      help="train,valid,test weights of each dataset (default 969,30,1)")
    data.add_argument("--data-cache-path", default=None,
                      help="where to cache dataset indices (default: next to the data)")
    data.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                      help="tokenizer kind (default: inferred from --tokenizer-model)")
    data.add_argument("--tokenizer-model", default=None,
                      help="HF tokenizer directory or sentencepiece .model file")
    data.add_argument("--vocab-size", type=int, default=None,
                      help="vocabulary size for --tokenizer-type NullTokenizer (the end-of-"
                      "document id is VOCAB_SIZE, as in Megatron-LM)")

    ckpt = parser.add_argument_group("checkpointing")
    ckpt.add_argument("--save", default=None, help="checkpoint root to save to")
    ckpt.add_argument("--load", default=None,
                      help="checkpoint root (or iter_* / release directory) to resume from")
    ckpt.add_argument("--pretrained-checkpoint", default=None, metavar="DIR",
                      help="weights to start from when --load holds no checkpoint yet (e.g. a "
                      "`convert hf-to-mcore` output): with --load and --save the same "
                      "directory, the first job starts from these weights at iteration 0 and "
                      "a requeued one resumes its own checkpoint. With --dots-new-data-stage "
                      "its whole training state continues instead (iteration, optimizer, LR "
                      "schedule): the first job of a new stage")
    ckpt.add_argument("--save-interval", type=int, default=None,
                      help="iterations between checkpoints (and one at the end)")
    ckpt.add_argument("--ckpt-format", default="torch_dist", choices=("torch_dist",),
                      help="checkpoint format (torch_dist only)")
    ckpt.add_argument("--no-load-optim", action="store_true",
                      help="do not load optimizer and scheduler state")
    ckpt.add_argument("--no-load-rng", action="store_true", help="do not load RNG state")
    ckpt.add_argument("--dots-verify-load-checksums", action="store_true",
                      help="before resuming, compare every file's CRC-32 with the checkpoint's "
                      "manifest (the ranks share reading the whole checkpoint once; default: "
                      "file sizes and structure only). A damaged latest checkpoint falls back "
                      "to the newest intact one either way")
    ckpt.add_argument("--finetune", action="store_true",
                      help="load weights only and start at iteration 0")
    ckpt.add_argument("--dots-new-data-stage", action="store_true",
                      help="a new data stage (e.g. a long-context stage with a new --seq-length "
                      "and --data-path): when --load's checkpoint was trained on other data or "
                      "at another --seq-length, start this run's data at its first sample; the "
                      "iteration, optimizer state, LR schedule and consumed tokens continue. "
                      "A checkpoint saved in this stage resumes at its own data position, so "
                      "requeued jobs keep the flag (one command line for all of a stage's jobs: "
                      "--load STAGE --save STAGE --pretrained-checkpoint PREVIOUS_STAGE). "
                      "Without it a new --seq-length is refused and other data continues at "
                      "the checkpoint's consumed-sample count, as in Megatron-LM")
    ckpt.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                      action="store_true", dest="override_opt_param_scheduler",
                      help="accepted from Megatron-LM scripts; always the case here: the LR "
                      "schedule of the flags (--lr, --min-lr, warmup, --lr-decay-*) applies, at "
                      "the position the checkpoint reached")
    ckpt.add_argument("--exit-interval", type=int, default=None,
                      help="save (with --save) and exit when the iteration is a multiple of this")
    ckpt.add_argument("--exit-signal-handler", action="store_true",
                      help="on SIGTERM/SIGINT save a checkpoint after the current step and exit")

    log = parser.add_argument_group("logging and evaluation")
    log.add_argument("--log-interval", type=int, default=100,
                     help="iterations between log lines (and expert-load rows)")
    log.add_argument("--tensorboard-dir", default=None, help="write TensorBoard events here")
    log.add_argument("--dots-a2a-timing", action="store_true",
                     help="time every MoE layer's expert all-to-all in the training forward "
                     "passes: dispatch, combine, the MoE layer, and the exposed time the "
                     "compute stream waited for the all-to-all (with --dots-a2a-overlap on a "
                     "GPU measured at the schedule's stream waits, otherwise the all-to-all "
                     "itself); logs their share of the MoE-layer time every --log-interval "
                     "(log line, TensorBoard, --dots-a2a-timing-csv). CUDA events read at log "
                     "time on a GPU, the wall clock on CPU")
    log.add_argument("--dots-a2a-timing-csv", default=None, metavar="FILE",
                     help="with --dots-a2a-timing: one row per MoE layer every --log-interval "
                     "(default: SAVE/a2a_timing.csv when --save is given, else no CSV)")
    log.add_argument("--eval-interval", type=int, default=1000,
                     help="iterations between validation runs")
    log.add_argument("--eval-iters", type=int, default=10,
                     help="global batches per validation run (0: no validation)")
    return parser


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parse and validate; raises ArgumentError on a bad combination."""
    args = build_parser().parse_args(argv)
    validate_args(args, world_size)
    return args


def _model_flag_dest(field: str) -> str:
    """Where argparse stores a model flag: the DotsConfig field for Megatron-LM's flags, the
    flag's own name for the `--dots-*` ones (defined in `add_dots_args`)."""
    flag = MODEL_FLAGS[field][0]
    return flag[2:].replace("-", "_") if flag.startswith("--dots-") else field


def model_config(args) -> DotsConfig:
    """The DotsConfig of these flags: the preset with the explicit model flags applied."""
    overrides = {f: getattr(args, _model_flag_dest(f), None) for f in MODEL_FLAGS}
    overrides = {f: v for f, v in overrides.items() if v is not None}
    if args.dots_model is None:
        missing = [MODEL_FLAGS[f][0] for f in ("num_layers", "hidden_size", "num_attention_heads",
                                               "num_moe_experts") if f not in overrides]
        if missing:
            raise ArgumentError(f"give --dots-model PRESET or the model size flags; missing "
                                f"{', '.join(missing)}")
        base = dict(PRESETS["dots.llm1"])
        base.update(overrides)
        overrides = base
    try:
        return DotsConfig.preset(args.dots_model or "dots.llm1", **overrides)
    except DotsConfigError as err:
        message = str(err)
        for field, (flag, _) in MODEL_FLAGS.items():
            message = message.replace(f"DotsConfig.{field}", f"{flag} (DotsConfig.{field})")
        raise ArgumentError(message) from None


def _max_positions_source(args) -> str:
    """Where the model's max_position_embeddings came from, when not from the flag."""
    if getattr(args, "max_position_embeddings", None) is not None:
        return ""
    preset = args.dots_model or "dots.llm1"
    return (f" (the {preset} preset's max_position_embeddings; give a larger "
            f"--max-position-embeddings to train longer sequences)")


def virtual_pipeline_size(args, num_layers: int) -> Optional[int]:
    if args.num_layers_per_virtual_pipeline_stage is None:
        return args.virtual_pipeline_model_parallel_size
    per_stage = num_layers // args.pipeline_model_parallel_size
    return per_stage // args.num_layers_per_virtual_pipeline_stage


def data_parallel_size(args, world_size: int) -> int:
    return world_size // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)


def _check_recompute_args(args) -> None:
    budget = getattr(args, "dots_recompute_budget_gb", None)
    if budget is not None and not budget > 0:
        raise ArgumentError(f"--dots-recompute-budget-gb must be positive GiB, got {budget}")
    if getattr(args, "dots_recompute_bucket", 1) < 1:
        raise ArgumentError(f"--dots-recompute-bucket must be >= 1 token, got "
                            f"{args.dots_recompute_bucket}")
    if not 0 <= getattr(args, "dots_recompute_margin", 0) < 1:
        raise ArgumentError(f"--dots-recompute-margin must be in [0, 1), got "
                            f"{args.dots_recompute_margin}")


def _check_a2a_overlap_args(args, ep: int, pp: int, vpp: Optional[int]) -> None:
    if not getattr(args, "dots_a2a_overlap", None):
        if getattr(args, "delay_wgrad_compute", False):
            raise ArgumentError("--delay-wgrad-compute needs --dots-a2a-overlap (the delayed "
                                "weight gradients fill the overlap schedule's all-to-all waits)")
        return
    from ..schedule.a2a_overlap import a2a_overlap_problems

    problems = a2a_overlap_problems(expert_parallel=ep, pipeline_parallel=pp,
                                    virtual_pipeline=vpp)
    # --dots-recompute-budget-gb works with it: the planner then chooses among the recompute
    # modes the schedule's layer nodes honour and calibrates on the plain schedule
    # (recompute/controller.py).
    if problems:
        raise ArgumentError("--dots-a2a-overlap: " + "; ".join(problems))


def validate_args(args, world_size: int, check_data=None) -> None:
    """Fill derived values (args.dots_config, data_parallel_size, vpp, batch stages, ...) and
    reject every combination that cannot work, naming the flags. `check_data` checks the data
    and tokenizer flags (default: pretraining's, `check_pretrain_data`)."""
    positive = ("micro_batch_size", "seq_length", "train_iters", "log_interval",
                "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "expert_model_parallel_size", "distributed_timeout_minutes")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got "
                                f"{getattr(args, name)}")
    for name in ("global_batch_size", "save_interval", "exit_interval", "lr_decay_iters",
                 "lr_wsd_decay_iters", "num_layers_per_virtual_pipeline_stage",
                 "virtual_pipeline_model_parallel_size", "eval_interval"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {value}")
    cfg = model_config(args)
    tp, pp, ep = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.expert_model_parallel_size)
    if world_size % (tp * pp):
        raise ArgumentError(f"world size {world_size} is not divisible by "
                            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size "
                            f"{pp}")
    dp = data_parallel_size(args, world_size)
    if dp % ep:
        # Megatron-Core's expert grid: expert TP (= TP) x EP x PP must divide the world.
        raise ArgumentError(f"--expert-model-parallel-size {ep} must divide the data parallel "
                            f"size {dp} (world size {world_size} / --tensor-model-parallel-size "
                            f"{tp} / --pipeline-model-parallel-size {pp})")
    if (args.num_layers_per_virtual_pipeline_stage is not None
            and args.virtual_pipeline_model_parallel_size is not None):
        raise ArgumentError("give --num-layers-per-virtual-pipeline-stage or "
                            "--virtual-pipeline-model-parallel-size, not both")
    vpp_flag = ("--num-layers-per-virtual-pipeline-stage"
                if args.num_layers_per_virtual_pipeline_stage is not None
                else "--virtual-pipeline-model-parallel-size")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage, rem = divmod(cfg.num_layers, pp)
        if rem or per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ArgumentError(
                f"--num-layers-per-virtual-pipeline-stage "
                f"{args.num_layers_per_virtual_pipeline_stage} does not divide the "
                f"{cfg.num_layers} / --pipeline-model-parallel-size {pp} layers per stage")
    vpp = virtual_pipeline_size(args, cfg.num_layers)
    if vpp == 1:
        vpp = None
    try:
        cfg.check_parallel_layout(tp, pp, ep, vpp, flags={"vpp": vpp_flag})
    except DotsConfigError as err:
        raise ArgumentError(str(err)) from None
    _check_recompute_args(args)
    check_precision_args(args, ArgumentError)
    check_numerics_args(args, ArgumentError)
    _check_a2a_overlap_args(args, ep, pp, vpp)
    if args.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.seq_length > cfg.max_position_embeddings:
        raise ArgumentError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{cfg.max_position_embeddings}{_max_positions_source(args)}")

    # Batch sizes.
    unit = args.micro_batch_size * dp
    if args.dots_batch_stages:
        if args.global_batch_size is not None:
            raise ArgumentError("give --global-batch-size or --dots-batch-stages, not both")
        try:
            stages = parse_batch_stages(args.dots_batch_stages, args.seq_length)
        except BatchStageError as err:
            raise ArgumentError(f"--dots-batch-stages: {err}") from None
        batches = [(f"--dots-batch-stages stage {s.describe()}", s.global_batch_size)
                   for s in stages]
    else:
        if args.global_batch_size is None:
            args.global_batch_size = unit
        stages = fixed_batch(args.global_batch_size, args.seq_length)
        batches = [("--global-batch-size", args.global_batch_size)]
    for what, batch in batches:
        if batch % unit:
            raise ArgumentError(
                f"{what}: global batch {batch} samples is not divisible by --micro-batch-size "
                f"{args.micro_batch_size} x data parallel size {dp} = {unit}")
        if vpp and (batch // unit) % pp:
            raise ArgumentError(
                f"{what}: {batch // unit} micro-batches per step is not a multiple of "
                f"--pipeline-model-parallel-size {pp} (needed by the interleaved schedule)")

    # Learning-rate schedule.
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ArgumentError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
        if not 0 <= args.lr_warmup_fraction <= 1:
            raise ArgumentError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must lie in "
                                "[0, 1]")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * decay_iters)
    if args.lr_warmup_iters > decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds the decay "
                            f"length {decay_iters} (--lr-decay-iters / --train-iters)")
    if args.lr_decay_style == "WSD":
        if args.lr_wsd_decay_iters is None:
            raise ArgumentError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
        if args.lr_warmup_iters + args.lr_wsd_decay_iters > decay_iters:
            raise ArgumentError(
                f"--lr-warmup-iters {args.lr_warmup_iters} + --lr-wsd-decay-iters "
                f"{args.lr_wsd_decay_iters} exceed the decay length {decay_iters}")

    (check_data or check_pretrain_data)(args)
    split = args.split.split(",")
    try:
        weights = [float(w) for w in split]
    except ValueError:
        weights = []
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or not weights[0] > 0:
        raise ArgumentError(f"--split {args.split!r}: expected up to three non-negative "
                            "weights 'train,valid,test' with train > 0")

    # Checkpointing.
    same_as_save = args.save is not None and args.load is not None and (
        os.path.abspath(args.load) == os.path.abspath(args.save))
    if args.load is not None and not os.path.exists(args.load) and not same_as_save:
        # (--load equal to --save is the auto-resume idiom: the first job finds nothing.)
        raise ArgumentError(f"--load {args.load}: no such checkpoint directory")
    if args.pretrained_checkpoint is not None and not os.path.exists(args.pretrained_checkpoint):
        raise ArgumentError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no such "
                            "checkpoint directory")
    if getattr(args, "dots_new_data_stage", False):
        if args.load is None:
            raise ArgumentError("--dots-new-data-stage needs --load: the checkpoint to "
                                "continue, or this stage's own directory with "
                                "--pretrained-checkpoint PREVIOUS_STAGE")
        if args.finetune:
            raise ArgumentError("give --dots-new-data-stage (continue the checkpoint's "
                                "iteration, optimizer and LR schedule on new data) or --finetune "
                                "(weights only, from iteration 0), not both")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.exit_signal_handler and args.save is None:
        raise ArgumentError("--exit-signal-handler needs --save DIR to save to")
    if args.dots_a2a_timing_csv is not None and not args.dots_a2a_timing:
        raise ArgumentError("--dots-a2a-timing-csv needs --dots-a2a-timing")
    if args.dots_a2a_timing and cfg.first_k_dense >= cfg.num_layers:
        raise ArgumentError(f"--dots-a2a-timing: the model has no MoE layer "
                            f"(--dots-first-k-dense {cfg.first_k_dense}, --num-layers "
                            f"{cfg.num_layers})")

    args.dots_config = cfg
    args.data_parallel_size = dp
    args.virtual_pipeline_model_parallel_size = vpp
    args.batch_stages = stages
    args.lr_decay_iters = decay_iters
    for name, default in (("dots_expert_load_csv", "expert_load.csv"),
                          ("dots_loss_csv", "losses.csv"),
                          ("dots_a2a_timing_csv", "a2a_timing.csv" if args.dots_a2a_timing
                           else None)):
        if getattr(args, name) is None and args.save is not None and default:
            setattr(args, name, os.path.join(args.save, default))


def check_pretrain_data(args) -> None:
    """--data-path / --mock-data and the tokenizer flags of pretraining."""
    if args.mock_data and args.data_path:
        raise ArgumentError("give --data-path or --mock-data, not both")
    if not args.mock_data and not args.data_path:
        raise ArgumentError("no training data: give --data-path PREFIX ... or --mock-data")
    if args.tokenizer_type is None:
        if args.tokenizer_model is not None:
            args.tokenizer_type = ("SentencePieceTokenizer" if os.path.isfile(args.tokenizer_model)
                                   else "HuggingFaceTokenizer")
        elif args.vocab_size is not None:
            args.tokenizer_type = "NullTokenizer"
        else:
            raise ArgumentError("give --tokenizer-model DIR_OR_FILE, or --tokenizer-type "
                                "NullTokenizer --vocab-size N")
    if args.tokenizer_type == "NullTokenizer":
        if args.vocab_size is None or args.vocab_size <= 0:
            raise ArgumentError("--tokenizer-type NullTokenizer needs a positive --vocab-size")
        if args.tokenizer_model is not None:
            raise ArgumentError("--tokenizer-model is not used with --tokenizer-type "
                                "NullTokenizer")
    else:
        if args.tokenizer_model is None:
            raise ArgumentError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
        if not os.path.exists(args.tokenizer_model):
            raise ArgumentError(f"--tokenizer-model {args.tokenizer_model}: no such file or "
                                "directory")
    if args.data_path:
        _check_data_path(args.data_path)


def _check_data_path(items: List[str]) -> None:
    """Megatron-LM blend syntax: PREFIX ... or WEIGHT PREFIX WEIGHT PREFIX ...; every prefix
    must have its .bin and .idx."""
    for prefix in data_blend(items)[0]:
        if _is_number(prefix):
            raise ArgumentError(f"--data-path {' '.join(items)}: expected PREFIX ... or WEIGHT "
                                "PREFIX WEIGHT PREFIX ...")
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ArgumentError(f"--data-path {prefix}: {prefix + ext} does not exist "
                                    "(make it with `megatron-dots preprocess`)")


def data_blend(items: List[str]):
    """(prefixes, weights or None) from Megatron-LM's --data-path syntax."""
    if len(items) % 2 == 0 and all(_is_number(w) for w in items[::2]):
        return list(items[1::2]), [float(w) for w in items[::2]]
    return list(items), None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

