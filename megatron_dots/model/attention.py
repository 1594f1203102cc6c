"""`SDPACoreAttention`: core attention of the TE-free path via torch's scaled_dot_product_attention.

Replaces Megatron-Core's local `DotProductAttention` (which materialises the b x heads x s x s
scores, keeps them for backward and runs an unfused softmax) with
``torch.nn.functional.scaled_dot_product_attention``: on a GPU the flash / memory-efficient
kernels (no s^2 tensor kept), on CPU torch's fused math. Same constructor and forward signature
as `DotProductAttention` (query/key/value ``[s, b, heads, head_dim]`` -> ``[s, b, heads x
head_dim]``), causal when no mask is given, the given boolean mask (True = masked, Megatron's
convention) otherwise; grouped-query attention without copying keys and values.

No s x s tensor on the default paths: Megatron-Core passes ``attention_mask=None`` in our
training (``create_attention_mask=False``), and SDPA then runs causal without a mask tensor
(flash / memory-efficient on a GPU, the flash kernel on CPU), keeping O(s) bytes per head for
backward. Megatron-LM's ``pretrain_gpt.py`` by default builds the plain causal mask in its
dataloader (``[b, 1, s, s]`` bool; ``--no-create-attention-mask-in-dataloader`` turns that
off): handed to SDPA, an explicit mask rules out the flash kernel, SDPA turns the bool mask
into an s x s float bias in every layer and keeps it for backward (at 32K: 2 GiB per layer in
bf16, 4 in fp32). `CausalMaskCheck` recognises that mask (once per mask tensor, shared by the layers) and
runs it as ``is_causal`` instead: the same attention, without the s x s bias. Any other mask
(padding, documents) is applied as given.

Not supported (clear errors): context parallelism, packed sequences (THD), attention bias,
sliding windows, softmax variants other than ``vanilla``. Use the ``te`` backend for those.
"""

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


# Rows of the mask compared at once (`is_plain_causal_mask`): at most this many elements.
_CHECK_BLOCK_ELEMENTS = 1 << 24


def is_plain_causal_mask(mask: torch.Tensor) -> bool:
    """Whether `mask` (Megatron's convention: True = masked, ``[..., s, s]``) masks exactly the
    future keys of every query, in every leading (batch / head) entry. Compared in blocks of
    rows, so the check never builds a second s x s tensor."""
    if mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    s = mask.shape[-1]
    keys = torch.arange(s, device=mask.device)
    rows_per_block = max(1, _CHECK_BLOCK_ELEMENTS // max(1, s))
    differs = torch.zeros((), dtype=torch.bool, device=mask.device)
    for start in range(0, s, rows_per_block):
        queries = torch.arange(start, min(s, start + rows_per_block), device=mask.device)
        future = keys[None, :] > queries[:, None]
        differs |= (mask[..., start:start + len(queries), :] != future).any()
    return not bool(differs)  # one device sync per check


class CausalMaskCheck:
    """`is_plain_causal_mask` of the last mask seen, remembered while that tensor lives: every
    layer of a micro-batch gets the same mask, so the check runs once per micro-batch. A tensor
    viewing the same memory (same address, shape and strides, e.g. the detached copy an
    activation checkpoint hands on) while the checked one is alive, and not modified in place
    since (the version counter views share), reuses the answer."""

    def __init__(self):
        self._checked = None  # weak reference to the tensor last checked
        self._key = None
        self._answer = False

    @staticmethod
    def _key_of(mask: torch.Tensor):
        return (mask.device, mask.data_ptr(), tuple(mask.shape), mask.stride(), mask._version)

    def __call__(self, mask: torch.Tensor) -> bool:
        if mask.is_inference():  # no version counter to tell in-place changes: check each time
            return is_plain_causal_mask(mask)
        checked = self._checked() if self._checked is not None else None
        key = self._key_of(mask)
        if checked is not None and key == self._key:
            return self._answer
        if mask.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # no device sync inside a CUDA graph capture: apply the mask as given
        self._answer = is_plain_causal_mask(mask)
        self._checked, self._key = weakref.ref(mask), key
        return self._answer


_causal_mask_check = CausalMaskCheck()


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
        if attention_mask is None:
            kwargs["is_causal"] = mask_type == AttnMaskType.causal
        elif self._runs_as_causal(attention_mask, q, k):
            kwargs["is_causal"] = True
        else:
            kwargs["attn_mask"] = ~attention_mask.bool()
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_partition * self.head_dim)

    @staticmethod
    def _runs_as_causal(attention_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
        """A given mask that is exactly the causal mask of these queries and keys (module
        docstring): SDPA's ``is_causal`` gives the same attention without an s x s bias."""
        if q.shape[-2] != k.shape[-2] or attention_mask.shape[-1] != k.shape[-2]:
            return False
        return _causal_mask_check(attention_mask)

