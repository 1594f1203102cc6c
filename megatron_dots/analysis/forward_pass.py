"""Forward-only passes of domain windows through a loaded model, under any TP / PP / EP layout:
per window, the routed slots each MoE layer gave each expert and the summed next-token cross
entropy.

Windows are padded to one length (a multiple of the TP size, for sequence parallelism) and
grouped `micro_batch_size` at a time; batches go round-robin to the data-parallel ranks, padded
with empty batches so that every rank (and so every expert-parallel all-to-all) runs the same
number of passes. Padding is neither counted nor scored. Routing is read from each
`DotsRouter`'s output through a forward hook: the top-k selections after the expert bias,
exactly as training routes; with sequence parallelism each TP rank routes its own slice of
the sequence. Every rank adds what it saw to per-window sums that one all-reduce completes,
so the result does not depend on the layout.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..storage.progress import progress_bar


@dataclass
class WindowResults:
    """Per window: routed slots [W, MoE layers, experts] (None when not counted), summed
    cross entropy [W] and predicted positions [W]."""

    counts: Optional[np.ndarray]
    loss_sum: np.ndarray
    predicted: np.ndarray

    @property
    def loss(self) -> float:
        """Mean next-token cross entropy over every predicted position."""
        return float(self.loss_sum.sum() / max(1, self.predicted.sum()))


def batch_windows(n_windows: int, rows: int, dp_size: int) -> List[List[int]]:
    """Window ids of every batch, for all DP ranks in order (batch k runs on DP rank k % dp),
    padded with empty batches to a multiple of `dp_size`."""
    ids = [list(range(first, min(first + rows, n_windows))) for first in range(0, n_windows, rows)]
    return ids + [[] for _ in range(-len(ids) % dp_size)]


def _batch(windows, ids: List[int], rows: int, length: int):
    tokens = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.zeros(rows, length, dtype=torch.long)
    valid = torch.zeros(rows, length, dtype=torch.bool)
    window_ids = torch.full((rows,), -1, dtype=torch.long)
    for row, w in enumerate(ids):
        ids_w = torch.as_tensor(windows[w], dtype=torch.long)
        n = len(ids_w)
        tokens[row, :n] = ids_w
        labels[row, :n - 1] = ids_w[1:]
        valid[row, :n] = True
        window_ids[row] = w
    label_mask = valid.clone()
    lengths = valid.sum(dim=1)
    for row in range(rows):
        if lengths[row]:
            label_mask[row, lengths[row] - 1] = False
    return {"tokens": tokens, "labels": labels, "valid": valid, "label_mask": label_mask,
            "window_ids": window_ids}


class _Recorder:
    """Per-window sums this rank saw: routed slots (forward hooks on the routers) and losses."""

    def __init__(self, model, n_windows: int, count_routing: bool):
        from megatron.core import parallel_state

        from ..model.moe import dots_moe_layers

        self.device = model.device
        experts = model.cfg.num_moe_experts
        slots = {n: i for i, n in enumerate(model.moe_layers)}
        self.counts = (torch.zeros(n_windows, len(slots), experts, dtype=torch.int32,
                                   device=self.device) if count_routing else None)
        self.loss_sum = torch.zeros(n_windows, dtype=torch.float64, device=self.device)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.sequence_parallel = model.config.sequence_parallel
        self.batch = None
        self.hooks = []
        self.moe_layers = dots_moe_layers([model.chunk])
        if count_routing:
            for moe in self.moe_layers:
                slot = slots[moe.layer_number]
                self.hooks.append(moe.router.register_forward_hook(
                    lambda module, args, output, slot=slot: self._count(slot, output[1])))

    def _count(self, slot: int, routing_map: torch.Tensor) -> None:
        batch = self.batch
        valid = batch["valid"].t()  # [s, b]: the router sees tokens sequence-major
        if self.sequence_parallel and self.tp_size > 1:
            valid = valid.chunk(self.tp_size, dim=0)[self.tp_rank]
        rows = valid.shape[1]
        if routing_map.shape[0] != valid.numel():
            raise RuntimeError(f"router saw {routing_map.shape[0]} tokens, expected "
                               f"{valid.numel()} (layout not understood)")
        keep = valid.reshape(-1)
        column = torch.arange(rows, device=self.device).repeat(valid.shape[0])[keep]
        per_row = torch.zeros(rows, routing_map.shape[1], dtype=torch.int32, device=self.device)
        per_row.index_add_(0, column, routing_map[keep].to(torch.int32))
        real = batch["window_ids"] >= 0
        self.counts[batch["window_ids"][real], slot] += per_row[real]

    def loss(self, batch, output_tensor: torch.Tensor):
        losses = output_tensor.float() * batch["label_mask"]
        if self.tp_rank == 0:  # every TP rank holds the same (vocab-reduced) losses
            real = batch["window_ids"] >= 0
            self.loss_sum[batch["window_ids"][real]] += losses.sum(dim=1).double()[real]
        return losses.sum(), {}

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def run_windows(model, windows: Sequence[np.ndarray], micro_batch_size: int = 4,
                count_routing: bool = True, variant: Optional[str] = None,
                progress: bool = True, desc: str = "forward",
                group: int = 8) -> WindowResults:
    """Every window through `model` (an `analysis.model_source.LoadedModel`), with the MoE
    output variant `variant` (`DotsMoELayer.ablated`); results on every rank."""
    from contextlib import ExitStack

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    longest = max(len(w) for w in windows)
    length = -(-longest // tp) * tp
    batch_ids = batch_windows(len(windows), micro_batch_size, dp_size)
    recorder = _Recorder(model, len(windows), count_routing)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        recorder.batch = batch
        positions = torch.arange(length, device=model.device).expand_as(batch["tokens"])
        output = chunk(batch["tokens"], positions, None, labels=batch["labels"])
        return output, lambda out: recorder.loss(batch, out)

    def to_device(batch):
        return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    rounds = len(batch_ids) // dp_size
    show = progress and torch.distributed.get_rank() == 0
    total = sum(len(w) for w in windows)
    try:
        with ExitStack() as stack, torch.no_grad():
            for layer in recorder.moe_layers:
                stack.enter_context(layer.ablated(variant))
            bar = stack.enter_context(progress_bar(total, desc, unit="tok", enabled=show))
            for start in range(0, rounds, group):
                stop = min(rounds, start + group)
                mine = [to_device(_batch(windows, batch_ids[r * dp_size + dp_rank],
                                         micro_batch_size, length))
                        for r in range(start, stop)]
                get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(mine), model=model.chunk,
                    num_microbatches=len(mine), seq_length=length,
                    micro_batch_size=micro_batch_size, forward_only=True)
                bar.update(sum(len(windows[w]) for ids in
                               batch_ids[start * dp_size:stop * dp_size] for w in ids))
    finally:
        recorder.close()
    counts, loss_sum = recorder.counts, recorder.loss_sum
    if torch.distributed.get_world_size() > 1:
        if counts is not None:
            torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(loss_sum)
    return WindowResults(
        counts=None if counts is None else counts.cpu().numpy().astype(np.int64),
        loss_sum=loss_sum.cpu().numpy(),
        predicted=np.array([len(w) - 1 for w in windows], dtype=np.int64))
