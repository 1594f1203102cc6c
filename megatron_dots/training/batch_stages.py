"""The paper's staged global batch size: the batch grows with the tokens consumed so far.

`--dots-batch-stages 0:64M,6T:96M,8.3T:128M` reads "from 0 tokens train with 64M-token
batches, from 6T tokens with 96M, from 8.3T with 128M" (dots.llm1, section 4). Sizes take the
suffixes K, M, B (or G) and T (powers of 1000). Each stage's batch must be a whole number of
sequences of `--seq-length` tokens: the paper's 64M/96M/128M are binary millions
(64Mi = 8192 sequences of 8192 tokens), written with the binary suffixes Ki, Mi, Gi, Ti.
The training loop asks `global_batch_size(consumed)` at every step, so a stage starts with the
first step after its threshold is crossed.
"""

from dataclasses import dataclass
from typing import List, Sequence

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12,
           "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


class BatchStageError(ValueError):
    """A malformed or inconsistent stage list."""


@dataclass(frozen=True)
class BatchStage:
    start_tokens: int          # the stage applies once this many tokens were consumed
    batch_tokens: int          # tokens per global batch
    global_batch_size: int     # the same in sequences

    def describe(self) -> str:
        return f"{format_tokens(self.start_tokens)}:{format_tokens(self.batch_tokens)}"


def parse_tokens(text: str) -> int:
    """'8.3T' -> 8_300_000_000_000."""
    text = text.strip().upper()
    suffix = next((s for s in ("KI", "MI", "GI", "TI") if text.endswith(s)), "")
    if not suffix and text and text[-1] in _SUFFIX:
        suffix = text[-1]
    number = text[: len(text) - len(suffix)]
    try:
        value = float(number) * _SUFFIX[suffix]
    except ValueError:
        raise BatchStageError(f"{text!r} is not a token count like 64M or 8.3T") from None
    if value < 0:
        raise BatchStageError(f"{text!r} is negative")
    return int(round(value))


def format_tokens(count: int) -> str:
    """The shortest exact spelling: 6T, 8.3T, 64Mi, 512."""
    for suffix in ("T", "B", "M", "K", "TI", "GI", "MI", "KI"):
        scale = _SUFFIX[suffix] if suffix.endswith("I") else _SUFFIX[suffix] // 100
        if count >= _SUFFIX[suffix] and count % scale == 0:
            value = count / _SUFFIX[suffix]
            return f"{value:g}{suffix[0]}{'i' if suffix.endswith('I') else ''}"
    return str(count)


def parse_batch_stages(text: str, seq_length: int) -> List[BatchStage]:
    """Parse 'START:BATCH,START:BATCH,...' (tokens); the first stage must start at 0."""
    stages = []
    for item in text.split(","):
        if item.count(":") != 1:
            raise BatchStageError(f"stage {item!r}: expected START_TOKENS:BATCH_TOKENS")
        start, batch = (parse_tokens(part) for part in item.split(":"))
        if batch <= 0:
            raise BatchStageError(f"stage {item!r}: the batch must be positive")
        if batch % seq_length:
            hint = ""
            binary = item.split(":")[1].strip().upper()
            if binary and binary[-1] in "KMGT":
                binary_tokens = parse_tokens(binary + "I")
                if binary_tokens % seq_length == 0:
                    hint = (f"; did you mean {item.split(':')[1].strip()}i = "
                            f"{binary_tokens // seq_length} sequences?")
            raise BatchStageError(f"stage {item!r}: {batch} tokens is not a whole number of "
                                  f"--seq-length {seq_length} sequences{hint}")
        stages.append(BatchStage(start, batch, batch // seq_length))
    if stages[0].start_tokens != 0:
        raise BatchStageError(f"the first stage must start at 0 tokens, not "
                              f"{format_tokens(stages[0].start_tokens)}")
    for before, after in zip(stages, stages[1:]):
        if after.start_tokens <= before.start_tokens:
            raise BatchStageError(f"stage starts must increase: {before.describe()} then "
                                  f"{after.describe()}")
    return stages


def global_batch_size(stages: Sequence[BatchStage], consumed_tokens: int) -> int:
    """The global batch (sequences) of the step that starts after `consumed_tokens`."""
    current = stages[0]
    for stage in stages:
        if consumed_tokens >= stage.start_tokens:
            current = stage
    return current.global_batch_size


def total_samples(stages: Sequence[BatchStage], seq_length: int, iterations: int,
                  start_tokens: int = 0) -> int:
    """Sequences consumed by `iterations` steps under the stage schedule, starting after
    `start_tokens` consumed tokens (whole stretches of equal batches at a time, so long
    schedules cost one step per stage)."""
    samples, left = 0, iterations
    while left > 0:
        tokens = start_tokens + samples * seq_length
        batch = global_batch_size(stages, tokens)
        upcoming = [s.start_tokens for s in stages if s.start_tokens > tokens]
        steps = left
        if upcoming:  # steps until the next stage's threshold is reached
            steps = min(left, -(-(upcoming[0] - tokens) // (batch * seq_length)))
        samples += steps * batch
        left -= steps
    return samples


def describe_batches(stages: Sequence[BatchStage], seq_length: int) -> str:
    """The global batch in sequences and tokens, per stage: '8 x 64 = 512 tokens'."""
    parts = [f"{s.global_batch_size} sequences x {seq_length} = {s.batch_tokens:,} tokens"
             for s in stages]
    if len(stages) == 1:
        return parts[0]
    return "; ".join(f"from {format_tokens(s.start_tokens)} tokens {part}"
                     for s, part in zip(stages, parts))


def fixed_batch(global_batch_size: int, seq_length: int) -> List[BatchStage]:
    """The one-stage schedule of a constant --global-batch-size."""
    return [BatchStage(0, global_batch_size * seq_length, global_batch_size)]
