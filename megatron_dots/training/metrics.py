"""What a training run reports: Megatron-LM's per-iteration log line, TensorBoard scalars and
a loss CSV, plus the model FLOPs behind the TFLOP/s figure.

FLOPs per token count the matrix multiplies of the active parameters (the routed top-k experts,
the shared experts, attention projections, the router and the LM head, not the input
embedding) at 2 FLOPs per multiply-add, plus causal attention scores and values
(2 x 2 x seq x heads x head_dim / 2 per layer); backward is twice the forward.
"""

import csv
import io
import os
import time
from typing import Dict, Optional

import torch

from ..config import DotsConfig
from ..storage.atomic import atomic_write_text


def flops_per_token(cfg: DotsConfig, seq_length: int) -> float:
    """Training (forward + backward) FLOPs per token."""
    _, active = cfg.num_parameters()
    matmul_params = active - cfg.vocab_size * cfg.hidden_size  # input embedding is a lookup
    attention = 2 * seq_length * cfg.num_attention_heads * cfg.kv_channels  # causal: half
    return 3.0 * (2.0 * matmul_params + cfg.num_layers * attention)


def memory_gib() -> Dict[str, float]:
    """Peak GPU memory of this process (GiB), or its resident host memory on CPU."""
    if torch.cuda.is_available():
        return {"mem-max-allocated-gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem-reserved-gib": torch.cuda.memory_reserved() / 2**30}
    import psutil

    return {"host-rss-gib": psutil.Process().memory_info().rss / 2**30}


def log_line(iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
             tflops_per_gpu: float, tokens_per_s: float, lr: float, global_batch_size: int,
             loss: float, grad_norm: Optional[float], skipped: int, nan_iters: int,
             memory: Dict[str, float], loss_scale: Optional[float] = None,
             spikes: Optional[int] = None) -> str:
    """One progress line in Megatron-LM's format (plus tokens/s and memory); the loss scale
    only for fp16 runs, the loss-spike count only with spike detection on."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{stamp}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.3f}",
        f"tokens per second: {tokens_per_s:,.0f}",
        f"learning rate: {lr:.6E}",
        f"global batch size: {global_batch_size:5d}",
        f"lm loss: {loss:.6E}",
        *([f"loss scale: {loss_scale:.1f}"] if loss_scale is not None else []),
        f"grad norm: {grad_norm:.3f}" if grad_norm is not None else "grad norm: n/a",
        f"number of skipped iterations: {skipped:3d}",
        f"number of nan iterations: {nan_iters:3d}",
        *([f"number of loss spikes: {spikes:3d}"] if spikes is not None else []),
    ]
    parts += [f"{name}: {value:.2f}" for name, value in memory.items()]
    return " | ".join(parts) + " |"


class LossCSV:
    """Appends iteration, loss, lr, grad norm, consumed samples per step; flushed every row, so
    a crash loses nothing logged. A resumed run drops rows past its starting iteration."""

    COLUMNS = ["iteration", "loss", "lr", "grad_norm", "consumed_samples", "global_batch_size"]

    def __init__(self, path: str, start_iteration: int):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if os.path.isfile(path):
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
            if rows and rows[0] != self.COLUMNS:
                raise ValueError(f"{path}: not a loss CSV of this program (header {rows[0]}); "
                                 "move it away or pass --dots-loss-csv")
            kept = [r for r in rows[1:] if r and int(r[0]) <= start_iteration]
        text = io.StringIO()
        csv.writer(text).writerows([self.COLUMNS] + kept)
        atomic_write_text(path, text.getvalue())
        self._handle = open(path, "a", newline="")
        self._writer = csv.writer(self._handle)

    def write(self, iteration, loss, lr, grad_norm, consumed_samples, global_batch_size):
        self._writer.writerow([iteration, repr(loss), repr(lr),
                               "" if grad_norm is None else repr(grad_norm),
                               consumed_samples, global_batch_size])
        self._handle.flush()

    def close(self):
        self._handle.close()


def tensorboard_writer(directory: Optional[str]):
    """A TensorBoard SummaryWriter, or None without --tensorboard-dir."""
    if not directory:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RuntimeError("--tensorboard-dir needs the tensorboard package (pip install "
                           "tensorboard)") from err
    return SummaryWriter(log_dir=directory, max_queue=100)
