"""`TorchGroupedExperts`: a rank's routed experts as two grouped GEMMs (no Transformer Engine).

Drop-in for Megatron-Core's `SequentialMLP` / `TEGroupedMLP` inside an `MoELayer`: it takes the
dispatcher's expert-sorted tokens, ``tokens_per_expert`` and ``permuted_probs`` and returns
``(output, None)``. The local experts' weights are two stacked parameters in `torch.nn.Linear`
layout, so ``weight1[e]`` / ``weight2[e]`` are exactly `SequentialMLP`'s
``local_experts[e].linear_fc1.weight`` / ``linear_fc2.weight`` (gated fc1 = ``[gate_r; up_r]``
of this expert-TP rank):

* ``weight1`` [E_local, (2 x) ffn / ETP, hidden], ``weight2`` [E_local, hidden, ffn / ETP].

Forward and backward are one autograd function over fc1 -> activation x probs -> fc2 (see
`grouped_gemm` for the kernels). It keeps the input, the fc1 output and the probs for backward
and recomputes the elementwise activation there, so the saved bytes are those of two tensors per
token. The backward computes input and probs gradients (dgrad) at once; the weight gradients
(wgrad) too, unless ``config.delay_wgrad_compute`` is set: then they wait until `backward_dw()`
(what Megatron-Core's combined-1F1B schedule calls to fill the all-to-all), which accumulates
them and runs the hooks Megatron-Core's DDP registers through
`register_wgrad_accumulation_and_reduce_hooks`.

Initialisation draws the same numbers as `SequentialMLP` (same init helpers, same order), and
`sharded_state_dict` writes the same distributed-checkpoint tensors and objects, so checkpoints,
the HF converters and tests are interchangeable between the two backends.
"""

from collections import deque
from functools import partial
from typing import Optional

import torch
from torch.nn import Parameter

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from .grouped_gemm import group_offsets, grouped_linear, grouped_weight_grad


def expert_activation(config):
    """`MLP`'s activation for experts: f(x) (or GLU f(gate) x (up + offset), with the optional
    clamp), computed like Megatron-Core's unfused path."""
    act = config.activation_func
    if not config.gated_linear_unit:
        return act
    clamp = getattr(config, "activation_func_clamp_value", None)
    offset = getattr(config, "glu_linear_offset", 0.0)

    def glu(x):
        gate, linear = torch.chunk(x, 2, dim=-1)
        if clamp is not None:
            gate = gate.clamp(min=None, max=clamp)
            linear = linear.clamp(min=-clamp, max=clamp)
        return act(gate) * (linear + offset)

    return glu


