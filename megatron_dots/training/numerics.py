"""Numerical faults of a training step: NaN / Inf in the loss or the gradients, and loss spikes.

This module owns their flags (`add_numerics_args`, `check_numerics_args`), the per-step
verdict `NumericsGuard.check` that `step.train_step` asks for between the backward and
`optimizer.step()`, the counters it keeps in the `TrainState` (`nan_iters`, `spike_iters`; the
loop counts `skipped_iters`) with the spike window that checkpoints carry, the warning lines,
and the decision to stop the run (`NumericalFault`).

* `--check-for-nan-in-loss-and-grad` (default on; `--no-check-for-nan-in-loss-and-grad`,
  Megatron-LM's spelling, turns it off): a step whose global loss or whose gradients hold a
  NaN / Inf does not update: `optimizer.step()` is not called, so parameters and optimizer
  state stay as they were. As for a skipped step in Megatron-LM's `train_step` (fp16
  overflow), the iteration and the consumed samples advance (the batch is used up) and the
  learning-rate schedule does not. Megatron-LM itself raises at the first NaN; here the run
  stops, after saving a checkpoint (with `--save`), only when
  `--dots-max-consecutive-nan-steps` steps in a row were skipped. With `--fp16` the gradients
  are left to the loss scaler: an overflowing step is its business (it skips the step and
  lowers the scale), only the loss is checked here.
* `--dots-loss-spike-factor F` (off by default, as Megatron-LM's `--check-for-spiky-loss`):
  a finite loss above F x the median of the last `--dots-loss-spike-window` N losses (steps
  that were neither NaN / Inf nor skipped as spikes) is a spike: a warning line, counted; with
  `--dots-skip-loss-spikes` the step is also skipped as above. No judgement until N losses
  are known. The median, not the mean: a spike that was trained on stays in the window, and
  a mean would let it raise the threshold and hide the next one.

Every rank takes the same decision: the loss is the global-batch mean that `forward_backward`
returns on every rank, and the flags (non-finite loss, non-finite local gradients, spike) are
max-reduced over the whole world in one all-reduce per step, since with pipeline parallelism
a stage sees only its own layers' gradients and with the distributed optimizer a rank holds
only its shard reduced. The router's expert bias, a buffer that `finalize_model_grads`
updates from the step's token counts before the verdict, moves on a skipped step as it does
in Megatron-LM.
"""

import argparse
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch

from .reporting import log

DEFAULT_MAX_CONSECUTIVE_NAN_STEPS = 5
DEFAULT_LOSS_SPIKE_WINDOW = 100  # Megatron-LM's is_unexpectedly_large samples 100 values


class NumericalFault(RuntimeError):
    """The run stopped: too many consecutive steps skipped for NaN / Inf or loss spikes."""


def add_numerics_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("numerical faults")
    group.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="skip the optimizer update of a step whose loss or gradients hold "
                       "a NaN or Inf (parameters, optimizer state and learning rate stay; the "
                       "batch counts as consumed) and stop after "
                       "--dots-max-consecutive-nan-steps such steps in a row (default on; with "
                       "--fp16 only the loss: the loss scaler handles overflowing gradients)")
    group.add_argument("--dots-max-consecutive-nan-steps", type=int, default=None, metavar="K",
                       help="stop the run, after saving a checkpoint when --save is given, "
                       "once K consecutive steps were skipped for NaN / Inf (or, with "
                       "--dots-skip-loss-spikes, as loss spikes): an isolated bad batch is "
                       "skipped, a diverged run ends (default "
                       f"{DEFAULT_MAX_CONSECUTIVE_NAN_STEPS})")
    group.add_argument("--dots-loss-spike-factor", type=float, default=None, metavar="F",
                       help="report a loss above F x the median loss of the last "
                       "--dots-loss-spike-window steps as a spike (a warning line, counted in "
                       "the log and TensorBoard); F > 1. Default: no spike detection")
    group.add_argument("--dots-loss-spike-window", type=int, default=None, metavar="N",
                       help="with --dots-loss-spike-factor: steps in the running median; "
                       "spikes are judged from the N-th good step on (default "
                       f"{DEFAULT_LOSS_SPIKE_WINDOW})")
    group.add_argument("--dots-skip-loss-spikes", action="store_true",
                       help="with --dots-loss-spike-factor: also skip the optimizer update of "
                       "a spike step, as for a NaN step")


