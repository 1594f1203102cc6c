"""Build dots models under several layouts in one torchrun launch and compare what each rank
holds with `megatron_dots.plan.static_memory` (torchrun worker).

For each case (a JSON list in --cases): initialise Megatron-Core's parallel state, build the
rank's model chunks, wrap them in DDP and build Megatron-Core's optimizer as our trainer does,
run one optimizer step on zero gradients (so Adam's moments exist), then measure: the
chunks' parameter names and shapes, parameter bytes, every DDP buffer's gradient and parameter
storage and bucket boundaries, and the optimizer's fp32 main weights and Adam moments. Every
rank writes `{case name: {"problems": [...], "measured": ..., "predicted": ...}}` to
`--out/rank{R}.json`; a problem is any difference from the plan.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_dots  # noqa: E402,F401  (compat patches first)
from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallelConfig  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.config import DotsConfig  # noqa: E402
from megatron_dots.model import build_dots_model_chunks  # noqa: E402
from megatron_dots.plan.layout import Layout  # noqa: E402
from megatron_dots.plan.static_memory import (  # noqa: E402
    rank_grad_buffers, rank_parameters, rank_static_memory)
from megatron_dots.training import wrap_with_ddp  # noqa: E402
from worker_common import run_and_exit  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_config(name: str) -> DotsConfig:
    """dots-tiny, or dots-mini's structure (MHA, 1 dense layer, 2 shared experts, top-6)
    shrunk to CPU size, with a vocabulary that Megatron pads differently under TP 1 and 2."""
    if name == "tiny":
        return DotsConfig.preset("dots-tiny")
    return DotsConfig.preset("dots-mini", num_layers=8, hidden_size=128, num_attention_heads=4,
                             num_query_groups=4, kv_channels=32, ffn_hidden_size=256,
                             num_moe_experts=8, moe_ffn_hidden_size=64, vocab_size=1100,
                             max_position_embeddings=256)


def case_layout(case: dict, world: int) -> Layout:
    dp = world // (case["tp"] * case["pp"])
    return Layout(gpus=world, tp=case["tp"], pp=case["pp"], vpp=case.get("vpp", 1),
                  ep=case["ep"], micro_batch_size=1, global_batch_size=dp * case["pp"],
                  seq_length=32, precision=case["precision"],
                  distributed_optimizer=case["distributed_optimizer"])


def build(cfg: DotsConfig, layout: Layout, case: dict):
    """The rank's DDP-wrapped chunks and Megatron-Core Adam, as training/loop.py builds them."""
    vpp = layout.vpp if layout.vpp > 1 else None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=layout.ep)
    model_parallel_cuda_manual_seed(123)
    dtype = DTYPES[layout.precision]
    bf16 = layout.precision == "bf16"
    tc = cfg.to_transformer_config(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=layout.ep,
        sequence_parallel=layout.sp, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
        batch_p2p_comm=False)
    chunks = build_dots_model_chunks(cfg, tc, backend=case["backend"])
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=case["overlap_grad_reduce"],
        use_distributed_optimizer=layout.distributed_optimizer,
        bucket_size=case.get("bucket_size"))
    chunks = wrap_with_ddp(chunks, tc, ddp)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16, params_dtype=dtype,
                        use_distributed_optimizer=layout.distributed_optimizer), chunks)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    return chunks, optimizer


def unwrapped(chunk):
    """The GPTModel inside DDP (and Float16Module)."""
    module = chunk.module
    while not hasattr(module, "decoder"):
        module = module.module
    return module


