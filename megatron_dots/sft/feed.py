"""`SFTDataFeed`: the training loop's batches for `megatron-dots sft` (see `training.data.GPTDataFeed`
for the methods a feed has).

The JSONL file is tokenized once with the chat template into a cache (`prepare`), by global
rank 0 while the others wait; every rank then memory-maps it. Conversations longer than
`--seq-length` + 1 tokens are truncated or dropped (`--dots-sft-overlong`) and counted in the
log. The loss is the mean over every assistant token of the global batch: the config's
`calculate_per_token_loss` makes the loss function return sums and token counts, and
Megatron-Core's `finalize_model_grads` divides the gradients by the token count summed over all
micro-batches and data-parallel ranks. `variable_seq_lengths` lets pipeline stages exchange
activations whose length changes from one micro-batch to the next.
"""

from typing import List

import numpy
import torch

from ..storage.errors import DataFileError
from ..training.arguments import ArgumentError
from ..training.reporting import log
from .batching import (
    SampleOrder,
    SFTBatchConfig,
    input_length,
    make_micro_batch,
    order_global_batch,
    rank_slots,
    split_conversations,
)


def load_dataset(args):
    """The tokenized conversations of --data-path (global rank 0 prepares the cache, and with
    --save writes the tokenizer and chat template next to the checkpoints, `assets`)."""
    from ..data.tokenizer import TokenizerError
    from .prepare import load_or_prepare

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    error = None
    if rank == 0:
        try:
            load_or_prepare(args.data_path[0], args.tokenizer_model,
                            args.dots_chat_template, args.data_cache_path, progress=True)
            if args.save:
                from .assets import save_chat_assets
                from .chat_format import ChatFormat

                start = args.pretrained_checkpoint or args.load
                save_chat_assets(args.save, ChatFormat(args.tokenizer_model,
                                                       args.dots_chat_template), start)
        except (DataFileError, TokenizerError) as err:
            error = err
    _all_ranks_ok(error)
    return load_or_prepare(args.data_path[0], args.tokenizer_model, args.dots_chat_template,
                           args.data_cache_path, progress=False)


def _all_ranks_ok(error) -> None:
    """Raise rank 0's error on every rank (so all exit alike instead of waiting forever)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [str(error) if error is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise ArgumentError(box[0])  # rank 0's message (rank 0 prints it)
    if error is not None:
        raise error


class SFTDataFeed:
    """See the module docstring."""

    def __init__(self, args, train_samples: int, valid_samples: int):
        from megatron.core import parallel_state

        from ..compat.distributed import default_device
        from ..data.tokenizer import load_tokenizer

        self.args = args
        self.seq_length = args.seq_length
        self.dataset = load_dataset(args)
        self.lengths = numpy.asarray(self.dataset.lengths, dtype=numpy.int64)
        tokenizer = load_tokenizer(args.tokenizer_model)
        vocab = args.dots_config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ArgumentError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                f"is {vocab}: pick a model that fits (--tokenizer-model {args.tokenizer_model})")
        self.config = SFTBatchConfig(
            micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
            pad_multiple=args.dots_sft_pad_multiple, pad_id=tokenizer.eod,
            length_grouped=args.dots_sft_length_grouped, seed=args.seed)
        self._check_token_ids(vocab)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.device = default_device()

        train, valid = split_conversations(len(self.lengths), _split_weights(args.split),
                                           args.seed)
        overlong = self.lengths > args.seq_length + 1
        self.overlong = int(overlong.sum())
        if args.dots_sft_overlong == "drop":
            train, valid = train[~overlong[train]], valid[~overlong[valid]]
        if len(train) == 0:
            raise ArgumentError(f"--data-path {args.data_path[0]}: no conversation left to "
                                f"train on ({len(self.lengths)} conversations, {self.overlong} "
                                f"longer than --seq-length {args.seq_length} + 1 tokens and "
                                f"--dots-sft-overlong {args.dots_sft_overlong})")
        self.train = SampleOrder(train, args.seed)
        self.valid = SampleOrder(valid, args.seed + 1) if len(valid) else None
        self._log_counts(train, valid, train_samples)

    def _check_token_ids(self, vocab: int) -> None:
        """Once, before training (not per step): every cached id must be in the vocabulary;
        an error names the first conversation that is not."""
        tokens = numpy.asarray(self.dataset.tokens)
        if not len(tokens) or (int(tokens.max()) < vocab and int(tokens.min()) >= 0):
            return
        first = int(numpy.flatnonzero((tokens >= vocab) | (tokens < 0))[0])
        index = int(numpy.searchsorted(numpy.asarray(self.dataset.offsets), first, "right")) - 1
        raise DataFileError(self.args.data_path[0], f"conversation {index} holds token id "
                            f"{int(tokens[first])}, outside the model's vocabulary of {vocab} ids")

    def _log_counts(self, train, valid, train_samples: int) -> None:
        meta = getattr(self.dataset, "meta", {}) or {}
        skipped = meta.get("skipped_no_assistant", 0)
        policy = "dropped" if self.args.dots_sft_overlong == "drop" else "truncated"
        log(f" sft data: {len(self.lengths):,} conversations in {self.args.data_path[0]} "
            f"({skipped} without an assistant turn skipped); {len(train):,} train, "
            f"{len(valid):,} validation; {self.overlong} longer than --seq-length "
            f"{self.args.seq_length} + 1 tokens {policy}; {train_samples:,} samples = "
            f"{train_samples / max(1, len(train)):.2f} epochs")

    def configure(self, config) -> None:
        config.calculate_per_token_loss = True
        config.variable_seq_lengths = True

    @property
    def has_validation(self) -> bool:
        return self.valid is not None

    def _conversations(self, order: SampleOrder, start: int, global_batch: int) -> List[int]:
        return order_global_batch(order.span(start, global_batch), self.lengths,
                                  self.config.length_grouped)

    def _batches(self, order: SampleOrder, start: int, global_batch: int):
        conversations = self._conversations(order, start, global_batch)
        batches = []
        for slots in rank_slots(global_batch, self.config.micro_batch_size, self.dp_rank,
                                self.dp_size):
            samples = [self.dataset.sample(conversations[s]) for s in slots]
            batch = make_micro_batch(samples, self.config)
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches

    def train_batches(self, consumed_samples: int, global_batch: int):
        return self._batches(self.train, consumed_samples, global_batch)

    def valid_batches(self, index: int, global_batch: int):
        return self._batches(self.valid, index * global_batch, global_batch)

    def seq_length_of(self, batches) -> int:
        return max(int(b["tokens"].shape[1]) for b in batches)

    def global_tokens(self, consumed_samples: int, global_batch: int) -> int:
        """Real (unpadded) input tokens of the step's global batch."""
        return sum(input_length(int(self.lengths[c]), self.seq_length)
                   for c in self.train.span(consumed_samples, global_batch))


def _split_weights(split: str) -> List[float]:
    return [float(w) for w in split.split(",")]
