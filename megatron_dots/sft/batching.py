"""Which conversations each SFT step trains on, and their variable-length micro-batches.

Order (deterministic from `--seed` and the consumed-sample count alone, so a resumed run
continues exactly where it stopped): the conversations kept for training are shuffled once per
epoch (`numpy.random.default_rng([seed, epoch])`); global sample `g` is position `g % n` of epoch
`g // n`'s permutation. A global batch is the next `--global-batch-size` samples; with
`--dots-sft-length-grouped` they are sorted by length (longest first) before being cut into
micro-batches, which changes neither the batch nor its gradient (the loss is the mean over all
of the batch's loss tokens) but makes rows of a micro-batch similar in length. Micro-batch `m` of
data-parallel rank `r` holds slots `(m * dp + r) * mbs ...`, as Megatron-LM's pretraining
sampler.

A micro-batch is padded only to its own longest sample (inputs: a conversation's tokens but the
last), rounded up to `--dots-sft-pad-multiple` and capped at `--seq-length`; padding has loss
mask 0 and `padding_mask` True (the router neither counts nor balances it). Causal attention
keeps real tokens from seeing the padding after them, so no attention mask is needed.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy
import torch


@dataclass(frozen=True)
class SFTBatchConfig:
    micro_batch_size: int
    seq_length: int  # longest input (a conversation of seq_length + 1 tokens trains whole)
    pad_multiple: int
    pad_id: int
    length_grouped: bool = False
    seed: int = 1234


def split_conversations(count: int, weights: Sequence[float], seed: int):
    """(train, valid) conversation indices by `--split` weights (train, valid, test), from one
    seeded permutation; the test share is not used."""
    order = numpy.random.default_rng([seed, 2**31 - 1]).permutation(count)
    weights = list(weights) + [0.0] * (3 - len(weights))
    total = sum(weights)
    n_valid = int(round(count * weights[1] / total)) if total else 0
    n_test = int(round(count * weights[2] / total)) if total else 0
    valid = numpy.sort(order[:n_valid])
    train = numpy.sort(order[n_valid + n_test:])
    return train, valid


class SampleOrder:
    """Global sample index -> conversation index, epoch by epoch (see the module docstring)."""

    def __init__(self, pool: numpy.ndarray, seed: int):
        if len(pool) == 0:
            raise ValueError("no conversations to sample from")
        self.pool = numpy.asarray(pool)
        self.seed = seed
        self._epoch, self._perm = -1, None

    def __call__(self, index: int) -> int:
        epoch, position = divmod(index, len(self.pool))
        if epoch != self._epoch:
            rng = numpy.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, self.pool[rng.permutation(len(self.pool))]
        return int(self._perm[position])

    def span(self, start: int, count: int) -> List[int]:
        return [self(i) for i in range(start, start + count)]


def input_length(length: int, seq_length: int) -> int:
    """Inputs (= labels) a conversation of `length` tokens trains, after truncation."""
    return min(length, seq_length + 1) - 1


def rank_slots(global_batch: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """Positions within the global batch of each of this DP rank's micro-batches."""
    count = global_batch // (micro_batch_size * dp_size)
    return [list(range((m * dp_size + dp_rank) * micro_batch_size,
                       (m * dp_size + dp_rank + 1) * micro_batch_size)) for m in range(count)]


def order_global_batch(conversations: List[int], lengths: numpy.ndarray,
                       length_grouped: bool) -> List[int]:
    if not length_grouped:
        return conversations
    # Stable: equal lengths keep their sampled order, so the grouping is deterministic.
    return sorted(conversations, key=lambda c: -int(lengths[c]))


def make_micro_batch(samples: Sequence, config: SFTBatchConfig) -> Dict[str, torch.Tensor]:
    """One micro-batch from `(tokens, loss_mask)` pairs (the mask marks trained tokens):
    padded to its own longest input, rounded up to the pad multiple, at most --seq-length."""
    inputs = [input_length(len(tokens), config.seq_length) for tokens, _ in samples]
    longest = max(inputs)
    multiple = config.pad_multiple
    width = min(-(-longest // multiple) * multiple, config.seq_length)
    rows = len(samples)
    tokens = torch.full((rows, width), config.pad_id, dtype=torch.long)
    labels = torch.full((rows, width), config.pad_id, dtype=torch.long)
    loss_mask = torch.zeros((rows, width), dtype=torch.float)
    padding = torch.ones((rows, width), dtype=torch.bool)
    for row, ((ids, mask), n) in enumerate(zip(samples, inputs)):
        ids = torch.as_tensor(numpy.asarray(ids[:n + 1], dtype=numpy.int64))
        trained = torch.as_tensor(numpy.asarray(mask[1:n + 1], dtype=numpy.float32))
        tokens[row, :n] = ids[:-1]
        labels[row, :n] = ids[1:]
        loss_mask[row, :n] = trained
        padding[row, :n] = False
    positions = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(rows, width)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": positions.contiguous(), "padding_mask": padding}
