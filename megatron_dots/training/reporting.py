"""Everything a training run reports, on the logging rank: the per-step loss CSV and
TensorBoard scalars, the Megatron-LM log line every `--log-interval` (with the expert-load
telemetry, gathered from all ranks, and with `--dots-a2a-timing` a line of all-to-all timing,
see `telemetry/a2a_timing.py` and `a2a_report.py`), and validation results.

Every rank makes a `Reporter` and calls it at the same points (the telemetry gather is a
collective); only global rank 0 writes. Time spent validating and saving is excluded from
the per-iteration time, as Megatron-LM's timers do.
"""

import contextlib
import time

import torch

from .metrics import LossCSV, flops_per_token, log_line, memory_gib, tensorboard_writer


def is_logging_rank() -> bool:
    return torch.distributed.get_rank() == 0


def log(text: str) -> None:
    """Print on the logging rank."""
    if is_logging_rank():
        print(text, flush=True)


class Reporter:
    def __init__(self, args, model_config, start_iteration: int, chunks=()):
        from ..telemetry.expert_load import ExpertLoadLogger

        self.args = args
        self.model_config = model_config
        self.flops = flops_per_token(args.dots_config, args.seq_length)
        writer = loss_csv = experts = None
        if is_logging_rank():
            writer = tensorboard_writer(args.tensorboard_dir)
            if args.dots_loss_csv:
                loss_csv = LossCSV(args.dots_loss_csv, start_iteration)
            experts = ExpertLoadLogger(args.dots_expert_load_csv, writer)
        self.writer, self.loss_csv, self.experts = writer, loss_csv, experts
        self.a2a = None  # --dots-a2a-timing: probes on every rank, output on the logging rank
        if getattr(args, "dots_a2a_timing", False):
            from ..telemetry.a2a_report import A2ATimingReport

            self.a2a = A2ATimingReport(chunks, args.dots_config.moe_layer_numbers,
                                       args.dots_a2a_timing_csv
                                       if is_logging_rank() else None, writer)
        self._reset_window()

    def _reset_window(self):
        self.window = {"time": time.time(), "tokens": 0, "iters": 0, "loss": 0.0,
                       "updated": 0, "updated_loss": 0.0}

    def step(self, state, loss, lr, grad_norm, global_batch, chunks, recompute=None,
             loss_scale=None, updated=True, force_log=False, tokens=None) -> None:
        """After every optimizer step (all ranks); `loss_scale` only with fp16; `tokens`: the
        step's tokens when not `global_batch` x --seq-length (SFT). As Megatron-LM,
        the logged loss averages the steps that updated (all of the interval's when none did);
        `force_log` logs now (the same on every rank: the line gathers from all)."""
        args, iteration = self.args, state.iteration
        self.window["tokens"] += global_batch * args.seq_length if tokens is None else tokens
        self.window["iters"] += 1
        self.window["loss"] += loss
        if updated:
            self.window["updated"] += 1
            self.window["updated_loss"] += loss
        if self.loss_csv:
            self.loss_csv.write(iteration, loss, lr, grad_norm, state.consumed_samples,
                                global_batch)
        if self.writer:
            self.writer.add_scalar("lm loss", loss, iteration)
            self.writer.add_scalar("learning-rate", lr, iteration)
            self.writer.add_scalar("batch-size", global_batch, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("grad-norm", grad_norm, iteration)
            if loss_scale is not None:
                self.writer.add_scalar("loss-scale", loss_scale, iteration)
            self.writer.add_scalar("numerics/skipped-iterations", state.skipped_iters, iteration)
            self.writer.add_scalar("numerics/nan-iterations", state.nan_iters, iteration)
            if args.dots_loss_spike_factor is not None:
                self.writer.add_scalar("numerics/loss-spikes", state.spike_iters, iteration)
            self.writer.add_scalar("lm loss vs samples", loss, state.consumed_samples)
        if force_log or iteration % args.log_interval == 0 or iteration == args.train_iters:
            self._interval(state, lr, grad_norm, global_batch, chunks, recompute, loss_scale)

    def _interval(self, state, lr, grad_norm, global_batch, chunks, recompute=None,
                  loss_scale=None) -> None:
        from ..telemetry.expert_load import summarize
        from .router_load import gather_expert_load

        counts, bias, layers = gather_expert_load(chunks, self.model_config)  # collective
        a2a = self.a2a.gather(self.window["iters"]) if self.a2a else None  # collective
        if not is_logging_rank():
            self._reset_window()
            return
        window, iteration = self.window, state.iteration
        elapsed = time.time() - window["time"]
        tokens_per_s = window["tokens"] / elapsed
        tflops = tokens_per_s * self.flops / torch.distributed.get_world_size() / 1e12
        memory = memory_gib()
        log(log_line(iteration, self.args.train_iters, state.consumed_samples,
                     1000 * elapsed / window["iters"], tflops, tokens_per_s, lr, global_batch,
                     (window["updated_loss"] / window["updated"] if window["updated"]
                      else window["loss"] / window["iters"]), grad_norm, state.skipped_iters,
                     state.nan_iters, memory, loss_scale,
                     spikes=(state.spike_iters if self.args.dots_loss_spike_factor is not None
                             else None)))
        if a2a:
            log(f" {self.a2a.log(iteration, a2a)}")
        if self.writer:
            self.writer.add_scalar("throughput/tflops-per-gpu", tflops, iteration)
            self.writer.add_scalar("throughput/tokens-per-second", tokens_per_s, iteration)
            for name, value in memory.items():
                self.writer.add_scalar(f"memory/{name}", value, iteration)
        if recompute is not None:
            window_stats = recompute.take_window()
            log(f" {recompute.describe(window_stats)}")
            if self.writer:
                for name, value in window_stats.items():
                    self.writer.add_scalar(f"recompute/{name}", value, iteration)
        if layers:
            for alarm in self.experts.log(iteration, summarize(counts, bias, layers)):
                log(f" WARNING: {alarm}")
        self._reset_window()

    def validation(self, iteration: int, loss: float) -> None:
        log(f" validation at iteration {iteration} | lm loss: {loss:.6E}")
        if self.writer:
            self.writer.add_scalar("lm loss validation", loss, iteration)

    @contextlib.contextmanager
    def paused(self):
        """Validation and checkpointing inside do not count as step time."""
        start = time.time()
        try:
            yield
        finally:
            self.window["time"] += time.time() - start

    def close(self) -> None:
        if self.a2a:
            self.a2a.close()
        if self.loss_csv:
            self.loss_csv.close()
        if self.writer:
            self.writer.close()
