"""Training data: Megatron-Core GPT datasets from the pretrain flags, and micro-batch feeding.

`GPTDataFeed` is what the training loop (`loop.train`) asks for batches; SFT has its own feed
(`megatron_dots.sft.feed`) with the same methods.

Datasets are built with Megatron-Core's `BlendedMegatronDatasetBuilder` (`--data-path` blends
and `--split`) or its mock dataset (`--mock-data`). Sample order follows Megatron-LM's
pretraining sampler: the global batch that starts at `consumed_samples` is the next
`global_batch_size` samples, data-parallel rank `r` reads micro-batch `m` from samples
`consumed + (m * dp + r) * mbs ...`; so resuming from a checkpoint's consumed-sample count
continues the same sequence, and a global batch that grows (`--dots-batch-stages`) does too.
"""

from typing import Dict, List, Optional

import torch

from ..storage.errors import DataFileError
from .arguments import ArgumentError, data_blend


class DatasetTokenizer:
    """What Megatron-Core's GPT datasets need of a tokenizer: eod, vocab size, an identity."""

    def __init__(self, kind: str, eod: int, vocab_size: int, source: Optional[str] = None):
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": kind, "source": source, "vocab_size": vocab_size,
                                   "eod": eod}


def dataset_tokenizer(args) -> DatasetTokenizer:
    """The tokenizer named by --tokenizer-type / --tokenizer-model / --vocab-size."""
    if args.tokenizer_type == "NullTokenizer":
        # As Megatron-LM's NullTokenizer: ids 0..N-1 are data, N is the end of a document.
        return DatasetTokenizer("NullTokenizer", args.vocab_size, args.vocab_size + 1)
    from ..data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_model)
    return DatasetTokenizer(args.tokenizer_type, tokenizer.eod, tokenizer.vocab_size,
                            args.tokenizer_model)


def build_datasets(args, tokenizer: DatasetTokenizer, train_samples: int, valid_samples: int):
    """(train, valid) Megatron-Core GPT datasets with at least these many samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    split = training_split(args.split)
    if not args.mock_data:
        check_splits(data_blend(args.data_path)[0], split, need_valid=valid_samples > 0)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data else data_blend(args.data_path),
        split=split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    cls = MockGPTDataset if args.mock_data else GPTDataset
    sizes = [train_samples, valid_samples, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return train, valid


def training_split(split: str) -> str:
    """--split without its test part: training never reads the test split, and Megatron-Core
    spins forever building a split that holds no documents (gpt_dataset.py _get_num_epochs)."""
    weights = (split.split(",") + ["0", "0"])[:3]
    return ",".join(weights[:2] + ["0"])


def check_splits(prefixes: List[str], split: str, need_valid: bool) -> None:
    """Every dataset's train split (and valid split when validating) must hold a document."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from ..data.indexed_check import check_indexed_dataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        check_indexed_dataset(prefix)
        documents = len(IndexedDataset(prefix))
        for index, name in ((0, "train"), (1, "validation")):
            if index == 1 and not need_valid:
                continue
            bounds = matrix[index]
            count = 0 if bounds is None else (int(round(bounds[1] * documents))
                                              - int(round(bounds[0] * documents)))
            if count <= 0:
                hint = " or --eval-iters 0" if index == 1 else ""
                raise ArgumentError(f"--data-path {prefix}: its {name} split holds no documents "
                                    f"({documents} documents, --split {split}); change --split"
                                    f"{hint}")


class GPTDataFeed:
    """The pretraining feed: fixed-length samples of the --data-path blend (or mock data).

    A feed is made once the parallel state exists, as `feed(args, train_samples,
    valid_samples)`, and gives the loop: `configure(config)` (TransformerConfig changes before
    the model is built), `train_batches(consumed_samples, global_batch)` and
    `valid_batches(index, global_batch)` (this DP rank's micro-batches, on the device),
    `has_validation`, `seq_length_of(batches)` (the schedule's sequence length) and
    `global_tokens(consumed_samples, global_batch)` (tokens of the step: throughput, and the
    consumed-token count that checkpoints record). `consumed_samples` is the position in this
    feed's data (`data_stage`: a new data stage starts it at 0)."""

    def __init__(self, args, train_samples: int, valid_samples: int):
        from megatron.core import parallel_state

        from ..compat.distributed import default_device

        tokenizer = dataset_tokenizer(args)
        if tokenizer.vocab_size > args.dots_config.vocab_size:
            raise ArgumentError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                f"is {args.dots_config.vocab_size}: raise --vocab-size / pick a preset that "
                f"fits (--tokenizer-model {args.tokenizer_model})")
        self.args = args
        self.seq_length = args.seq_length
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.device = default_device()
        self.train, self.valid = build_datasets(args, tokenizer, train_samples, valid_samples)
        largest = max(s.global_batch_size for s in args.batch_stages)
        if self.valid is not None and len(self.valid) < largest:
            self.valid = None  # a validation split too small for one batch

    def configure(self, config) -> None:
        pass

    @property
    def has_validation(self) -> bool:
        return self.valid is not None

    def train_batches(self, consumed_samples: int, global_batch: int):
        return self._batches(self.train, consumed_samples, global_batch)

    def valid_batches(self, index: int, global_batch: int):
        start = index * global_batch % max(1, len(self.valid) - global_batch + 1)
        return self._batches(self.valid, start, global_batch)

    def _batches(self, dataset, start: int, global_batch: int):
        return micro_batches(dataset, start, global_batch, self.args.micro_batch_size,
                             self.dp_rank, self.dp_size, self.device,
                             vocab_size=self.args.dots_config.vocab_size)

    def seq_length_of(self, batches) -> int:
        return self.seq_length

    def global_tokens(self, consumed_samples: int, global_batch: int) -> int:
        return global_batch * self.seq_length


def micro_batches(dataset, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, device, vocab_size: Optional[int] = None
                  ) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at `consumed_samples`.

    With `vocab_size`, a sample holding a token id outside [0, vocab_size) (data tokenized for
    another vocabulary, or a damaged ``.bin``) is a `DataFileError` naming its dataset, checked
    on the host before the batch reaches the device (where the embedding would fail with a
    device-side assert)."""
    count = global_batch_size // (micro_batch_size * dp_size)
    batches = []
    for m in range(count):
        first = consumed_samples + (m * dp_size + dp_rank) * micro_batch_size
        samples = [dataset[i] for i in range(first, first + micro_batch_size)]
        batch = {key: torch.stack([s[key] for s in samples])
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        if vocab_size is not None and any(
                int(batch[key].min()) < 0 or int(batch[key].max()) >= vocab_size
                for key in ("tokens", "labels")):
            for index, sample in enumerate(samples, first):  # name the culprit
                _check_token_ids(dataset, index, sample, vocab_size)
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def _check_token_ids(dataset, index: int, sample, vocab_size: int) -> None:
    for key in ("tokens", "labels"):
        ids = sample[key]
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            source = dataset
            if "dataset_id" in sample:  # a blend: the member dataset the sample came from
                source = dataset.datasets[int(sample["dataset_id"])]
            path = getattr(source, "dataset_path", None) or "--data-path"
            bad = low if low < 0 else high
            raise DataFileError(f"{path}.bin" if path != "--data-path" else path,
                                f"sample {index} holds token id {bad}, outside the model's "
                                f"vocabulary of {vocab_size} ids (data tokenized for another "
                                "vocabulary, or damaged)")
