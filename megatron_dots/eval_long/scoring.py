"""Scores of retrieval trials from any model: a function `tail_logits(rows, tail)` that maps
token ids [N, L] to the logits of each row's last `tail` positions [N, tail, V].

One teacher-forced pass per candidate row gives every metric:
- exact match (the headline): greedy decoding reproduces the answer exactly iff, fed the true
  answer, every answer token is the argmax of the logits before it (decoding and teacher
  forcing share the prefix as long as all earlier tokens matched);
- token accuracy: the fraction of answer tokens that are that argmax;
- answer log-prob: mean natural-log probability per answer token (float64 log-softmax);
- candidate rank: the true value's rank among the K candidates by summed answer log-prob
  (1 best; ties share the mean rank), and choice accuracy: 1 when the true value is the most
  likely alone, 1/m when m candidates tie for the top, else 0. A model that ignores the
  context scores chance: mean rank (K+1)/2, choice accuracy 1/K. With K = 1 both are NaN.
"""

import math
from dataclasses import asdict, dataclass
from typing import Callable, List, Sequence

import numpy as np
import torch

from .haystack import Trial

TailLogits = Callable[[torch.Tensor, int], torch.Tensor]

METRICS = ("accuracy", "token_accuracy", "answer_logprob", "choice_accuracy", "mean_rank")


@dataclass
class TrialScore:
    exact: bool
    token_accuracy: float
    answer_logprob: float
    rank: float
    choice: float


@dataclass
class CellScore:
    """Means over a cell's trials, and the trials themselves."""

    task: str
    length: int
    depth: float
    trials: int
    accuracy: float
    token_accuracy: float
    answer_logprob: float
    choice_accuracy: float
    mean_rank: float
    per_trial: List[TrialScore]

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "per_trial"}


def score_trial(logits: torch.Tensor, trial: Trial) -> TrialScore:
    """`logits` [K, T, V]: the last T positions of each of the trial's K rows."""
    answers = torch.as_tensor(trial.answers, dtype=torch.long)
    k, length = answers.shape
    if logits.shape[0] != k or logits.shape[1] < length + 1:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not cover {k} rows x "
                         f"{length + 1} tail positions")
    tail = logits.shape[1]
    # position L-1-length+j predicts answer token j: tail index tail-1-length+j
    predicting = logits[:, tail - 1 - length: tail - 1].double()
    logprobs = torch.log_softmax(predicting, dim=-1).gather(-1, answers[..., None])[..., 0]
    hits = predicting[0].argmax(dim=-1) == answers[0]
    totals = logprobs.sum(dim=1)
    above = int((totals[1:] > totals[0]).sum())
    tied = int((totals[1:] == totals[0]).sum())
    ranked = k > 1  # one candidate: nothing to rank
    return TrialScore(exact=bool(hits.all()), token_accuracy=float(hits.double().mean()),
                      answer_logprob=float(logprobs[0].mean()),
                      rank=1 + above + tied / 2 if ranked else math.nan,
                      choice=(0.0 if above else 1.0 / (1 + tied)) if ranked else math.nan)


def cell_rows(trials: Sequence[Trial]) -> torch.Tensor:
    """Every candidate row of the trials, stacked [sum K, L]."""
    return torch.as_tensor(np.concatenate([t.rows() for t in trials]), dtype=torch.long)


def tail_needed(trials: Sequence[Trial]) -> int:
    """Positions at the end of each row whose logits the scores read."""
    return max(t.answer_length for t in trials) + 1


def score_cell(trials: Sequence[Trial], tail_logits: TailLogits) -> CellScore:
    """All trials of one (task, length, depth) cell in one `tail_logits` call."""
    tail = tail_needed(trials)
    logits = tail_logits(cell_rows(trials), tail)
    scores, start = [], 0
    for trial in trials:
        k = trial.answers.shape[0]
        scores.append(score_trial(logits[start:start + k], trial))
        start += k
    first = trials[0]
    return CellScore(
        task=first.task, length=first.length, depth=first.depth, trials=len(trials),
        accuracy=float(np.mean([s.exact for s in scores])),
        token_accuracy=float(np.mean([s.token_accuracy for s in scores])),
        answer_logprob=float(np.mean([s.answer_logprob for s in scores])),
        choice_accuracy=float(np.mean([s.choice for s in scores])),
        mean_rank=float(np.mean([s.rank for s in scores])), per_trial=scores)


def chance(candidates: int) -> dict:
    """Graded scores of a model that ignores the context (NaN: no ranking with one)."""
    if candidates == 1:
        return {"choice_accuracy": math.nan, "mean_rank": math.nan}
    return {"choice_accuracy": 1.0 / candidates, "mean_rank": (candidates + 1) / 2}
