"""Resume a run from `--load`: pick the checkpoint, check that it fits the flags, load it.

`plan_resume(args)` (on every rank, before the data is built) picks and verifies the checkpoint,
checks it against the flags and returns the `ResumePoint` with the `TrainState` the run
continues from (a length or data stage changes where the data continues: `data_stage`);
`load_resumed(args, point, chunks, optimizer, scheduler)` then loads its tensors.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..storage.checkpoint_format import RELEASE, TRACKER, read_tracker
from .arguments import ArgumentError
from .checkpoint_choice import choose_checkpoint
from .checkpointing import load_checkpoint, load_common_state
from .data_stage import continue_stage, saved_seq_length, schedule_position
from .precision import resume_precision_problem
from .reporting import log


@dataclass
class TrainState:
    """Progress that a checkpoint carries across restarts."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0   # over all stages, whatever their --seq-length
    data_stage_start: int = 0  # consumed_samples when this run's data began (data_stage)
    skipped_iters: int = 0
    nan_iters: int = 0
    spike_iters: int = 0
    loss_window: List[float] = field(default_factory=list)  # the loss-spike detector's


@dataclass
class ResumePoint:
    """What `plan_resume` decided: the checkpoint directory (None: start from scratch), what to
    load from it, and the state the run continues from."""

    state: TrainState
    directory: Optional[str] = None
    weights_only: bool = True
    with_optimizer: bool = False
    saved_seq_length: Optional[int] = None
    pretrained: bool = False  # --pretrained-checkpoint's weights, or --finetune


def _has_checkpoint(path) -> bool:
    return bool(path) and os.path.exists(path) and not (
        os.path.isdir(path) and read_tracker(path) is None
        and not os.path.isfile(os.path.join(path, "metadata.json")))


def plan_resume(args) -> ResumePoint:
    """Where the run starts: --load (its model, optimizer, scheduler and RNG state unless told
    not to); when --load holds no checkpoint yet, the weights of --pretrained-checkpoint
    (Megatron-LM's fine-tuning idiom: a requeued job resumes from --load, the first one starts
    there), or with --dots-new-data-stage its whole training state (a new stage's first job);
    else scratch. Collective: call it on every rank."""
    load, pretrained = args.load, getattr(args, "pretrained_checkpoint", None)
    if _has_checkpoint(load):
        return _plan(args, load, "--load", pretrained_weights=False)
    stage = getattr(args, "dots_new_data_stage", False)
    if load is not None:
        start = "scratch"
        if pretrained:
            start = f"--pretrained-checkpoint {pretrained}" + (
                " (its training state: --dots-new-data-stage)" if stage else "")
        log(f" no checkpoint in {load} (no {TRACKER}): starting from {start}")
    if not pretrained:
        return ResumePoint(TrainState())
    # With --dots-new-data-stage the first job of a stage continues the previous stage's
    # training state; its requeued jobs find their own checkpoint in --load.
    return _plan(args, pretrained, "--pretrained-checkpoint", pretrained_weights=not stage)


def _plan(args, load: str, flag: str, pretrained_weights: bool) -> ResumePoint:
    """The `ResumePoint` of checkpoint `load` (given as `flag`); `pretrained_weights`: load its
    weights only, from iteration 0 (as --finetune does)."""
    directory, lines = choose_checkpoint(load, args.dots_verify_load_checksums)
    for line in lines:
        log(line)
    common = load_common_state(directory)
    dots = common.get("dots", {})
    _check_model(args, flag, load, directory, dots.get("config") or {})
    pretrained = args.finetune or pretrained_weights
    weights_only = (pretrained or os.path.basename(os.path.normpath(directory)) == RELEASE
                    or not dots.get("training_state", False))
    with_optimizer = not (weights_only or args.no_load_optim)
    if with_optimizer:
        problem = resume_precision_problem(args, dots.get("precision"))
        if problem:
            raise ArgumentError(f"{flag} {load}: {problem}")
    point = ResumePoint(TrainState(), directory, weights_only, with_optimizer,
                        saved_seq_length(dots), pretrained=pretrained)
    if weights_only:
        return point
    iteration = int(common.get("iteration", 0))
    consumed = int(dots.get("consumed_samples", 0))
    tokens, data_start, stage_lines = continue_stage(args, dots, iteration, consumed,
                                                     f"{flag} {directory}")
    for line in stage_lines:
        log(line)
    point.state = TrainState(
        iteration=iteration, consumed_samples=consumed, consumed_tokens=tokens,
        data_stage_start=data_start,
        skipped_iters=int(dots.get("skipped_iters", 0)),
        nan_iters=int(dots.get("nan_iters", 0)),
        spike_iters=int(dots.get("spike_iters", 0)),
        loss_window=[float(x) for x in dots.get("loss_window", [])],
    )
    return point