def measure(chunks, optimizer) -> dict:
    params = [p for chunk in chunks for p in chunk.parameters()]
    buffers = []
    for c, chunk in enumerate(chunks):
        for expert_parallel, group in ((False, chunk.buffers),
                                       (True, chunk.expert_parallel_buffers)):
            for buf in group:
                buffers.append({
                    "chunk": c, "expert_parallel": expert_parallel,
                    "data_parallel_size": buf.data_parallel_world_size,
                    "grad_numel": buf.grad_data.numel(),
                    "grad_bytes": buf.grad_data.numel() * buf.grad_data.element_size(),
                    "param_buffer_bytes": (0 if buf.param_data is None else
                                           buf.param_data.numel() * buf.param_data.element_size()),
                    "buckets": [list(b) for b in buf.bucket_indices],
                })
    model_storage = {p.untyped_storage().data_ptr() for p in params}
    masters = moments = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p, {})
                moments += sum(state[k].numel() * state[k].element_size()
                               for k in ("exp_avg", "exp_avg_sq") if k in state)
                if p.untyped_storage().data_ptr() not in model_storage:
                    masters += p.numel() * p.element_size()
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    param_buffer_bytes = sum(b["param_buffer_bytes"] for b in buffers)
    return {
        "names": [[[n, list(p.shape)] for n, p in unwrapped(chunk).named_parameters()]
                  for chunk in chunks],
        "parameters": sum(p.numel() for p in params),
        "expert_parameters": sum(p.numel() for chunk in chunks
                                 for n, p in unwrapped(chunk).named_parameters()
                                 if ".mlp.experts." in n),
        "param_bytes": param_bytes,
        "grad_bytes": sum(b["grad_bytes"] for b in buffers),
        # The distributed optimizer moves the parameters into DDP's (padded) buffers.
        "param_padding_bytes": param_buffer_bytes - param_bytes if param_buffer_bytes else 0,
        "optimizer_bytes": masters + moments,
        "master_bytes": masters,
        "buffers": buffers,
    }


def predict(cfg, layout, case) -> dict:
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    options = dict(backend=case["backend"], overlap_grad_reduce=case["overlap_grad_reduce"],
                   bucket_size=case.get("bucket_size"))
    static = rank_static_memory(
        cfg, layout, pp_rank, dp_rank=parallel_state.get_data_parallel_rank(),
        expert_dp_rank=parallel_state.get_expert_data_parallel_rank(), **options)
    buffers = rank_grad_buffers(cfg, layout, pp_rank, **options)
    return {
        "names": [[[p.name, list(p.shape)] for p in chunk]
                  for chunk in rank_parameters(cfg, layout, pp_rank, case["backend"])],
        **static.to_dict(),
        "buffers": [{"chunk": b.chunk, "expert_parallel": b.expert_parallel,
                     "data_parallel_size": b.data_parallel_size, "grad_numel": b.numel,
                     "buckets": [list(x) for x in b.buckets]} for b in buffers],
    }


def compare(measured: dict, predicted: dict) -> list:
    problems = []
    if measured["names"] != predicted["names"]:
        problems.append(f"parameters differ: built {measured['names']} planned "
                        f"{predicted['names']}")
    for key in ("parameters", "expert_parameters", "param_bytes", "grad_bytes",
                "param_padding_bytes", "optimizer_bytes"):
        if measured[key] != predicted[key]:
            problems.append(f"{key}: built {measured[key]} planned {predicted[key]}")
    fields = ("chunk", "expert_parallel", "data_parallel_size", "grad_numel", "buckets")
    built = [{k: b[k] for k in fields} for b in measured["buffers"]]
    if built != predicted["buffers"]:
        problems.append(f"DDP buffers: built {built} planned {predicted['buffers']}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", required=True, help="JSON list of cases")
    parser.add_argument("--out", required=True, help="directory for rank{R}.json")
    args = parser.parse_args()
    init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    results = {}
    for case in json.loads(args.cases):
        cfg = model_config(case["model"])
        layout = case_layout(case, world)
        chunks, optimizer = build(cfg, layout, case)
        measured, predicted = measure(chunks, optimizer), predict(cfg, layout, case)
        results[case["name"]] = {"problems": compare(measured, predicted),
                                 "measured": {k: v for k, v in measured.items() if k != "names"},
                                 "predicted": {k: v for k, v in predicted.items()
                                               if k != "names"}}
        del chunks, optimizer
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    return 0


if __name__ == "__main__":
    run_and_exit(main)
