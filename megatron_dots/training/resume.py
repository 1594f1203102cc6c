"""Resume a run from `--load`: pick the checkpoint, check that it fits the flags, load it.

`resume(args, chunks, optimizer, scheduler)` returns the `TrainState` the run continues from.
"""

import os
from dataclasses import dataclass, field
from typing import List

from ..storage.checkpoint_format import RELEASE, TRACKER, read_tracker
from .arguments import ArgumentError
from .checkpoint_choice import choose_checkpoint
from .checkpointing import load_checkpoint, load_common_state
from .precision import resume_precision_problem
from .reporting import log


@dataclass
class TrainState:
    """Progress that a checkpoint carries across restarts."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    nan_iters: int = 0
    spike_iters: int = 0
    loss_window: List[float] = field(default_factory=list)  # the loss-spike detector's


def _has_checkpoint(path) -> bool:
    return bool(path) and os.path.exists(path) and not (
        os.path.isdir(path) and read_tracker(path) is None
        and not os.path.isfile(os.path.join(path, "metadata.json")))


def resume(args, chunks, optimizer, scheduler) -> TrainState:
    """Load --load into the model (and optimizer/scheduler/RNG unless told not to); when
    --load holds no checkpoint yet, the weights of --pretrained-checkpoint (Megatron-LM's
    fine-tuning idiom: a requeued job resumes from --load, the first one starts there)."""
    load, pretrained = args.load, getattr(args, "pretrained_checkpoint", None)
    if not _has_checkpoint(load):
        if load is not None:
            log(f" no checkpoint in {load} (no {TRACKER}): starting from "
                + (f"--pretrained-checkpoint {pretrained}" if pretrained else "scratch"))
        if not pretrained:
            return TrainState()
        load = pretrained
    return _load(args, load, load == pretrained, chunks, optimizer, scheduler)


def _load(args, load: str, pretrained: bool, chunks, optimizer, scheduler) -> TrainState:
    flag = "--pretrained-checkpoint" if pretrained else "--load"
    directory, lines = choose_checkpoint(load, args.dots_verify_load_checksums)
    for line in lines:
        log(line)
    dots = load_common_state(directory).get("dots", {})
    saved = dots.get("config") or {}
    ours = args.dots_config.architecture()
    diffs = [f"{k} (checkpoint {saved[k]}, flags {ours[k]})" for k in ours
             if k in saved and saved[k] != ours[k]]
    if diffs:
        raise ArgumentError(f"{flag} {load}: the checkpoint's model differs from the "
                            f"flags' in {'; '.join(diffs)}")
    weights_only = (args.finetune or pretrained or os.path.basename(os.path.normpath(directory)) == RELEASE
                    or not dots.get("training_state", False))
    with_optimizer = not (weights_only or args.no_load_optim)
    if with_optimizer:
        problem = resume_precision_problem(args, dots.get("precision"))
        if problem:
            raise ArgumentError(f"{flag} {load}: {problem}")
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
    dots = common.get("dots", dots)
    if "optimizer_translation" in common:
        log(f" {common['optimizer_translation']}")
    if weights_only:
        log(f" loaded weights from {directory}; starting at iteration 0"
            + ("" if args.finetune or pretrained
               else " (the checkpoint has no optimizer state)"))
        return TrainState()
    state = TrainState(
        iteration=int(common.get("iteration", 0)),
        consumed_samples=int(dots.get("consumed_samples", 0)),
        skipped_iters=int(dots.get("skipped_iters", 0)),
        nan_iters=int(dots.get("nan_iters", 0)),
        spike_iters=int(dots.get("spike_iters", 0)),
        loss_window=[float(x) for x in dots.get("loss_window", [])],
    )
    if args.no_load_optim:
        scheduler.step(state.consumed_samples)  # keep the schedule where the run was
    log(f" resumed from {directory} at iteration {state.iteration} "
        f"({state.consumed_samples} samples consumed)")
    return state
