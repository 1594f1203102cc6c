"""Worker: train a tiny Megatron-Core GPT MoE model on CPU (gloo) for a few iterations.

Run as ``python -m torch.distributed.run --nproc-per-node N mcore_cpu_worker.py --layout L``.

Layouts (``LAYOUTS``): ``ref`` (1 process, TP=PP=EP=1; initialises the weights with a fixed
seed and saves the full state dict), ``tp2sp``, ``ep2``, ``pp2``, ``pp2vpp2``, and
``pp2vpp2_batchp2p`` (must fail: batch_p2p_comm=True is refused on the CPU backend; with
``--no-batch-p2p-guard`` it runs and gives wrong losses). Non-ref layouts load their shards of
the reference state dict, so losses must match the reference.

Every iteration: ``get_forward_backward_func()`` (Megatron DDP model chunks,
``finalize_model_grads`` incl. router expert-bias update) then Megatron optimizer step.
Each rank writes ``<out>/rank<r>.json``: per-microbatch losses keyed by global sample index,
grad norms, router expert biases after each iteration keyed ``"<iteration>:<global layer>"``.
"""

import argparse
import json
import os
import re
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_dots.compat.cpu_backend import cpu_backend_active, enable_cpu_backend  # noqa: E402
from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.compat.runtime_patches import apply_runtime_patches  # noqa: E402

LAYOUTS = {
    # name: (tp, pp, ep, vpp, sequence_parallel, batch_p2p_comm)
    "ref": (1, 1, 1, None, False, False),
    "tp2sp": (2, 1, 1, None, True, False),
    "ep2": (1, 1, 2, None, False, False),
    "pp2": (1, 2, 1, None, False, False),
    "pp2vpp2": (1, 2, 1, 2, False, False),
    "pp2vpp2_batchp2p": (1, 2, 1, 2, False, True),
}

NUM_LAYERS = 4
HIDDEN = 64
HEADS = 4
QUERY_GROUPS = 2
EXPERTS = 4
TOPK = 2
SEQ = 16
VOCAB = 128
GLOBAL_BATCH = 4  # samples per iteration, micro-batch size 1
SEED = 1234


def make_config(tp, pp, ep, vpp, sp, batch_p2p):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=QUERY_GROUPS,
        ffn_hidden_size=128,
        kv_channels=HIDDEN // HEADS,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        sequence_parallel=sp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        batch_p2p_comm=batch_p2p,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=0.02,
        # MoE (dots.llm1-like: sigmoid router, expert bias, shared expert)
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-2,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
    )


