"""The pretraining loop: Megatron-Core model, DDP, optimizer, schedules, data, checkpoints, logs.

`pretrain(args)` is what `megatron-dots pretrain` and `examples/pretrain_dots.py` run, on one
process or under torchrun: set up Megatron-Core's parallel state from the flags, build this
rank's dots model chunks, wrap them in Megatron-Core DDP (with `finalize_model_grads`, which
reduces gradients and applies the router-bias update), resume from `--load`, then step through
the global batches (`--global-batch-size` or the `--dots-batch-stages` schedule), logging like
Megatron-LM, validating every `--eval-interval`, saving every `--save-interval`, and on
SIGTERM when `--exit-signal-handler` is given; `numerics.NumericsGuard` skips steps with NaN /
Inf (or loss spikes) and ends a run that keeps producing them (a checkpoint, then
`NumericalFault`). It returns a summary for callers (the demo).
"""

import os
import signal
import time
from dataclasses import dataclass, field
from typing import List, Tuple

import torch

from ..storage.checkpoint_format import iteration_dir
from .arguments import ArgumentError
from .batch_stages import describe_batches, global_batch_size
from .data_stage import stage_record, train_samples
from .precision import logged_loss_scale, precision_name
from .reporting import Reporter, log
from .resume import TrainState, load_resumed, plan_resume


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports to its caller."""

    iteration: int
    losses: List[Tuple[int, float]] = field(default_factory=list)
    valid_losses: List[Tuple[int, float]] = field(default_factory=list)
    saved: List[str] = field(default_factory=list)
    stopped_by_signal: bool = False
    seconds: float = 0.0


class _SignalCatcher:
    """Remembers SIGTERM/SIGINT so the loop can save after the current step."""

    def __init__(self, enabled: bool):
        self.received = None
        self._previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.received else 0])
        if torch.distributed.get_world_size() > 1:
            flag = flag.to(_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device():
    from ..compat.distributed import default_device

    return default_device()


def setup_model_parallel(args) -> None:
    """torch.distributed and Megatron-Core's parallel state for these flags; seeds."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    # As Megatron-LM: pipeline stages draw from different streams, data-parallel ranks share.
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    import random

    import numpy

    random.seed(seed)
    numpy.random.seed(seed)
    model_parallel_cuda_manual_seed(seed)


def transformer_config(args):
    """The Megatron-Core TransformerConfig of the flags' model and layout."""
    from .precision import transformer_precision

    cuda = torch.cuda.is_available()
    config = args.dots_config.to_transformer_config(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        **transformer_precision(args),
        # gloo: batched isend/irecv corrupts activations under PP (see DESIGN.md).
        batch_p2p_comm=cuda,
    )
    if args.dots_a2a_overlap:
        from ..schedule.a2a_overlap import enable_a2a_overlap

        enable_a2a_overlap(config, delay_wgrad=args.delay_wgrad_compute)
    return config


def build_model(args, config):
    """This rank's model chunks wrapped in Megatron-Core DDP (bf16 / fp16 via Float16Module)."""
    from ..model import build_dots_model_chunks
    from .precision import ddp_config
    from .step import wrap_with_ddp

    chunks = build_dots_model_chunks(args.dots_config, config, backend=args.dots_expert_backend)
    device = _device()
    for chunk in chunks:
        chunk.to(device)
    return wrap_with_ddp(chunks, config, ddp_config(args))


