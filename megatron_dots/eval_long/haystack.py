"""Retrieval prompts as token ids: seeded filler text (no downloads), needles at a relative
depth, the question, and the answer last, EXACTLY `length` tokens per row.

A trial is one prompt (filler with needles, then the question) and K answers: row 0 the true
value, rows 1.. same-length distractor values (other keys' values first, for multikey). Every
row is `prompt + answer` and has exactly `length` tokens. The sequence is built token by token:
sentences are encoded one at a time with a leading space, and the value's tokens in the needle
are the answer's tokens, so copying it from the context reproduces the answer exactly.

The filler and the keys of a (task, length, trial) do not depend on the depth: across depths
only the queried needle moves. The last filler sentence is cut to make the length exact.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Sequence, Tuple

import numpy as np

TASKS = ("passkey", "multikey")

_SUBJECTS = ("The grass", "The sky", "The river", "A small bird", "The old bridge", "The wind",
             "The garden", "A quiet street", "The morning light", "The mountain", "The lake",
             "An old tree", "The harbour", "A long road", "The village")
_PREDICATES = ("is green", "is blue", "flows slowly", "sings at dawn", "stands still",
               "moves through the trees", "looks calm", "grows taller", "turns golden",
               "waits for rain", "shines brightly", "rests in the shade", "hums softly")
_TAILS = ("", " today", " again", " in the valley", " as always", " near the town",
          " all day", " once more")
_KEY_WORDS = (("amber", "silver", "crimson", "olive", "ivory", "cobalt", "scarlet", "violet",
               "golden", "azure", "coral", "indigo"),
              ("falcon", "otter", "lynx", "heron", "badger", "walrus", "beetle", "marten",
               "osprey", "gecko", "bison", "raven"))

_INTRO = {
    "passkey": "A pass key is hidden in the text below. Remember it.",
    "multikey": "Keys and their values are hidden in the text below. Remember them.",
}
_CANDIDATE_TRIES = 1000  # draws for a distractor value of the answer's token count


class HaystackError(ValueError):
    """A length, depth or setting that cannot make a prompt; the message names the flag."""


@dataclass(frozen=True)
class HaystackSettings:
    """What every trial shares: value digits, keys per multikey haystack, K candidates."""

    digits: int = 5
    keys: int = 4
    candidates: int = 4
    seed: int = 0


@dataclass
class Trial:
    """One prompt and its K answers (row 0 true); spans are token positions [start, stop)."""

    task: str
    length: int
    depth: float
    index: int
    prompt: np.ndarray  # [length - answer_length] int64
    answers: np.ndarray  # [K, answer_length] int64, row 0 the true value's tokens
    values: List[str]  # K values as text, values[0] the true one
    key: str  # the queried key ("pass key" for passkey)
    needle_span: Tuple[int, int]  # the queried needle
    filler_span: Tuple[int, int]  # filler + needles, between the intro and the question
    filler_tokens: int  # filler alone (needles excluded)
    longest_sentence: int  # tokens of the longest filler sentence

    @property
    def answer_length(self) -> int:
        return int(self.answers.shape[1])

    def rows(self) -> np.ndarray:
        """[K, length] token ids: the prompt followed by each answer."""
        prompt = np.broadcast_to(self.prompt, (self.answers.shape[0], len(self.prompt)))
        return np.concatenate([prompt, self.answers], axis=1)


class HaystackBuilder:
    """Builds trials with one tokenizer (anything with `encode(text) -> ids`)."""

    def __init__(self, tokenizer, settings: HaystackSettings = HaystackSettings()):
        self.tokenizer = tokenizer
        self.settings = settings
        self._encode = lru_cache(maxsize=None)(lambda text: tuple(tokenizer.encode(text)))

    def encode(self, text: str) -> List[int]:
        return list(self._encode(text))

    # ------------------------------------------------------------------ pieces

    def _value(self, rng: np.random.Generator) -> str:
        digits = self.settings.digits
        return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))

    def _value_tokens(self, value: str) -> List[int]:
        return self.encode(" " + value)

    def _sentence(self, rng: np.random.Generator) -> str:
        subject, predicate, tail = (words[rng.integers(len(words))]
                                    for words in (_SUBJECTS, _PREDICATES, _TAILS))
        return f" {subject} {predicate}{tail}."

    def _needle(self, task: str, key: str, value: str) -> List[int]:
        value_ids = self._value_tokens(value)
        if task == "passkey":
            return (self.encode(" The pass key is") + value_ids + self.encode(". Remember it.")
                    + value_ids + self.encode(" is the pass key."))
        return self.encode(f" The value of key {key} is") + value_ids + self.encode(".")

    def _question(self, task: str, key: str) -> List[int]:
        if task == "passkey":
            return self.encode(" What is the pass key? The pass key is")
        return self.encode(f" What is the value of key {key}? The value of key {key} is")

    def _distinct_values(self, rng, count: int, length_of: int, taken: set) -> List[str]:
        """`count` values not in `taken` (added to it) whose answers have `length_of` tokens;
        of another token count only when `_CANDIDATE_TRIES` draws found none."""
        values = []
        for _ in range(count):
            fallback = None
            for _ in range(_CANDIDATE_TRIES):
                value = self._value(rng)
                if value in taken:
                    continue
                fallback = fallback or value
                if len(self._value_tokens(value)) == length_of:
                    break
            else:
                value = fallback
            if value is None:
                raise HaystackError(f"cannot draw {count} more distinct {self.settings.digits}-"
                                    "digit values (--digits too small for --keys / --candidates)")
            values.append(value)
            taken.add(value)
        return values

    def _filler(self, rng: np.random.Generator, budget: int) -> Tuple[List[List[int]], int]:
        """Sentences (token lists) of exactly `budget` tokens, the last one cut; and the
        longest sentence's length."""
        sentences, total, longest = [], 0, 0
        while total < budget:
            ids = self.encode(self._sentence(rng))
            longest = max(longest, len(ids))
            ids = ids[:budget - total]
            sentences.append(ids)
            total += len(ids)
        return sentences, longest

    # ------------------------------------------------------------------ trials

    def _keys(self, task: str, rng: np.random.Generator) -> List[str]:
        if task == "passkey":
            return ["pass key"]
        first, second = _KEY_WORDS
        pairs = rng.choice(len(first) * len(second), size=self.settings.keys, replace=False)
        return [f"{first[p // len(second)]}-{second[p % len(second)]}" for p in pairs]

    def _values(self, keys: List[str], rng: np.random.Generator):
        """(each key's value, the K candidates: the true value, then the other keys' values,
        then fresh ones), all of the true answer's token count."""
        true_value = self._value(rng)
        answer_length = len(self._value_tokens(true_value))
        taken = {true_value}
        key_values = [true_value] + self._distinct_values(rng, len(keys) - 1, answer_length,
                                                          taken)
        candidates = key_values[:self.settings.candidates]
        candidates += self._distinct_values(rng, self.settings.candidates - len(candidates),
                                            answer_length, taken)
        if len({len(self._value_tokens(v)) for v in candidates}) != 1:
            raise HaystackError(f"the tokenizer gives {self.settings.digits}-digit values "
                                "different token counts and no equal-length distractor was "
                                "found (--digits)")
        return key_values, candidates

    def trial(self, task: str, length: int, depth: float, index: int) -> Trial:
        """Trial `index` of (task, length) with the queried needle at relative `depth` of the
        filler (0: first thing after the intro, 1: just before the question)."""
        if task not in TASKS:
            raise HaystackError(f"unknown task {task!r} (--tasks: choose from {', '.join(TASKS)})")
        if not 0.0 <= depth <= 1.0:
            raise HaystackError(f"depth {depth} is outside [0, 1] (--depths)")
        rng = np.random.default_rng([self.settings.seed, TASKS.index(task), length, index])
        keys = self._keys(task, rng)
        key_values, candidates = self._values(keys, rng)
        other_depths = rng.random(len(keys) - 1)
        needles = [self._needle(task, k, v) for k, v in zip(keys, key_values)]
        intro = self.encode(_INTRO[task])
        question = self._question(task, keys[0])
        answers = np.array([self._value_tokens(v) for v in candidates], dtype=np.int64)
        fixed = len(intro) + sum(map(len, needles)) + len(question) + answers.shape[1]
        budget = length - fixed
        if budget < 1:
            raise HaystackError(f"--lengths {length} is too short for {task}: its intro, "
                                f"needles, question and answer alone take {fixed} tokens")
        sentences, longest = self._filler(rng, budget)
        starts = np.cumsum([0] + [len(x) for x in sentences])  # boundary token offsets
        # needle i goes at the sentence boundary nearest its depth; equal boundaries keep order
        slots = [int(np.abs(starts - d * budget).argmin()) for d in [depth, *other_depths]]
        body, needle_span = [], None
        for boundary in range(len(sentences) + 1):
            for i in [i for i, slot in enumerate(slots) if slot == boundary]:
                if i == 0:
                    needle_span = (len(intro) + len(body), len(intro) + len(body) + len(needles[0]))
                body += needles[i]
            if boundary < len(sentences):
                body += sentences[boundary]
        prompt = np.array(intro + body + question, dtype=np.int64)
        assert len(prompt) + answers.shape[1] == length
        return Trial(task=task, length=length, depth=depth, index=index, prompt=prompt,
                     answers=answers, values=candidates, key=keys[0], needle_span=needle_span,
                     filler_span=(len(intro), len(intro) + len(body)), filler_tokens=budget,
                     longest_sentence=longest)

    def trials(self, task: str, length: int, depth: float, count: int) -> List[Trial]:
        return [self.trial(task, length, depth, i) for i in range(count)]


