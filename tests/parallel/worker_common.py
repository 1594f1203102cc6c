"""What the torchrun training workers share: a DDP-wrapped dots model loaded with given full
weights plus Megatron-Core's SGD, and one training iteration's record (global loss, this rank's
gradient shards under full-model keys, router biases)."""

import sys

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_dots.convert.sharding import load_full_state_dict, local_grads, local_tensors
from megatron_dots.model import build_dots_model_chunks
from megatron_dots.training import forward_backward, wrap_with_ddp


def ddp_model_and_sgd(cfg, config, full, backend):
    """This rank's chunks of `cfg` (TransformerConfig `config`) with the weights `full`,
    DDP-wrapped, and an SGD optimizer (lr 0.5, no momentum / decay / clipping)."""
    chunks = build_dots_model_chunks(cfg, config, backend=backend)
    for chunk in chunks:
        load_full_state_dict(chunk, full)
    chunks = wrap_with_ddp(chunks, config)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=0.5, sgd_momentum=0.0, weight_decay=0.0,
                        clip_grad=0.0, params_dtype=torch.float32),
        chunks,
    )
    return chunks, optimizer


def train_iteration(chunks, optimizer, micro_batches, seq_length, micro_batch_size,
                    recompute=None) -> dict:
    """forward_backward over `micro_batches` (with a recompute controller, if given), record,
    optimizer step."""
    optimizer.zero_grad()
    loss = forward_backward(chunks, micro_batches, seq_length, micro_batch_size,
                            recompute=recompute)
    grads, biases = {}, {}
    for chunk in chunks:
        grads.update(local_grads(chunk))
        biases.update({key: t.detach().clone() for _, key, t in local_tensors(chunk)
                       if key.endswith("router.expert_bias")})
    optimizer.step()
    return {"loss": loss, "grads": grads, "bias": biases}


def run_and_exit(main) -> None:
    """Run `main()` and exit with its code after an orderly process-group shutdown."""
    code = main()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(code)
