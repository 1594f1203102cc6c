"""A DDP-wrapped dots-tiny (sequential experts) and a Megatron-Core optimizer over it, in the
calling process's single-process world: what the optimizer patch tests build on."""

import torch


def tiny_chunks_and_optimizer(bf16=False, distributed=False, bucket_size=None):
    """(chunks, optimizer, optimizer config); `bucket_size` (elements) with overlapped gradient
    reduction gives several buckets."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_dots.model import build_dots_model_chunks
    from megatron_dots.training import wrap_with_ddp
    from reference import tiny_config

    dtype = torch.bfloat16 if bf16 else torch.float32
    tc = tiny_config().to_transformer_config(bf16=bf16, params_dtype=dtype)
    chunks = build_dots_model_chunks(tiny_config(), tc, backend="sequential")
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed,
        overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size)
    chunks = wrap_with_ddp(chunks, tc, ddp)
    config = OptimizerConfig(lr=1e-3, bf16=bf16, params_dtype=dtype,
                             use_distributed_optimizer=distributed)
    return chunks, get_megatron_optimizer(config, chunks), config


def one_step(chunks, optimizer, seed=0):
    """One training step on random tokens (Adam state exists afterwards)."""
    from megatron_dots.training import train_step
    from reference import tiny_config

    gen = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, tiny_config().vocab_size, (2, 2, 17), generator=gen)
    return train_step(chunks, optimizer, list(batch), 16, 2)