def parse_depths(text: str) -> List[float]:
    """`0,0.25,...` -> floats in [0, 1] (HaystackError names --depths)."""
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HaystackError(f"--depths {text!r}: expected comma-separated numbers in [0, 1]") \
            from None
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if not depths or bad:
        raise HaystackError(f"--depths {text!r}: every depth must lie in [0, 1]"
                            + (f" ({bad[0]} does not)" if bad else ""))
    return list(dict.fromkeys(depths))


def parse_choice(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    """Comma-separated names, each one of `allowed`, duplicates dropped."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise HaystackError(f"{flag} is empty; choose from {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise HaystackError(f"{flag} {text!r}: unknown {name!r}; choose from "
                                f"{', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_lengths(text: str) -> List[int]:
    """`4096,8192` -> positive ints (HaystackError names --lengths)."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HaystackError(f"--lengths {text!r}: expected comma-separated token counts") \
            from None
    if not lengths or min(lengths) < 1:
        raise HaystackError(f"--lengths {text!r}: give one or more positive token counts")
    return list(dict.fromkeys(lengths))


def sample_texts(count: int, seed: int = 0) -> List[str]:
    """`count` filler sentences plus every instruction, needle and question form, with
    numbers: text to train a small tokenizer that covers the haystacks (tests, demos)."""
    rng = np.random.default_rng(seed)

    class _Chars:  # a stand-in tokenizer: the builder only needs `encode` here
        @staticmethod
        def encode(text):
            return list(text.encode())

    builder = HaystackBuilder(_Chars())
    texts = [builder._sentence(rng) for _ in range(count)] + list(_INTRO.values()) * (count // 10)
    for first in _KEY_WORDS[0]:
        for second in _KEY_WORDS[1]:
            key, value = f"{first}-{second}", builder._value(rng)
            texts.append(f" What is the value of key {key}? The value of key {key} is {value}.")
    texts += [f" What is the pass key? The pass key is {builder._value(rng)}. Remember it."
              for _ in range(count // 10)]
    return texts