def _scaled_activation(activation, h1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """activation(h1) x probs, rounded back to h1's dtype (as `MLP` does with per_token_scale)."""
    return (activation(h1) * probs.unsqueeze(-1)).to(h1.dtype)


class _GroupedExpertMLP(torch.autograd.Function):
    """y = grouped(act(grouped(x, W1)) * p, W2), with split dgrad / wgrad."""

    @staticmethod
    def forward(ctx, x, probs, weight1, weight2, offs, counts, owner):
        h1 = grouped_linear(x, weight1, offs, counts)
        scaled = _scaled_activation(owner.activation, h1, probs)
        y = grouped_linear(scaled, weight2, offs, counts)
        ctx.save_for_backward(x, probs, h1, weight1, weight2, offs)
        ctx.counts, ctx.owner = counts, owner
        return y

    @staticmethod
    def backward(ctx, dy):
        x, probs, h1, weight1, weight2, offs = ctx.saved_tensors
        counts, owner = ctx.counts, ctx.owner
        dy = dy.contiguous()
        d_scaled = grouped_linear(dy, weight2.transpose(1, 2), offs, counts)
        with torch.enable_grad():
            h1_ = h1.detach().requires_grad_(True)
            probs_ = probs.detach().requires_grad_(ctx.needs_input_grad[1])
            scaled = _scaled_activation(owner.activation, h1_, probs_)
        inputs = (h1_, probs_) if ctx.needs_input_grad[1] else (h1_,)
        grads = torch.autograd.grad(scaled, inputs, d_scaled)
        dh1 = grads[0].contiguous()
        dprobs = grads[1] if ctx.needs_input_grad[1] else None
        dx = grouped_linear(dh1, weight1.transpose(1, 2), offs, counts)
        wgrad_inputs = (dh1, x, dy, scaled.detach(), offs, counts)
        if owner.delay_wgrad:
            owner._pending_wgrad.append(wgrad_inputs)
            dw1 = dw2 = None
        else:
            dw1, dw2 = _weight_grads(*wgrad_inputs)
        return dx, dprobs, dw1, dw2, None, None, None


def _weight_grads(dh1, x, dy, scaled, offs, counts):
    return grouped_weight_grad(dh1, x, offs, counts), grouped_weight_grad(dy, scaled, offs, counts)


class TorchGroupedExperts(MegatronModule):
    """Routed experts of one (EP, expert-TP) rank as grouped GEMMs; see the module docstring."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 name: Optional[str] = None):
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("TorchGroupedExperts has no expert biases: set add_bias_linear=False "
                             "(dots experts have none)")
        if getattr(config, "moe_latent_size", None):
            raise ValueError("TorchGroupedExperts has no latent projection (moe_latent_size)")
        if config.fp8 or getattr(config, "fp4", None):
            raise ValueError("TorchGroupedExperts computes in bf16/fp16/fp32; fp8/fp4 need the "
                             "'te' expert backend")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        ffn = config.moe_ffn_hidden_size
        if ffn % tp_size:
            raise ValueError(f"moe_ffn_hidden_size {ffn} is not divisible by the expert "
                             f"tensor-parallel size {tp_size}")
        self.ffn_per_partition = ffn // tp_size
        glu = 2 if config.gated_linear_unit else 1
        hidden = config.hidden_size
        self.activation = expert_activation(config)
        self.delay_wgrad = bool(config.delay_wgrad_compute)
        self._pending_wgrad = deque()
        self._wgrad_hooks = []

        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        shape1 = (num_local_experts, glu * self.ffn_per_partition, hidden)
        shape2 = (num_local_experts, hidden, self.ffn_per_partition)
        self.weight1 = Parameter(torch.empty(shape1, dtype=config.params_dtype, device=device))
        self.weight2 = Parameter(torch.empty(shape2, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            self._initialize(glu, tp_rank, tp_size)
        expert_parallel = config.expert_model_parallel_size > 1
        for param, dim, stride in ((self.weight1, 1, glu), (self.weight2, 2, 1)):
            param.tensor_model_parallel = True
            param.partition_dim = dim
            param.partition_stride = stride
            param.allreduce = not expert_parallel
            if self.delay_wgrad:
                param.skip_backward_post_hook = True
        self.register_load_state_dict_post_hook(_ignore_extra_state)

    def _initialize(self, glu: int, tp_rank: int, tp_size: int) -> None:
        """Per expert, fc1 then fc2, with `SequentialMLP`'s helpers, RNG streams and order."""
        config, hidden, ffn = self.config, self.config.hidden_size, self.config.moe_ffn_hidden_size
        for e in range(self.num_local_experts):
            fc1, fc2 = self.weight1.data[e], self.weight2.data[e]
            if config.use_cpu_initialization:
                _initialize_affine_weight_cpu(
                    fc1, glu * ffn, hidden, glu * self.ffn_per_partition, 0, config.init_method,
                    stride=glu, params_dtype=config.params_dtype, rank=tp_rank,
                    world_size=tp_size, skip_set_tensor_parallel_attributes=True)
                _initialize_affine_weight_cpu(
                    fc2, hidden, ffn, self.ffn_per_partition, 1, config.output_layer_init_method,
                    params_dtype=config.params_dtype, rank=tp_rank, world_size=tp_size,
                    skip_set_tensor_parallel_attributes=True)
            else:
                _initialize_affine_weight_gpu(fc1, config.init_method, 0, stride=glu,
                                              is_expert=True)
                _initialize_affine_weight_gpu(fc2, config.output_layer_init_method, 1,
                                              is_expert=True)

    # ------------------------------------------------------------------ compute
    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if self.config.moe_apply_probs_on_input:
            x = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        if x.dim() != 2:
            x = x.reshape(-1, x.shape[-1])
        counts = None
        if not tokens_per_expert.is_cuda:  # already on the host: no sync needed for the loop
            counts = [int(c) for c in tokens_per_expert.tolist()]
            if sum(counts) != x.shape[0]:
                raise ValueError(f"tokens_per_expert sums to {sum(counts)} but "
                                 f"{x.shape[0]} tokens were dispatched to this rank")
        offs = group_offsets(tokens_per_expert, x.device)
        out = _GroupedExpertMLP.apply(x.contiguous(), permuted_probs, self.weight1, self.weight2,
                                      offs, counts, self)
        return out, None

    # ------------------------------------------------------- delayed weight grads
    def register_wgrad_accumulation_and_reduce_hooks(self, hook) -> None:
        """Megatron-Core DDP (delay_wgrad_compute) registers its grad-ready hooks here."""
        self._wgrad_hooks.append(hook)

    def backward_dw(self) -> None:
        """Compute the weight gradients that backward deferred (oldest first) and hand them
        over: into ``param.grad`` and through the DDP hooks, or straight into ``main_grad``
        when DDP hooked the parameters themselves."""
        while self._pending_wgrad:
            dw1, dw2 = _weight_grads(*self._pending_wgrad.popleft())
            for param, grad in ((self.weight1, dw1), (self.weight2, dw2)):
                if self._wgrad_hooks or not hasattr(param, "main_grad"):
                    param.grad = grad if param.grad is None else param.grad + grad
                else:
                    param.main_grad.add_(grad)
        for hook in self._wgrad_hooks:
            hook()

    # ---------------------------------------------------------------- checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The tensors and objects `SequentialMLP` writes: ``{prefix}experts.linear_fc{1,2}.weight``
        as [E, ...] global tensors (gated fc1 globally [gate; up]) and per-expert ``_extra_state``
        objects."""
        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError(
                "TorchGroupedExperts writes the default (singleton_local_shards=False) layout; "
                "use the 'sequential' expert backend for singleton_local_shards checkpoints")
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        dp_rank = self.dp_group.rank()
        glu = self.config.gated_linear_unit
        axis = len(sharded_offsets)
        out = {}
        for name, fc, gated in (("weight1", "linear_fc1", glu), ("weight2", "linear_fc2", False)):
            build = partial(_build_expert_shards, sharded_offsets=sharded_offsets,
                            ep=(ep_rank, ep_size), tp=(tp_rank, tp_size), gated=gated,
                            tp_axis=axis + (1 if name == "weight1" else 2))
            merge = partial(_merge_expert_shards, gated=gated)
            out[f"{prefix}{name}"] = ShardedTensorFactory(
                f"{prefix}experts.{fc}.weight", getattr(self, name), build, merge,
                (0, 0, dp_rank))
        first = ep_rank * self.num_local_experts
        num_global = ep_size * self.num_local_experts
        for e in range(first, first + self.num_local_experts):
            for fc in ("linear_fc1", "linear_fc2"):
                out[f"{prefix}expert{e}.{fc}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{fc}._extra_state",
                    (*sharded_offsets, (axis, e, num_global)), (0, tp_rank, dp_rank))
        return out


@torch.no_grad()
def _build_expert_shards(key, tensor, replica_id, flattened_range, *, sharded_offsets, ep, tp,
                         gated, tp_axis):
    if flattened_range is not None:
        raise NotImplementedError("TorchGroupedExperts does not write flattened optimizer "
                                  "shards (use distrib_optim_sharding_type fully_reshardable)")
    axis = len(sharded_offsets)
    (ep_rank, ep_size), (tp_rank, tp_size) = ep, tp
    common = dict(replica_id=replica_id, prepend_axis_num=axis)
    if not gated:
        return ShardedTensor.from_rank_offsets(
            key, tensor.contiguous(), *sharded_offsets, (axis, ep_rank, ep_size),
            (tp_axis, tp_rank, tp_size), **common)
    gate, up = torch.chunk(tensor, 2, dim=-2)
    return [
        ShardedTensor.from_rank_offsets(key, half.contiguous(), *sharded_offsets,
                                        (axis, ep_rank, ep_size),
                                        (tp_axis, index, 2 * tp_size), **common)
        for half, index in ((gate, tp_rank), (up, tp_size + tp_rank))
    ]


@torch.no_grad()
def _merge_expert_shards(loaded, *, gated):
    return torch.cat(loaded, dim=-2) if gated else loaded


def _ignore_extra_state(module, incompatible_keys) -> None:
    """The `_extra_state` objects exist for checkpoint compatibility with SequentialMLP only."""
    unexpected = incompatible_keys.unexpected_keys
    for key in [k for k in unexpected if k.endswith("_extra_state")]:
        unexpected.remove(key)
