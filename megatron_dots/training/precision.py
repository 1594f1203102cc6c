"""Mixed precision, the distributed optimizer and overlapped data-parallel communication:
their flags (Megatron-LM's names), their checks, and the Megatron-Core configs they make.

What every real dots run uses is `--bf16 --use-distributed-optimizer --overlap-grad-reduce
--overlap-param-gather`: bf16 parameters inside Megatron-Core's `Float16Module`, fp32 main
parameters and Adam state sharded over the data-parallel ranks, gradients reduce-scattered in
fp32 buckets while the backward still runs, and the updated bf16 parameters all-gathered
bucket by bucket in the next forward. `--fp16` adds dynamic loss scaling (`--loss-scale` fixes
the scale). The same code runs on the CPU backend (gloo), see `compat/cpu_backend.py`.
"""

import argparse
from typing import Dict, Optional

import torch

# Megatron-LM's defaults for dynamic loss scaling (megatron/training/arguments.py).
LOSS_SCALE_DEFAULTS = {"initial_loss_scale": 2.0 ** 32, "min_loss_scale": 1.0,
                       "loss_scale_window": 1000.0, "hysteresis": 2}


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixed precision and distributed optimizer")
    group.add_argument("--bf16", action="store_true",
                       help="bf16 parameters and activations with fp32 main parameters in the "
                       "optimizer (Megatron-Core Float16Module + mixed-precision optimizer)")
    group.add_argument("--fp16", action="store_true",
                       help="fp16 parameters and activations with fp32 main parameters and "
                       "dynamic loss scaling (steps whose gradients overflow are skipped)")
    group.add_argument("--loss-scale", type=float, default=None,
                       help="with --fp16: a fixed loss scale instead of dynamic scaling")
    group.add_argument("--initial-loss-scale", type=float, default=None,
                       help="with --fp16: initial dynamic loss scale (default 2^32)")
    group.add_argument("--min-loss-scale", type=float, default=None,
                       help="with --fp16: lower bound of the dynamic loss scale (default 1)")
    group.add_argument("--loss-scale-window", type=float, default=None,
                       help="with --fp16: overflow-free steps before the scale doubles "
                       "(default 1000)")
    group.add_argument("--hysteresis", type=int, default=None,
                       help="with --fp16: overflows tolerated before the scale halves "
                       "(default 2)")
    group.add_argument("--use-distributed-optimizer", action="store_true",
                       help="shard fp32 main parameters and optimizer state over the "
                       "data-parallel ranks (gradients are reduce-scattered, parameters "
                       "all-gathered)")
    group.add_argument("--overlap-grad-reduce", action="store_true",
                       help="reduce (or reduce-scatter) each gradient bucket as soon as the "
                       "backward has produced it, overlapping the rest of the backward")
    group.add_argument("--overlap-param-gather", action="store_true",
                       help="with --use-distributed-optimizer and --overlap-grad-reduce: "
                       "all-gather the updated parameters bucket by bucket during the next "
                       "forward instead of right after the optimizer step")
    group.add_argument("--ddp-bucket-size", type=int, default=None, metavar="ELEMENTS",
                       help="with --overlap-grad-reduce: gradient bucket size in elements "
                       "(default: Megatron-Core's, max(40M, 1M x data-parallel size))")


def check_precision_args(args, error) -> None:
    """Reject what Megatron-Core cannot honour; fill loss-scale defaults. `error` is the
    exception class to raise (the caller's ArgumentError)."""
    if args.bf16 and args.fp16:
        raise error("give --bf16 or --fp16, not both")
    given = [name for name in ("loss_scale", *LOSS_SCALE_DEFAULTS)
             if getattr(args, name) is not None]
    if given and not args.fp16:
        raise error(f"{', '.join('--' + n.replace('_', '-') for n in given)} need --fp16 "
                    "(bf16 and fp32 training do not scale the loss)")
    for name, default in LOSS_SCALE_DEFAULTS.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, default)
        elif not value > 0:
            raise error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.loss_scale is not None and not args.loss_scale > 0:
        raise error(f"--loss-scale must be positive, got {args.loss_scale}")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise error("--overlap-param-gather needs --use-distributed-optimizer (only the "
                    "distributed optimizer all-gathers parameters)")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise error("--overlap-param-gather needs --overlap-grad-reduce (Megatron-Core "
                    "overlaps the parameter all-gather only together with the gradient "
                    "reduce-scatter)")
    if args.ddp_bucket_size is not None:
        if args.ddp_bucket_size <= 0:
            raise error(f"--ddp-bucket-size must be positive, got {args.ddp_bucket_size}")
        if not args.overlap_grad_reduce:
            raise error("--ddp-bucket-size needs --overlap-grad-reduce (without the overlap "
                        "Megatron-Core reduces all gradients as one bucket)")


def params_dtype(args) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def precision_name(args) -> str:
    """"bf16", "fp16" or "fp32": what a checkpoint records and a resume must match."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def resume_precision_problem(args, saved: Optional[str]) -> Optional[str]:
    """Why this run cannot take the optimizer state of a checkpoint trained in `saved`
    precision (None: it can; older checkpoints do not record it)."""
    ours = precision_name(args)
    if saved is None or saved == ours:
        return None
    return (f"the checkpoint was trained in {saved} and this run is {ours}; its optimizer "
            f"state (fp32 main weights, loss scale) belongs to {saved} training: resume with "
            "the same precision flag, or load only the weights with --no-load-optim or "
            "--finetune")


def logged_loss_scale(args, optimizer) -> Optional[float]:
    """The current fp16 loss scale (logged as Megatron-LM does), None otherwise."""
    return optimizer.get_loss_scale().item() if args.fp16 else None


def transformer_precision(args) -> Dict:
    """TransformerConfig fields of the precision flags."""
    dtype = params_dtype(args)
    return {"bf16": args.bf16, "fp16": args.fp16, "params_dtype": dtype, "pipeline_dtype": dtype}


def optimizer_precision(args) -> Dict:
    """OptimizerConfig fields of the precision, distributed-optimizer and loss-scale flags."""
    return {"bf16": args.bf16, "fp16": args.fp16, "params_dtype": params_dtype(args),
            "loss_scale": args.loss_scale,
            **{name: getattr(args, name) for name in LOSS_SCALE_DEFAULTS},
            "use_distributed_optimizer": args.use_distributed_optimizer,
            "overlap_param_gather": args.overlap_param_gather}


def ddp_config(args):
    """Megatron-Core's DistributedDataParallelConfig of the flags. Gradients are accumulated
    and reduced in fp32 (Megatron-LM's --accumulate-allreduce-grads-in-fp32), as dots.llm1's
    bf16 training needs: a bf16 reduce-scatter over hundreds of ranks loses the small
    gradients."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=args.ddp_bucket_size,
        # With virtual pipeline stages the schedule starts each chunk's gather (Megatron-LM's
        # default --align-param-gather); otherwise the forward pre-hooks do.
        align_param_gather=bool(args.overlap_param_gather
                                and args.virtual_pipeline_model_parallel_size),
    )