def build_recompute(args, config, chunks):
    """The input-aware recompute planner for --dots-recompute-budget-gb, or None."""
    if args.dots_recompute_budget_gb is None:
        return None
    from megatron.core import parallel_state

    from ..recompute import RecomputeController, activation_budget, static_bytes
    from ..recompute.budget import format_bytes

    dp = parallel_state.get_data_parallel_world_size()
    static = static_bytes(
        chunks, grad_reduce_in_fp32=True, distributed_optimizer=args.use_distributed_optimizer,
        data_parallel_size=dp, expert_data_parallel_size=dp // args.expert_model_parallel_size)
    # Tensor- and expert-parallel peers must plan alike: take the largest static estimate.
    static_t = torch.tensor([static], dtype=torch.int64, device=_device())
    for group in (parallel_state.get_tensor_model_parallel_group(),
                  parallel_state.get_expert_model_parallel_group()):
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(static_t, op=torch.distributed.ReduceOp.MAX, group=group)
    static = int(static_t.item())
    try:
        budget = activation_budget(args.dots_recompute_budget_gb, static)
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    log(f" recompute planner: budget {args.dots_recompute_budget_gb:g} GiB = parameters, "
        f"gradients and Adam state {format_bytes(static)} + activations "
        f"{format_bytes(budget)}; first steps calibrate (every layer recomputes)")
    return RecomputeController(chunks, config, budget, bucket_tokens=args.dots_recompute_bucket,
                               margin=args.dots_recompute_margin)


def _save(args, chunks, optimizer, scheduler, state: TrainState, result: TrainResult) -> None:
    from .checkpointing import save_checkpoint

    start = time.time()
    path = save_checkpoint(
        chunks, args.save, state.iteration, args.dots_config, optimizer=optimizer,
        scheduler=scheduler, consumed_samples=state.consumed_samples,
        consumed_tokens=state.consumed_tokens,
        skipped_iters=state.skipped_iters, nan_iters=state.nan_iters,
        spike_iters=state.spike_iters, loss_window=state.loss_window,
        precision=precision_name(args), **stage_record(args, state.data_stage_start),
    )
    result.saved.append(path)
    log(f" saved checkpoint {path} in {time.time() - start:.1f} s")


def _evaluate(args, chunks, feed, valid_round: int) -> float:
    from .step import forward_backward

    gbs = global_batch_size(args.batch_stages, 0)
    for chunk in chunks:
        chunk.eval()
    losses = []
    with torch.no_grad():
        for k in range(args.eval_iters):
            batches = feed.valid_batches(valid_round * args.eval_iters + k, gbs)
            losses.append(forward_backward(chunks, batches, feed.seq_length_of(batches),
                                           args.micro_batch_size, forward_only=True))
    for chunk in chunks:
        chunk.train()
    return sum(losses) / len(losses)


def pretrain(args) -> TrainResult:
    """Run the pretraining the validated flags describe (see the module docstring)."""
    from .data import GPTDataFeed

    return train(args, GPTDataFeed)


def train(args, make_feed) -> TrainResult:
    """The training loop over the batches of `make_feed(args, train_samples, valid_samples)`
    (called once the parallel state exists; see `data.GPTDataFeed` for what a feed does)."""
    from megatron.core import parallel_state

    from .comm_overlap import DataParallelOverlap
    from .optimizer import build_optimizer, build_scheduler
    from .numerics import NumericalFault, NumericsGuard
    from .step import train_step

    setup_model_parallel(args)
    try:
        cfg = args.dots_config
        point = plan_resume(args)
        state = point.state
        samples = train_samples(args, state.iteration, state.consumed_samples,
                                state.consumed_tokens, state.data_stage_start)
        rounds = (args.train_iters // args.eval_interval + 1) if args.eval_iters else 0
        largest = max(s.global_batch_size for s in args.batch_stages)
        feed = make_feed(args, samples, rounds * args.eval_iters * largest)
        config = transformer_config(args)
        feed.configure(config)
        chunks = build_model(args, config)
        optimizer = build_optimizer(args, chunks)
        scheduler = build_scheduler(args, optimizer)
        load_resumed(args, point, chunks, optimizer, scheduler)
        overlap = DataParallelOverlap(chunks, optimizer)
        recompute = build_recompute(args, config, chunks)

        dp_size = parallel_state.get_data_parallel_world_size()
        log(f" dots model: {cfg.num_parameters()[0]:,} parameters "
            f"({cfg.num_parameters()[1]:,} active per token); layout tp "
            f"{args.tensor_model_parallel_size} pp {args.pipeline_model_parallel_size} "
            f"vpp {args.virtual_pipeline_model_parallel_size or 1} ep "
            f"{args.expert_model_parallel_size} dp {dp_size}; training to iteration "
            f"{args.train_iters} on {samples:,} samples of {args.seq_length} tokens")
        log(f" global batch: {describe_batches(args.batch_stages, args.seq_length)}")
        if config.overlap_moe_expert_parallel_comm:
            log(" schedule: all-to-all overlap (combined 1F1B, shared experts during dispatch"
                + (", delayed expert wgrad" if config.delay_wgrad_compute else "") + ")")
            if torch.cuda.is_available() and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
                log(" WARNING: CUDA_DEVICE_MAX_CONNECTIONS=1 makes the GPU run the "
                    "communication stream's kernels in launch order with the compute stream's: "
                    "the all-to-all will not overlap; unset it or set it to 32")

        result = TrainResult(iteration=state.iteration)
        reporter = Reporter(args, config, state.iteration, chunks)
        numerics = NumericsGuard(args, state)
        signals = _SignalCatcher(args.exit_signal_handler)
        start = time.time()
        valid_round = 0
        try:
            while state.iteration < args.train_iters:
                gbs = global_batch_size(args.batch_stages, state.consumed_tokens)
                position = state.consumed_samples - state.data_stage_start  # in this data
                batches = feed.train_batches(position, gbs)
                loss, grad_norm, updated, verdict = train_step(
                    chunks, optimizer, batches, feed.seq_length_of(batches),
                    args.micro_batch_size, recompute=recompute, numerics=numerics)
                step_tokens = feed.global_tokens(position, gbs)
                overlap.after_step(updated)
                state.iteration += 1
                state.consumed_samples += gbs
                state.consumed_tokens += step_tokens
                if not updated:
                    state.skipped_iters += 1
                fault = numerics.after_step(state, loss, grad_norm, verdict)
                if updated:  # as Megatron-LM: a skipped step does not advance the schedule
                    scheduler.step(gbs)
                result.losses.append((state.iteration, loss))
                reporter.step(state, loss, optimizer.param_groups[0]["lr"], grad_norm, gbs,
                              chunks, recompute, loss_scale=logged_loss_scale(args, optimizer),
                              updated=updated, force_log=fault is not None,
                              tokens=step_tokens)

                stop = signals.any_rank() if args.exit_signal_handler else False
                exit_now = bool(args.exit_interval and state.iteration % args.exit_interval == 0)
                evaluate = bool(feed.has_validation and args.eval_iters
                                and state.iteration % args.eval_interval == 0)
                save = bool(args.save and (stop or exit_now or fault or (
                    args.save_interval and state.iteration % args.save_interval == 0)))
                if evaluate or save:
                    with reporter.paused(), overlap.parameters_in_sync():
                        if evaluate:
                            valid_loss = _evaluate(args, chunks, feed, valid_round)
                            valid_round += 1
                            result.valid_losses.append((state.iteration, valid_loss))
                            reporter.validation(state.iteration, valid_loss)
                        if save:
                            _save(args, chunks, optimizer, scheduler, state, result)
                if fault:
                    raise NumericalFault(fault)
                if stop or exit_now:
                    result.stopped_by_signal = stop
                    log(f" exiting at iteration {state.iteration} "
                        f"({'signal' if stop else '--exit-interval'})")
                    break
            else:
                saved_last = bool(result.saved) and result.saved[-1] == iteration_dir(
                    args.save or "", state.iteration)
                overlap.close()
                if args.save and result.losses and not saved_last:
                    _save(args, chunks, optimizer, scheduler, state, result)
        finally:
            overlap.close()
            signals.restore()
            reporter.close()
        result.iteration = state.iteration
        result.seconds = time.time() - start
        return result
    finally:
        parallel_state.destroy_model_parallel()
