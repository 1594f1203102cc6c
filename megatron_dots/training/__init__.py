"""Training pieces built on Megatron-Core: forward step, loss, DDP wrapping, one train step."""

from .step import forward_backward, gpt_forward_step, lm_loss_func, train_step, wrap_with_ddp

__all__ = ["forward_backward", "gpt_forward_step", "lm_loss_func", "train_step", "wrap_with_ddp"]
