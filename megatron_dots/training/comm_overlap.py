"""Overlapped data-parallel communication in the training loop, wired as Megatron-LM does.

Megatron-Core's DDP does the communication; the loop has to tell the schedule when to hold it
back and when to start it, and keep the parameters in sync whenever something reads them:

* `--overlap-grad-reduce`: the schedule gets the chunks' `no_sync` (no reduction during the
  first micro-batches' backward) and `start_grad_sync` (reduce a chunk's buckets as soon as its
  last backward is done); `finalize_model_grads` waits for them.
* `--overlap-param-gather` (distributed optimizer): the optimizer step leaves the updated
  parameters in its shards; each module's forward pre-hook all-gathers its bucket during the
  next forward (with virtual pipeline stages the schedule starts the gathers,
  `param_sync_func`). The hooks stay off until a first step has succeeded (a checkpoint
  just loaded is already in sync; a skipped fp16 step changes nothing), and are switched off,
  with a synchronous all-gather, around anything that reads the parameters outside a training
  forward: validation, checkpoint saves, the end of training.
"""

import contextlib
from typing import Sequence

from megatron.core.utils import get_model_config


def _one_or_list(items):
    return items[0] if len(items) == 1 else items


class DataParallelOverlap:
    """The training loop's side of DDP's overlapped gradient reduce and parameter gather."""

    def __init__(self, chunks: Sequence, optimizer):
        """`chunks`: the DDP-wrapped model chunks, whose DDP config says what overlaps."""
        self.chunks = list(chunks)
        self.config = get_model_config(self.chunks[0])
        # fp16: the schedule multiplies each micro-batch's loss by the current loss scale.
        self.config.grad_scale_func = optimizer.scale_loss
        if self.chunks[0].ddp_config.overlap_grad_reduce:
            self.config.no_sync_func = _one_or_list([c.no_sync for c in self.chunks])
            self.config.grad_sync_func = _one_or_list([c.start_grad_sync for c in self.chunks])
        # DDP's own decision (distributed optimizer with --overlap-param-gather).
        self.uses_hooks = bool(self.chunks[0].use_forward_hook)
        self._param_sync_func = None
        if self.uses_hooks and self.chunks[0].ddp_config.align_param_gather:
            self._param_sync_func = _one_or_list([c.start_param_sync for c in self.chunks])
        self.hooks_on = False
        if self.uses_hooks:
            # DDP registers the hooks at construction; the first step runs without them.
            self._hooks(False, param_sync=False)

    def _hooks(self, on: bool, param_sync: bool = True) -> None:
        for chunk in self.chunks:
            if on:
                chunk.enable_forward_pre_hook()
            else:
                chunk.disable_forward_pre_hook(param_sync=param_sync)
        self.config.param_sync_func = self._param_sync_func if on else None
        self.hooks_on = on

    def after_step(self, update_successful: bool) -> None:
        """After each optimizer step: from the first successful one on, gather in the forward."""
        if self.uses_hooks and not self.hooks_on and update_successful:
            self._hooks(True)

    @contextlib.contextmanager
    def parameters_in_sync(self):
        """Every parameter all-gathered and the hooks off inside (validation, saving)."""
        was_on = self.hooks_on
        if was_on:
            self._hooks(False, param_sync=True)
        try:
            yield
        finally:
            if was_on:
                self._hooks(True)

    def close(self) -> None:
        """Leave the model with all parameters gathered (callers export it after training)."""
        if self.hooks_on:
            self._hooks(False, param_sync=True)
