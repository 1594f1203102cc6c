"""Megatron-Core optimizer and learning-rate schedule from the pretrain flags.

The schedule counts samples, as Megatron-LM's does (`OptimizerParamScheduler.step(global
batch)`), so a global batch that grows with `--dots-batch-stages` keeps warmup, the WSD
anneal and the end of the decay at the iterations the flags name.
"""

from .batch_stages import total_samples
from .precision import optimizer_precision


def build_optimizer(args, chunks):
    """Megatron-Core's optimizer (AdamW / SGD, grad clipping; fp32 main parameters for bf16 /
    fp16, loss scaling for fp16; distributed optimizer on request)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        **optimizer_precision(args),
    )
    return get_megatron_optimizer(config, list(chunks))


def samples_after(args, iterations: int) -> int:
    """Samples consumed by the first `iterations` steps."""
    return total_samples(args.batch_stages, args.seq_length, iterations)


def build_scheduler(args, optimizer):
    """OptimizerParamScheduler in samples: warmup, then constant / linear / cosine / WSD decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = samples_after(args, args.lr_decay_iters)
    wsd = None
    if args.lr_decay_style == "WSD":
        wsd = decay - samples_after(args, args.lr_decay_iters - args.lr_wsd_decay_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=samples_after(args, args.lr_warmup_iters), lr_decay_steps=decay,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        wsd_decay_steps=wsd, lr_wsd_decay_style=args.lr_wsd_decay_style,
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