class SPRMSNorm(torch.nn.Module):
    """RMSNorm usable with sequence parallelism.

    The local spec's torch norm (``megatron/core/transformer/torch_norm.py:WrappedTorchNorm``)
    asserts ``not config.sequence_parallel`` (it does not tag its weight ``sequence_parallel``,
    so ``finalize_model_grads`` would not sum its TP-partial grads). This one tags it.
    """

    def __init__(self, config, hidden_size, eps=1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _replace_norms(obj, seen=None):
    """Swap WrappedTorchNorm for SPRMSNorm in a (copied) ModuleSpec tree."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if isinstance(obj, ModuleSpec):
        if obj.module is WrappedTorchNorm:
            obj.module = SPRMSNorm
        _replace_norms(obj.submodules)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is WrappedTorchNorm:
                setattr(obj, f.name, SPRMSNorm)
            else:
                _replace_norms(value)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _replace_norms(item)


def build_model(config, vpp):
    import copy

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer_spec = copy.deepcopy(
        get_gpt_layer_local_spec(
            num_experts=EXPERTS, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
        )
    )
    _replace_norms(layer_spec)
    chunks = []
    for vp_stage in range(vpp or 1):
        vp = vp_stage if vpp else None
        spec = TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage=vp),
            layer_norm=SPRMSNorm,
        )
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=VOCAB,
                max_sequence_length=SEQ,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_base=10000,
                vp_stage=vp,
            )
        )
    return chunks


# --------------------------------------------------------------------------------------------
# test-local sharding of a full (TP=PP=EP=1) state dict for the local GPT MoE spec
# --------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def shard_state_dict(chunk, full_sd, config):
    """Local state dict for ``chunk`` cut out of the full reference state dict."""
    from megatron.core import parallel_state as ps

    layer_ids = [layer.layer_number - 1 for layer in chunk.decoder.layers]
    params = dict(chunk.named_parameters())
    ep_rank = ps.get_expert_model_parallel_rank()
    num_local_experts = EXPERTS // ps.get_expert_model_parallel_world_size()
    out = {}
    for key, local in chunk.state_dict().items():
        if key.endswith("_extra_state"):
            out[key] = local  # None for local (non-TE) layers
            continue
        gkey = key
        m = _LAYER_RE.match(key)
        if m:
            gkey = f"decoder.layers.{layer_ids[int(m.group(1))]}." + key[m.end():]
        is_expert = False
        m = _EXPERT_RE.search(gkey)
        if m:
            is_expert = True
            g = ep_rank * num_local_experts + int(m.group(1))
            gkey = gkey[: m.start()] + f".mlp.experts.local_experts.{g}." + gkey[m.end():]
        full = full_sd[gkey]
        p = params.get(key)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            if is_expert:
                rank = ps.get_expert_tensor_parallel_rank()
                size = ps.get_expert_tensor_parallel_world_size()
            else:
                rank = ps.get_tensor_model_parallel_rank()
                size = ps.get_tensor_model_parallel_world_size()
            dim = p.partition_dim
            if "linear_fc1" in key and config.gated_linear_unit:
                gate, up = full.chunk(2, dim=0)
                full = torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim)
            else:
                full = full.chunk(size, dim)[rank]
        assert full.shape == local.shape, (key, gkey, full.shape, local.shape)
        out[key] = full.clone()
    return out


# --------------------------------------------------------------------------------------------


def batches(iteration):
    g = torch.Generator().manual_seed(100 + iteration)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def forward_step(data_iterator, model):
    from megatron.core.tensor_parallel import broadcast_data

    idx, tokens, labels = next(data_iterator)
    # exercise tensor_parallel.data.broadcast_data (upstream calls .cuda() on the inputs)
    data = broadcast_data(["tokens", "labels"], {"tokens": tokens, "labels": labels}, torch.int64)
    assert torch.equal(data["tokens"], tokens) and data["tokens"].device.type == "cpu"
    tokens, labels = data["tokens"], data["labels"]
    position_ids = torch.arange(SEQ).unsqueeze(0)
    output = model(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone(), "sample": torch.tensor(idx)}

    return output, loss_func


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    parser.add_argument("--ref-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument(
        "--no-batch-p2p-guard",
        action="store_true",
        help="remove the CPU backend's batch_p2p_comm refusal (to show the corruption)",
    )
    args = parser.parse_args()

    t0 = time.time()
    apply_runtime_patches()
    assert enable_cpu_backend() and cpu_backend_active()
    init_distributed()
    if args.no_batch_p2p_guard:
        from megatron.core.pipeline_parallel import p2p_communication

        cls = p2p_communication.P2PCommunicator
        cls.__init__ = getattr(cls.__init__, "__wrapped_original__", cls.__init__)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    tp, pp, ep, vpp, sp, batch_p2p = LAYOUTS[args.layout]
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
    )
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)

    config = make_config(tp, pp, ep, vpp, sp, batch_p2p)
    chunks = build_model(config, vpp)

    ref_state = os.path.join(args.ref_dir, "state.pt")
    if args.layout == "ref":
        assert world == 1
        os.makedirs(args.ref_dir, exist_ok=True)
        torch.save(chunks[0].state_dict(), ref_state)
    else:
        full_sd = torch.load(ref_state, weights_only=True)
        for chunk in chunks:
            chunk.load_state_dict(shard_state_dict(chunk, full_sd, config), strict=True)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
    )
    model = [
        DDP(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=1.0,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        use_distributed_optimizer=False,
    )
    optimizer = get_megatron_optimizer(opt_config, model)

    dp_rank = ps.get_data_parallel_rank()
    dp_size = ps.get_data_parallel_world_size()
    num_mb = GLOBAL_BATCH // dp_size
    fb = get_forward_backward_func()

    record = {
        "layout": args.layout, "rank": rank, "losses": {}, "grad_norms": [], "expert_bias": {}
    }
    for it in range(args.iters):
        tokens, labels = batches(it)
        samples = [dp_rank * num_mb + m for m in range(num_mb)]

        def make_iter():
            return iter([(i, tokens[i : i + 1], labels[i : i + 1]) for i in samples])

        data_iter = [make_iter() for _ in model] if len(model) > 1 else make_iter()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        losses = fb(
            forward_step_func=forward_step,
            data_iterator=data_iter,
            model=model if len(model) > 1 else model[0],
            num_microbatches=num_mb,
            seq_length=SEQ,
            micro_batch_size=1,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step failed"
        record["grad_norms"].append(float(grad_norm))
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                bias = layer.mlp.router.expert_bias.tolist()
                record["expert_bias"][f"{it}:{layer.layer_number - 1}"] = bias
        for d in losses or []:
            record["losses"][f"{it}:{int(d['sample'])}"] = float(d["lm loss"])

    record["seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f, indent=1)
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
