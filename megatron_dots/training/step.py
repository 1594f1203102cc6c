"""One optimizer step of a dots model with Megatron-Core's schedules, DDP and optimizer.

A micro-batch is either a token tensor `[micro_batch, seq_length + 1]` (inputs are all but the
last token, labels all but the first) or a Megatron-Core GPT dataset batch, a dict of
`tokens`, `labels`, `loss_mask` and `position_ids` `[micro_batch, seq_length]`, optionally with
a boolean `padding_mask` (True on padding, which the router then neither counts nor balances;
SFT's variable-length micro-batches). `train_step` runs `forward_backward_func` (no
pipelining, 1F1B or interleaved 1F1B, as the parallel state says), whose
`finalize_model_grads` reduces gradients and updates the router bias, then steps the optimizer.

Loss normalisation follows the config, as Megatron-LM does: by default each micro-batch's loss
is its mean over its unmasked tokens and the step averages micro-batches (and DP ranks);
with `config.calculate_per_token_loss` the loss function returns the micro-batch's loss *sum*
and token count, and `finalize_model_grads` divides the gradients by the token count of the
whole global batch (all micro-batches, all DP ranks): the mean over every loss token of the
global batch, however the batch is split.
"""

import dataclasses
import functools
from typing import Iterable, List, NamedTuple, Optional, Sequence

import torch

from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config


def lm_loss_func(loss_mask: Optional[torch.Tensor], output_tensor: torch.Tensor):
    """Mean per-token cross entropy over the unmasked tokens; the reported value is a copy
    (the schedule scales `loss`)."""
    losses = output_tensor.float()
    if loss_mask is None:
        loss = losses.mean()
    else:
        mask = loss_mask.reshape(losses.shape).float()
        loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def per_token_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """For `config.calculate_per_token_loss`: the micro-batch's summed cross entropy over its
    loss tokens, their count, and both for the report (Megatron-LM's three-value form)."""
    mask = loss_mask.reshape(output_tensor.shape).float()
    total = (output_tensor.float() * mask).sum()
    count = mask.sum().to(torch.int)
    report = torch.stack([total.detach().clone(), mask.sum().detach()])
    return total, count, {"lm loss": report}


def gpt_forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron-Core forward step: next micro-batch -> per-token losses. The all-to-all
    overlap schedule (combined 1F1B) calls it with `return_schedule_plan=True` and gets the
    model's schedule plan instead, which it runs itself."""
    batch = next(data_iterator)
    extra = {}
    if isinstance(batch, dict):
        inputs, labels = batch["tokens"], batch["labels"]
        positions, loss_mask = batch["position_ids"], batch["loss_mask"]
        if batch.get("padding_mask") is not None:
            extra["padding_mask"] = batch["padding_mask"]
    else:
        inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
        loss_mask = None
    if get_model_config(model).calculate_per_token_loss:
        if loss_mask is None:
            loss_mask = torch.ones_like(labels)
        loss_func = functools.partial(per_token_loss_func, loss_mask)
    else:
        loss_func = functools.partial(lm_loss_func, loss_mask)
    if return_schedule_plan:
        return model.build_schedule_plan(inputs, positions, None, labels=labels, **extra), loss_func
    return model(inputs, positions, None, labels=labels, **extra), loss_func


def wrap_with_ddp(
    chunks: Sequence[torch.nn.Module], config, ddp_config: Optional[DistributedDataParallelConfig] = None
) -> List[DistributedDataParallel]:
    """Megatron DDP around each chunk (bucketing only on the first, as Megatron-LM does) and
    `finalize_model_grads` installed on the config. With `config.bf16` / `config.fp16` each
    chunk is first wrapped in Megatron-Core's `Float16Module`, as Megatron-LM's `get_model`
    does."""
    if config.bf16 or config.fp16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = ddp_config or DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False
    )
    if config.delay_wgrad_compute and not ddp_config.delay_wgrad_compute:
        # Deferred expert weight gradients reach DDP through backward_dw's hooks only if DDP
        # knows (it then skips those parameters' grad-accumulation hooks).
        ddp_config = dataclasses.replace(
            ddp_config, delay_wgrad_compute=config.delay_wgrad_compute)
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def forward_backward(
    chunks: Sequence[DistributedDataParallel],
    micro_batches: Iterable[torch.Tensor],
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    recompute=None,
) -> float:
    """Zero the gradients, then forward + backward over this DP rank's micro-batches; the
    schedule ends with `finalize_model_grads` (gradient reduction, router-bias update).
    With `forward_only`, only the forward (chunks need not be DDP-wrapped). `recompute`, a
    `recompute.RecomputeController`, chooses each micro-batch's activation recompute.

    Returns the mean loss over the global batch, known on every rank.
    """
    micro_batches = list(micro_batches)
    for chunk in chunks:
        if not forward_only:
            chunk.zero_grad_buffer()
    iterators = [iter(micro_batches) for _ in chunks]
    forward_step_func = gpt_forward_step
    if recompute is not None:
        recompute.begin_step(micro_batches, forward_only=forward_only)
        forward_step_func = recompute.wrap(gpt_forward_step)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if recompute is not None:
        recompute.end_step()
    return global_mean_loss(losses)


class StepResult(NamedTuple):
    """One optimizer step: global mean loss, gradient norm (None when not computed) and
    whether the parameters were updated (False: an fp16 overflow, or the numerics guard,
    skipped the step); the guard's `numerics.StepVerdict` when one was given."""

    loss: float
    grad_norm: Optional[float]
    update_successful: bool
    numerics: Optional[object] = None


def train_step(
    chunks: Sequence[DistributedDataParallel],
    optimizer,
    micro_batches: Iterable[torch.Tensor],
    seq_length: int,
    micro_batch_size: int,
    recompute=None,
    numerics=None,
) -> StepResult:
    """`forward_backward` then an optimizer step. `numerics`, a `numerics.NumericsGuard`,
    judges the loss and gradients first (on every rank alike) and may skip the step."""
    optimizer.zero_grad()
    loss = forward_backward(
        chunks, micro_batches, seq_length, micro_batch_size, recompute=recompute
    )
    verdict = numerics.check(loss, chunks) if numerics is not None else None
    if verdict is not None and verdict.skip:
        return StepResult(loss, None, False, verdict)
    update_successful, grad_norm, _ = optimizer.step()
    return StepResult(loss, grad_norm, bool(update_successful), verdict)


def global_mean_loss(losses) -> float:
    """The global batch's loss, on every rank: the mean of the micro-batch means, or with
    per-token losses (a `[sum, count]` report) the mean over all its loss tokens."""
    total = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            report = item["lm loss"].detach().double().cpu().flatten()
            total += report if report.numel() == 2 else torch.cat([report, report.new_ones(1)])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()