def check_numerics_args(args, error) -> None:
    """Reject values and combinations that mean nothing; fill defaults. `error` is the
    exception class to raise (the caller's ArgumentError)."""
    factor, window = args.dots_loss_spike_factor, args.dots_loss_spike_window
    if factor is None:
        for flag, given in (("--dots-loss-spike-window", window is not None),
                            ("--dots-skip-loss-spikes", args.dots_skip_loss_spikes)):
            if given:
                raise error(f"{flag} needs --dots-loss-spike-factor F (spike detection is off "
                            "without it)")
    elif not (math.isfinite(factor) and factor > 1):
        raise error(f"--dots-loss-spike-factor must be a number above 1 (a loss above F x the "
                    f"recent median), got {factor}")
    if window is not None and window < 1:
        raise error(f"--dots-loss-spike-window must be at least 1 step, got {window}")
    if factor is not None and window is None:
        args.dots_loss_spike_window = DEFAULT_LOSS_SPIKE_WINDOW
    limit = args.dots_max_consecutive_nan_steps
    if limit is not None:
        if limit < 1:
            raise error(f"--dots-max-consecutive-nan-steps must be at least 1, got {limit}")
        if not args.check_for_nan_in_loss_and_grad and not args.dots_skip_loss_spikes:
            raise error("--dots-max-consecutive-nan-steps counts skipped steps, but "
                        "--no-check-for-nan-in-loss-and-grad skips none (add "
                        "--dots-skip-loss-spikes, or drop one of the two)")
    else:
        args.dots_max_consecutive_nan_steps = DEFAULT_MAX_CONSECUTIVE_NAN_STEPS


class LossSpikeDetector:
    """A loss above `factor` x the median of the last `window` recorded losses is a spike.

    No threshold until `window` losses are recorded (nor when their median is not positive:
    the losses here are cross entropies); non-finite losses are neither spikes nor recorded.
    """

    def __init__(self, factor: float, window: int, history: Iterable[float] = ()):
        self.factor, self.window = factor, window
        self._losses = deque((float(x) for x in history if math.isfinite(x)), maxlen=window)

    def threshold(self) -> Optional[float]:
        if len(self._losses) < self.window:
            return None
        median = statistics.median(self._losses)
        return self.factor * median if median > 0 else None

    def is_spike(self, loss: float) -> bool:
        threshold = self.threshold()
        return threshold is not None and math.isfinite(loss) and loss > threshold

    def record(self, loss: float) -> None:
        if math.isfinite(loss):
            self._losses.append(float(loss))

    def history(self) -> List[float]:
        return list(self._losses)


@dataclass(frozen=True)
class StepVerdict:
    """What the check found in one step (the same on every rank) and whether it skips."""

    loss_finite: bool
    grads_finite: Optional[bool]  # None: not checked (check off, or fp16)
    spike: bool
    threshold: Optional[float]  # the spike threshold of this step, None without one
    skip: bool

    @property
    def nan(self) -> bool:
        return not self.loss_finite or self.grads_finite is False


def grad_buffers(chunks: Sequence[torch.nn.Module]) -> List[torch.Tensor]:
    """The gradient tensors of these chunks: Megatron-Core DDP's contiguous buffers (dense and
    expert), or each parameter's `main_grad` / `.grad` for chunks without them."""
    tensors = []
    for chunk in chunks:
        buffers = (list(getattr(chunk, "buffers", None) or [])
                   + list(getattr(chunk, "expert_parallel_buffers", None) or []))
        if buffers:
            tensors += [buffer.grad_data for buffer in buffers]
            continue
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                tensors.append(grad)
    return tensors


