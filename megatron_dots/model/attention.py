"""`SDPACoreAttention`: core attention of the TE-free path via torch's scaled_dot_product_attention.

Replaces Megatron-Core's local `DotProductAttention` (which materialises the b x heads x s x s
scores, keeps them for backward and runs an unfused softmax) with
``torch.nn.functional.scaled_dot_product_attention``: on a GPU the flash / memory-efficient
kernels (no s^2 tensor kept), on CPU torch's fused math. Same constructor and forward signature
as `DotProductAttention` (query/key/value ``[s, b, heads, head_dim]`` -> ``[s, b, heads x
head_dim]``), causal when no mask is given, the given boolean mask (True = masked, Megatron's
convention) otherwise; grouped-query attention without copying keys and values.

Not supported (clear errors): context parallelism, packed sequences (THD), attention bias,
sliding windows, softmax variants other than ``vanilla``. Use the ``te`` backend for those.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Core attention (softmax(QK^T / sqrt(d)) V) through `F.scaled_dot_product_attention`."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use the "
                             "'te' backend (TEDotProductAttention)")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPACoreAttention has no sliding-window attention (window_size)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPACoreAttention supports softmax_type 'vanilla' only, got "
                             f"{config.softmax_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = max(1, config.num_query_groups // tp)
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides and re-multiplies inside the fused softmax: the
        # mathematical scale stays 1/sqrt(d) (or the configured one).
        self.softmax_scale = (1.0 / math.sqrt(self.head_dim) if softmax_scale is None
                              else softmax_scale)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)
        self.current_max_attn_logits = None  # megatron-core 0.19 reads this attribute

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None,
                **extra):
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention does not take packed sequences (THD); "
                                      "use the 'te' backend")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not take an attention bias")
        unexpected = sorted(k for k, v in extra.items() if v is not None)
        if unexpected:
            raise NotImplementedError(f"SDPACoreAttention got unsupported arguments {unexpected}")
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d] (views; the kernels take strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        kwargs = {"scale": self.softmax_scale}
        if self.groups_per_partition != self.heads_per_partition:
            kwargs["enable_gqa"] = True
        if attention_mask is not None:
            kwargs["attn_mask"] = ~attention_mask.bool()
        else:
            kwargs["is_causal"] = mask_type == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_partition * self.head_dim)