def _check_model(args, flag: str, load: str, directory: str, saved: dict) -> None:
    """The checkpoint's architecture must be the flags'; an explicit --rotary-base may change
    the RoPE base (a long-context stage's choice), an implicit one may not. The checkpoint's
    max_position_embeddings bounds --seq-length unless --max-position-embeddings raises it."""
    ours = args.dots_config.architecture()
    explicit_base = getattr(args, "rotary_base", None) is not None
    diffs = [f"{k} (checkpoint {saved[k]}, flags {ours[k]})" for k in ours
             if k in saved and saved[k] != ours[k] and not (k == "rotary_base" and explicit_base)]
    if diffs:
        raise ArgumentError(f"{flag} {load}: the checkpoint's model differs from the "
                            f"flags' in {'; '.join(diffs)}")
    if "rotary_base" in saved and saved["rotary_base"] != ours.get("rotary_base"):
        log(f" RoPE base: the checkpoint's {saved['rotary_base']:g}, now --rotary-base "
            f"{ours['rotary_base']:g}")
    saved_max = saved.get("max_position_embeddings")
    if (saved_max is not None and args.seq_length > saved_max
            and getattr(args, "max_position_embeddings", None) is None):
        raise ArgumentError(
            f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
            f"{saved_max} recorded in {flag} {_common_state_file(directory)} "
            f"(field dots.config.max_position_embeddings); give --max-position-embeddings "
            f"{args.seq_length} (or more) to train at this length")


def _common_state_file(directory: str) -> str:
    """Where a checkpoint keeps its common state: common.pt, or (megatron-core 0.19+) the
    torch_dist metadata."""
    legacy = os.path.join(directory, "common.pt")
    return legacy if os.path.isfile(legacy) else os.path.join(directory, ".metadata")


def load_resumed(args, point: ResumePoint, chunks, optimizer, scheduler) -> None:
    """Load what `plan_resume` chose into the model (and optimizer, scheduler, RNG state)."""
    if point.directory is None:
        return
    directory, with_optimizer = point.directory, point.with_optimizer
    common = load_checkpoint(
        chunks, directory,
        optimizer=optimizer if with_optimizer else None,
        scheduler=scheduler if with_optimizer else None,
        load_rng=not args.no_load_rng,
    )
    if not with_optimizer:
        # The optimizer's fp32 main weights (bf16 / fp16 runs, the distributed optimizer's
        # shards) were copied from the initial weights: take the loaded ones instead.
        optimizer.reload_model_params()
    if "optimizer_translation" in common:
        log(f" {common['optimizer_translation']}")
    if point.weights_only:
        log(f" loaded weights from {directory}; starting at iteration 0"
            + ("" if point.pretrained else " (the checkpoint has no optimizer state)"))
        return
    state = point.state
    if with_optimizer:
        saved_seq = point.saved_seq_length or args.seq_length
        if saved_seq != args.seq_length:  # the schedule keeps its position in tokens
            before = scheduler.num_steps
            scheduler.num_steps = schedule_position(before, saved_seq, args.seq_length)
            scheduler.step(0)
            log(f" LR schedule position: {before:,} samples of {saved_seq} tokens = "
                f"{scheduler.num_steps:,} samples of {args.seq_length} tokens")
    else:  # --no-load-optim: keep the schedule where the run was
        scheduler.step(schedule_position(state.consumed_tokens, 1, args.seq_length))
    log(f" resumed from {directory} at iteration {state.iteration} "
        f"({state.consumed_samples} samples, {state.consumed_tokens:,} tokens consumed)")
