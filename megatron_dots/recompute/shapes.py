"""Micro-batch shapes as the recompute planner sees them, and their shape buckets.

A shape is what activation memory depends on: micro-batch size, sequence length, and for THD
packing (several documents in one row, `cu_seqlens`) the document lengths. Plans are cached per
*bucket*: the sequence length rounded up to a multiple of `granularity` tokens, so nearby
lengths share a plan and the plan holds for every length in the bucket (the bucket's upper
edge is what gets predicted).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class MicroBatchShape:
    """micro_batch_size x seq_length tokens; `segments` are the packed document lengths of a
    THD micro-batch (None: one document per row)."""

    micro_batch_size: int
    seq_length: int
    segments: Optional[Tuple[int, ...]] = None

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_length

    def attention_score_elements(self, attention: str) -> int:
        """Entries of the attention score matrices per head, which unfused attention keeps for
        backward: b x s^2 (the local core attention masks a packed row as one sequence, so
        packing does not shrink it). Flash / SDPA kernels keep none."""
        if attention == "unfused":
            return self.micro_batch_size * self.seq_length**2
        if attention == "flash":
            return 0
        raise ValueError(f"unknown attention kind {attention!r}; expected 'unfused' or 'flash'")


def bucket(shape: MicroBatchShape, granularity: int) -> MicroBatchShape:
    """The shape bucket: sequence length rounded up to a multiple of `granularity` (packed
    segments are dropped: the bucket's prediction covers any packing of its tokens)."""
    if granularity < 1:
        raise ValueError(f"bucket granularity must be >= 1 token, got {granularity}")
    seq = -(-shape.seq_length // granularity) * granularity
    return MicroBatchShape(shape.micro_batch_size, seq)


def shape_of(batch) -> MicroBatchShape:
    """Shape of a micro-batch as `training.step.gpt_forward_step` takes it: a token tensor
    `[b, s + 1]` or a GPT dataset dict (`tokens` `[b, s]`, optional `cu_seqlens`)."""
    if isinstance(batch, dict):
        tokens = batch["tokens"]
        b, s = tokens.shape
        cu = batch.get("cu_seqlens")
        if cu is not None:
            lengths = torch.diff(torch.as_tensor(cu).flatten()).tolist()
            return MicroBatchShape(b, s, tuple(int(x) for x in lengths if x > 0))
        return MicroBatchShape(b, s)
    b, s1 = batch.shape
    return MicroBatchShape(b, s1 - 1)

