"""Data and length stages: what a run that `--load`s another stage's checkpoint continues.

A *data stage* is a stretch of training on one data configuration: `--seq-length`, `--split`
and the `--data-path` blend (each dataset's file name, size and weight; its directory does not
count, so moved files stay the same stage). Checkpoints record their data stage, the consumed
sample count at which it began and the tokens consumed so far (`stage_record`).

A length stage (dots.llm1's final 32K continued pretraining) is a new run that `--load`s the
previous stage's checkpoint with a new `--seq-length` (and usually new data). Its iteration,
optimizer state, consumed tokens and learning-rate schedule continue; the consumed-sample
count of the old data is no position in the new one, so such a run needs
`--dots-new-data-stage`, which starts the new data at its first sample (`continue_stage`). A
checkpoint saved inside the new stage resumes at its own position, with the same flags; with
`--load STAGE2 --save STAGE2 --pretrained-checkpoint STAGE1 --dots-new-data-stage` one command
line serves the stage's first job and its requeued ones.

Megatron-Core's `OptimizerParamScheduler` counts samples; at a length change its position is
carried over in tokens (`schedule_position`), so warmup, the WSD anneal and the end of the decay
stay at the same token counts as `--dots-batch-stages` (same iterations when the batch in tokens
is unchanged).
"""

import os
from typing import Dict, List, Optional, Tuple

from .arguments import ArgumentError, data_blend
from .batch_stages import total_samples


def data_stage(args) -> Dict:
    """The data configuration of these flags, as recorded in checkpoints."""
    if getattr(args, "mock_data", False):
        data = ["mock"]
    else:
        prefixes, weights = data_blend(args.data_path or [])
        data = [[os.path.basename(os.path.normpath(prefix)), _size(prefix),
                 None if weights is None else weights[i]] for i, prefix in enumerate(prefixes)]
    return {"seq_length": args.seq_length, "split": args.split, "data": data}


def _size(prefix: str) -> Optional[int]:
    for path in (prefix + ".bin", prefix):
        if os.path.isfile(path):
            return os.path.getsize(path)
    return None


def describe_data(stage: Dict) -> str:
    if stage["data"] == ["mock"]:
        return "--mock-data"
    return "--data-path " + " ".join(
        (f"{weight:g} " if weight is not None else "") + name for name, _, weight in stage["data"])


def saved_seq_length(dots: Dict) -> Optional[int]:
    """The --seq-length a checkpoint was trained at; None for checkpoints that predate the
    record (they resume as before: at the flags' length, at their consumed-sample position)."""
    return int(dots["seq_length"]) if dots.get("seq_length") else None


def continue_stage(args, dots: Dict, iteration: int, consumed_samples: int, source: str
                   ) -> Tuple[int, int, List[str]]:
    """(consumed tokens, consumed samples at which this run's data begins, log lines) for a run
    resuming the checkpoint whose common `dots` state this is; raises `ArgumentError` for a
    length change without --dots-new-data-stage."""
    seq = args.seq_length
    saved_seq = saved_seq_length(dots) or seq
    tokens = int(dots.get("consumed_tokens", consumed_samples * saved_seq))
    saved = dots.get("data_stage")
    ours = data_stage(args)
    lines = []
    if saved_seq != seq:
        lines.append(f" length stage: {source} was trained at --seq-length {saved_seq} "
                     f"({tokens:,} tokens consumed); this run trains at "
                     f"--seq-length {seq}: iteration, optimizer state, consumed tokens and the "
                     "LR schedule continue")
    same_data = saved is None or saved == ours
    if saved_seq == seq and same_data:
        start = int(dots.get("data_stage_start", 0))
        if getattr(args, "dots_new_data_stage", False) and saved is not None:
            lines.append(f" --dots-new-data-stage: {source} was saved in this data stage; "
                         f"continuing its data at sample {consumed_samples - start:,}")
        return tokens, start, lines
    if not getattr(args, "dots_new_data_stage", False):
        if saved_seq != seq:
            raise ArgumentError(
                f"{source} was trained at --seq-length {saved_seq} and has consumed "
                f"{consumed_samples:,} samples of {saved_seq} tokens; at --seq-length {seq} that "
                "count is no position in the data. Give --dots-new-data-stage to start "
                f"{describe_data(ours)} at its first sample (iteration, optimizer state, "
                "consumed tokens and the LR schedule continue), or --finetune to start over at "
                "iteration 0 from its weights")
        lines.append(f" WARNING: {source} was trained on {describe_data(saved)} (--split "
                     f"{saved['split']}); continuing at sample {consumed_samples:,} of "
                     f"{describe_data(ours)} (--split {ours['split']}), as Megatron-LM does; "
                     "give --dots-new-data-stage to start the new data at its first sample")
        return tokens, int(dots.get("data_stage_start", 0)), lines
    lines.append(f" --dots-new-data-stage: a new data stage begins at iteration "
                 f"{iteration + 1}: {describe_data(ours)} from its first "
                 f"sample ({consumed_samples:,} samples consumed before)")
    return tokens, consumed_samples, lines


def schedule_position(num_steps, saved_seq: int, seq: int):
    """The scheduler's sample count `num_steps` of `saved_seq` tokens, in samples of `seq`
    tokens (the same tokens); an integer when exact."""
    tokens = num_steps * saved_seq
    if isinstance(tokens, int) and tokens % seq == 0:
        return tokens // seq
    return tokens / seq


def train_samples(args, iteration: int, consumed_samples: int, consumed_tokens: int,
                  data_stage_start: int) -> int:
    """Samples of this run's data the remaining iterations read up to: the data position
    plus the batches of the iterations left (under the batch stages, from the tokens consumed).
    A run and its resumptions ask for the same count, so they build the same dataset."""
    left = max(0, args.train_iters - iteration)
    return (consumed_samples - data_stage_start) + total_samples(
        args.batch_stages, args.seq_length, left, start_tokens=consumed_tokens)


def stage_record(args, data_stage_start: int) -> Dict:
    """What checkpoints record of the data stage (see the module docstring)."""
    return {"seq_length": args.seq_length, "data_stage": data_stage(args),
            "data_stage_start": data_stage_start}