def nonfinite_grads(chunks: Sequence[torch.nn.Module], device) -> torch.Tensor:
    """1.0 when this rank's gradients hold a NaN or Inf, else 0.0 (a tensor on `device`, not
    synchronised). A sum is finite exactly when every term is, barring an overflow of the
    fp32 sum itself (gradients beyond 1e38), which counts as Inf too."""
    tensors = grad_buffers(chunks)
    if not tensors:
        return torch.zeros((), device=device)
    total = torch.stack([t.sum(dtype=torch.float32).to(device) for t in tensors]).sum()
    return (~torch.isfinite(total)).float()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class NumericsGuard:
    """The loop's numerical-fault policy for one run (see the module docstring).

    `check` runs on every rank between backward and optimizer step (one all-reduce when a
    check is on); `after_step` counts into the TrainState, logs, and returns the message to
    stop with, if the run must stop.
    """

    def __init__(self, args, state):
        from ..compat.distributed import default_device

        self.check_nan = bool(args.check_for_nan_in_loss_and_grad)
        self.check_grads = self.check_nan and not args.fp16
        self.skip_spikes = bool(args.dots_skip_loss_spikes)
        self.max_consecutive = args.dots_max_consecutive_nan_steps
        self.detector = None
        if args.dots_loss_spike_factor is not None:
            self.detector = LossSpikeDetector(args.dots_loss_spike_factor,
                                              args.dots_loss_spike_window,
                                              getattr(state, "loss_window", ()))
        self.device = default_device()
        self.consecutive = 0  # steps skipped in a row by this check
        self.first_skipped = None

    def check(self, loss: float, chunks: Sequence[torch.nn.Module]) -> StepVerdict:
        """The verdict on a step whose global loss is `loss` and whose reduced gradients are
        in `chunks`; a collective when the NaN check or spike detection is on."""
        threshold = self.detector.threshold() if self.detector else None
        loss_bad = not math.isfinite(loss)
        spike = threshold is not None and math.isfinite(loss) and loss > threshold
        grads_finite = None
        if self.check_nan or self.detector is not None:
            grads_bad = (nonfinite_grads(chunks, self.device) if self.check_grads
                         else torch.zeros((), device=self.device))
            flags = torch.stack([torch.tensor(float(loss_bad), device=self.device), grads_bad,
                                 torch.tensor(float(spike), device=self.device)])
            if _world_size() > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            loss_any, grads_any, spike_any = (value > 0 for value in flags.tolist())
            loss_bad, spike = loss_bad or loss_any, spike_any
            if self.check_grads:
                grads_finite = not grads_any
        skip = (self.check_nan and (loss_bad or grads_finite is False)) or (
            self.skip_spikes and spike)
        return StepVerdict(loss_finite=not loss_bad, grads_finite=grads_finite, spike=spike,
                           threshold=threshold, skip=skip)

    def after_step(self, state, loss: float, grad_norm: Optional[float],
                   verdict: Optional[StepVerdict]) -> Optional[str]:
        """Count this step (state.iteration already advanced) into `state`, log what was found,
        and return why the run must stop now (None: go on)."""
        if verdict is None:  # no guard asked (train_step without one): count as before
            verdict = StepVerdict(math.isfinite(loss), None, False, None, False)
        iteration = state.iteration
        nan = verdict.nan or (grad_norm is not None and not math.isfinite(grad_norm))
        if nan:
            state.nan_iters += 1
            where = " and ".join(what for what, bad in (
                (f"the loss ({loss})", not verdict.loss_finite),
                ("the gradients", verdict.grads_finite is False or (
                    grad_norm is not None and not math.isfinite(grad_norm)))) if bad)
            log(f" WARNING: iteration {iteration}: NaN/Inf in {where}: " + (
                "skipped the optimizer update" if verdict.skip else
                "the update was applied (--no-check-for-nan-in-loss-and-grad)"))
        if verdict.spike:
            state.spike_iters += 1
            log(f" WARNING: iteration {iteration}: loss spike: {loss:.6E} > "
                f"{self.detector.factor:g} x the median of the last {self.detector.window} "
                f"steps = {verdict.threshold:.6E}: " + (
                    "skipped the optimizer update" if verdict.skip else
                    "the update was applied (--dots-skip-loss-spikes skips such steps)"))
        if verdict.skip:
            if self.consecutive == 0:
                self.first_skipped = iteration
            self.consecutive += 1
        else:
            self.consecutive = 0
            if self.detector is not None:
                self.detector.record(loss)
                state.loss_window = self.detector.history()
        if verdict.skip and self.consecutive >= self.max_consecutive:
            what = ("NaN/Inf in the loss or gradients" if not self.skip_spikes else
                    "NaN/Inf in the loss or gradients, or loss spikes")
            return (f"{self.consecutive} consecutive steps (iterations {self.first_skipped}-"
                    f"{iteration}) skipped for {what} (--dots-max-consecutive-nan-steps "
                    f"{self.max_consecutive}): the run has diverged or its data is bad. The "
                    f"parameters are those after iteration {self.first_skipped - 1}; resume "
                    "from the last checkpoint with a lower --lr, or check the samples these "
                    f"iterations read (consumed samples up to {state.consumed_samples})")
        return None
