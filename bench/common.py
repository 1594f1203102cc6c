"""Helpers shared by the GPU benchmarks: one-device model + DDP + optimizer, device sync and
memory reset, and JSON-safe values."""

import gc
import json
import os
import platform
import time
import types

import torch


def build(args, dots_overrides=None, configure=None):
    """(DotsConfig, TransformerConfig, DDP chunks, optimizer, device, dtype name) for
    ``args.model`` (with DotsConfig fields ``dots_overrides``) / ``args.dtype`` /
    ``args.expert_backend`` / ``args.lr`` / ``args.seed`` on this process's default device,
    with world size 1. ``configure(config)`` may change the TransformerConfig before the model
    is built."""
    import megatron_dots  # noqa: F401  (compat patches before Megatron-Core is used)
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_dots.compat.distributed import default_device, init_distributed
    from megatron_dots.config import DotsConfig
    from megatron_dots.model import build_dots_model_chunks
    from megatron_dots.training.optimizer import build_optimizer
    from megatron_dots.training.precision import LOSS_SCALE_DEFAULTS
    from megatron_dots.training.step import wrap_with_ddp

    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)

    device = default_device()
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    bf16 = dtype == "bf16"
    params_dtype = torch.bfloat16 if bf16 else torch.float32
    dc = DotsConfig.preset(args.model, **(dots_overrides or {}))
    cfg = dc.to_transformer_config(bf16=bf16, params_dtype=params_dtype, pipeline_dtype=params_dtype)
    if configure is not None:
        configure(cfg)
    chunks = build_dots_model_chunks(dc, cfg, backend=args.expert_backend)
    for chunk in chunks:
        chunk.to(device)
    chunks = wrap_with_ddp(
        chunks, cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    )
    opt_args = types.SimpleNamespace(
        optimizer="adam", lr=args.lr, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, bf16=bf16, fp16=False, loss_scale=None,
        use_distributed_optimizer=False, overlap_param_gather=False, **LOSS_SCALE_DEFAULTS,
    )
    optimizer = build_optimizer(opt_args, chunks)
    return dc, cfg, chunks, optimizer, device, dtype


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def mcore_version():
    try:
        from megatron.core.package_info import __version__

        return __version__
    except Exception:  # pragma: no cover
        return None


def finite(value):
    """NaN / infinity (e.g. a calibration step's predicted peak) as null: strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def markdown_table(headers, rows) -> str:
    """A markdown table of `headers` and `rows` (lists of already formatted cells)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def host_info(device) -> dict:
    """Where and with what a report was measured."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "megatron_core": mcore_version(),
    }


def write_report(report: dict, path: str) -> None:
    """`report` as strict JSON (NaN / infinity as null) at `path`, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(finite(report), f, indent=2, default=json_default)
