"""`megatron-dots eval-long`: haystacks of exact length with the needle at its depth, scores
against oracle models (a copying model scores 100 %, a constant one chance) and a float64
re-derivation, the Megatron runner's logits against transformers, the HF and --ckpt paths and a
torchrun layout giving the same table, and bad inputs."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from launch import describe, torchrun
from reference import make_hf_model, tiny_config

from megatron_dots.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from megatron_dots.eval_long import scoring
from megatron_dots.eval_long.cli import main as eval_long
from megatron_dots.eval_long.haystack import (TASKS, HaystackBuilder, HaystackSettings,
                                              sample_texts)

SETTINGS = HaystackSettings(digits=5, keys=3, candidates=4, seed=7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes run many times faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE of the tiny model's vocabulary size, trained on haystack text."""
    path = str(tmp_path_factory.mktemp("tok") / "bpe")
    return train_bpe_tokenizer(sample_texts(2000), path, vocab_size=tiny_config().vocab_size)


@pytest.fixture(scope="module")
def builder(tokenizer_dir):
    return HaystackBuilder(load_tokenizer(tokenizer_dir), SETTINGS)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tokenizer_dir):
    """A random tiny HF dots model (non-zero expert bias) saved with the tokenizer."""
    model = make_hf_model(tiny_config(), seed=3, bias_scale=0.3)
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return model, str(path)


def _find(sequence, pattern):
    """Start positions of `pattern` in `sequence` (token lists)."""
    n = len(pattern)
    return [i for i in range(len(sequence) - n + 1) if list(sequence[i:i + n]) == pattern]


def _needle_spans(trial, tokenizer):
    """Every needle's [start, stop) in the prompt, found by searching its tokens."""
    prompt = list(trial.prompt)
    if trial.task == "passkey":
        start = _find(prompt, tokenizer.encode(" The pass key is"))[0]
        end = _find(prompt, tokenizer.encode(" is the pass key."))[0]
        return [(start, end + len(tokenizer.encode(" is the pass key.")))]
    dot = tokenizer.encode(".")
    starts = [s for s in _find(prompt, tokenizer.encode(" The value of key"))
              if s < trial.filler_span[1]]  # the question repeats the phrase
    return [(s, next(i for i in range(s, len(prompt)) if prompt[i:i + 1] == dot) + 1)
            for s in starts]


@pytest.mark.parametrize("task", TASKS)
def test_rows_have_the_exact_length_and_the_needle_sits_at_its_depth(builder, task):
    tokenizer = builder.tokenizer
    for length in (160, 256):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            for index in range(2):
                trial = builder.trial(task, length, depth, index)
                rows = trial.rows()
                assert rows.shape == (SETTINGS.candidates, length)
                assert (rows[:, :-trial.answer_length] == trial.prompt).all()
                assert len(set(trial.values)) == SETTINGS.candidates
                for row, value in zip(rows, trial.values):  # the answers are the values
                    assert tokenizer.decode(row[-trial.answer_length:]) == " " + value
                spans = _needle_spans(trial, tokenizer)
                assert len(spans) == (1 if task == "passkey" else SETTINGS.keys)
                assert trial.needle_span in spans
                needle = tokenizer.decode(trial.prompt[slice(*trial.needle_span)])
                assert trial.key in needle and trial.values[0] in needle
                # filler tokens before the queried needle: depth x filler within one sentence
                other = sum(stop - start for start, stop in spans
                            if start < trial.needle_span[0])
                before = trial.needle_span[0] - trial.filler_span[0] - other
                assert abs(before - depth * trial.filler_tokens) <= trial.longest_sentence
                filler = trial.filler_span[1] - trial.filler_span[0] - sum(
                    stop - start for start, stop in spans)
                assert filler == trial.filler_tokens
                question = tokenizer.decode(trial.prompt[trial.filler_span[1]:])
                assert question.startswith(" What is") and trial.key in question


def test_trials_are_deterministic_by_seed_and_only_the_needle_moves(builder, tokenizer_dir):
    again = HaystackBuilder(load_tokenizer(tokenizer_dir), SETTINGS)
    other = HaystackBuilder(builder.tokenizer, HaystackSettings(**{**SETTINGS.__dict__,
                                                                   "seed": 8}))
    for task in TASKS:
        first, second = builder.trial(task, 200, 0.5, 1), again.trial(task, 200, 0.5, 1)
        assert (first.rows() == second.rows()).all() and first.values == second.values
        assert not np.array_equal(first.rows(), other.trial(task, 200, 0.5, 1).rows())
        assert not np.array_equal(first.rows(), builder.trial(task, 200, 0.5, 2).rows())
    shallow, deep = builder.trial("passkey", 200, 0.0, 0), builder.trial("passkey", 200, 1.0, 0)
    assert shallow.needle_span[0] < deep.needle_span[0]

    def without_needle(trial):
        return np.delete(trial.prompt, np.arange(*trial.needle_span))

    assert np.array_equal(without_needle(shallow), without_needle(deep))


def _copying_model(rows: torch.Tensor, tail: int) -> torch.Tensor:
    """An induction-head oracle: at each position, find the latest earlier place where the
    longest suffix of the tokens so far also occurs, and predict the token that followed it."""
    vocab = int(rows.max()) + 1
    logits = torch.zeros(rows.shape[0], tail, vocab)
    for r, row in enumerate(rows.numpy()):
        length = len(row)
        for t, p in enumerate(range(length - tail, length)):
            match = np.zeros(p, dtype=np.int64)  # suffix match length ending at q < p
            alive = np.ones(p, dtype=bool)
            for m in range(p):
                q = np.arange(p) - m
                alive &= (q >= 0) & (row[np.maximum(q, 0)] == row[p - m])
                if not alive.any():
                    break
                match[alive] += 1
            best = np.flatnonzero(match == match.max())[-1]
            logits[r, t, row[best + 1]] = 40.0
    return logits


def _constant_model(rows: torch.Tensor, tail: int) -> torch.Tensor:
    return torch.zeros(rows.shape[0], tail, int(rows.max()) + 1)


def test_a_copying_model_scores_everything_and_a_constant_one_chance(builder):
    for task, length, depth in [(t, 200, 0.5) for t in TASKS] + [(t, 160, 0.0) for t in TASKS]:
        trials = builder.trials(task, length, depth, 3)
        copying = scoring.score_cell(trials, _copying_model)
        assert (copying.accuracy, copying.token_accuracy, copying.choice_accuracy,
                copying.mean_rank) == (1.0, 1.0, 1.0, 1.0)
        assert copying.answer_logprob > -1e-9  # log p of a one-hot with margin 40
        constant = scoring.score_cell(trials, _constant_model)
        assert (constant.accuracy, constant.token_accuracy) == (0.0, 0.0)
        expected = scoring.chance(SETTINGS.candidates)
        assert constant.choice_accuracy == pytest.approx(expected["choice_accuracy"])
        assert constant.mean_rank == pytest.approx(expected["mean_rank"])


def test_scores_match_a_float64_rederivation(builder):
    gen = torch.Generator().manual_seed(0)
    trial = builder.trial("multikey", 200, 0.25, 0)
    k, a = trial.answers.shape
    for sharpen in (0.0, 10.0):
        logits = torch.randn(k, a + 3, 40, generator=gen)
        # make some answer tokens the argmax, so exact/token accuracy are not trivially 0
        for j in range(a):
            logits[0, 2 + j, trial.answers[0, j] % 40] += sharpen
        answers = trial.answers % 40
        shifted = type(trial)(**{**trial.__dict__, "answers": answers})
        got = scoring.score_trial(logits, shifted)
        lp = logits.double().numpy()
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        picked = np.array([[lp[r, 2 + j, answers[r, j]] for j in range(a)] for r in range(k)])
        hits = [int(np.argmax(logits[0, 2 + j].numpy())) == answers[0, j] for j in range(a)]
        totals = picked.sum(1)
        assert got.answer_logprob == pytest.approx(picked[0].mean(), abs=1e-12)
        assert got.token_accuracy == pytest.approx(np.mean(hits))
        assert got.exact == all(hits)
        assert got.rank == 1 + sum(totals[1:] > totals[0])
        assert got.choice == float(all(totals[1:] < totals[0]))
    assert got.exact  # sharpened: every answer token is the argmax


def test_runner_logits_match_transformers(hf_model, builder):
    from megatron_dots.analysis.model_source import Layout, load_model
    from megatron_dots.eval_long.model_runner import MegatronTailLogits

    model, path = hf_model
    loaded = load_model(None, path, Layout(), "fp32", "sequential")
    rows = scoring.cell_rows(builder.trials("passkey", 160, 0.5, 2))
    ours = MegatronTailLogits(loaded, micro_batch_size=3)(rows, 7)
    with torch.no_grad():
        reference = model(input_ids=rows).logits[:, -7:].float()
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() < 1e-4


def _run(*args):
    return eval_long([str(a) for a in args] + ["--no-progress"])


COMMON = ["--lengths", "160,256", "--depths", "0,1", "--trials", "2", "--keys", "3",
          "--seed", "3"]


def _table(out):
    with open(os.path.join(out, "eval_long.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_hf_and_ckpt_give_the_same_table(tmp_path, hf_model, capsys):
    from megatron_dots.convert.hf_to_mcore import convert_hf_to_mcore

    _, path = hf_model
    convert_hf_to_mcore(path, str(tmp_path / "mcore"), progress=False)
    assert _run("--hf", path, *COMMON, "--out", tmp_path / "hf") == 0
    # the tokenizer comes from the checkpoint's hf_assets/ (what the conversion keeps)
    assert _run("--ckpt", tmp_path / "mcore", *COMMON, "--micro-batch-size", 3,
                "--out", tmp_path / "ckpt") == 0
    rows = _table(tmp_path / "hf")
    assert list(rows[0]) == ["task", "length", "depth", "trials", *scoring.METRICS]
    assert [(r["task"], r["length"], r["depth"]) for r in rows] == [
        (t, length, d) for t in TASKS for length in ("160", "256") for d in ("0", "1")]
    assert rows == _table(tmp_path / "ckpt")
    assert len({r["answer_logprob"] for r in rows}) > 1  # not a constant table
    summary = json.loads((tmp_path / "hf" / "eval_long.json").read_text())
    assert summary["settings"]["lengths"] == [160, 256]
    assert summary["chance"] == {"choice_accuracy": 0.25, "mean_rank": 2.5}
    assert [len(c["per_trial"]) for c in summary["cells"]] == [2] * 8
    png = (tmp_path / "hf" / "eval_long.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not [n for n in os.listdir(tmp_path / "hf") if n.startswith(".") or ".tmp" in n]
    capsys.readouterr()
    assert _run("--ckpt", tmp_path / "mcore", "--lengths", "300", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "max_position_embeddings 256" in err and "common.pt" in err


def test_bad_inputs_exit_2_with_a_message(tmp_path, hf_model, capsys):
    _, path = hf_model
    assert _run("--hf", path, "--lengths", "160,300", "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "--lengths 300" in err and "max_position_embeddings 256" in err
    assert os.path.join(path, "config.json") in err
    assert _run("--hf", path, "--lengths", "40", "--out", tmp_path) == 2
    assert "too short" in capsys.readouterr().err
    for bad in (["--tasks", "passkey,haystack"], ["--depths", "0,1.5"], ["--depths", "x"],
                ["--lengths", "0"], ["--trials", "0"], ["--keys", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            _run("--hf", path, "--lengths", "160", *bad, "--out", tmp_path)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert bad[0] in message, message
    assert _run("--hf", tmp_path / "missing", "--lengths", "160", "--out", tmp_path) == 2
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(path):
        if not name.startswith("tokenizer") and name != "special_tokens_map.json":
            shutil.copy(os.path.join(path, name), bare)
    capsys.readouterr()
    assert _run("--hf", bare, "--lengths", "160", "--out", tmp_path) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "eval_long.csv")


SMALL = ["--lengths", "192", "--depths", "0,1", "--trials", "2", "--keys", "3",
         "--tasks", "multikey", "--seed", "5"]


@pytest.mark.parametrize("layout", [
    pytest.param(["--tp", "2"], id="tp2"),  # the output-layer hook gathers the sequence
    pytest.param(["--ep", "2"], id="ep2", marks=pytest.mark.heavy),
    pytest.param(["--pp", "2"], id="pp2", marks=pytest.mark.heavy),
])
def test_torchrun_layouts_give_the_single_process_table(tmp_path, hf_model, layout):
    _, path = hf_model
    assert _run("--hf", path, *SMALL, "--out", tmp_path / "single") == 0
    proc = torchrun("parallel/analysis_worker.py", 2, "eval-long", "--hf", path, *SMALL,
                    *layout, "--micro-batch-size", "3", "--no-progress",
                    "--out", str(tmp_path / "parallel"), timeout=300)
    assert proc.returncode == 0, describe(proc)
    ours, reference = _table(tmp_path / "parallel"), _table(tmp_path / "single")
    assert [r["accuracy"] for r in ours] == [r["accuracy"] for r in reference]
    for mine, theirs in zip(ours, reference):
        for metric in scoring.METRICS:
            assert float(mine[metric]) == pytest.approx(float(theirs[metric]), abs=1e-4)


def test_one_candidate_scores_no_rank_and_writes_null(tmp_path, tokenizer_dir):
    from megatron_dots.eval_long.report import write_outputs

    single = HaystackBuilder(load_tokenizer(tokenizer_dir),
                             HaystackSettings(**{**SETTINGS.__dict__, "candidates": 1}))
    cells = [scoring.score_cell(single.trials(task, 160, depth, 2), _copying_model)
             for task in TASKS for depth in (0.0, 1.0)]
    for cell in cells:
        assert cell.accuracy == 1.0 and np.isnan(cell.choice_accuracy)
        assert np.isnan(cell.mean_rank)
    write_outputs(str(tmp_path), cells, {"model": "oracle"}, scoring.chance(1))
    summary = json.loads((tmp_path / "eval_long.json").read_text())
    assert summary["chance"] == {"choice_accuracy": None, "mean_rank": None}
    assert {c["choice_accuracy"] for c in summary["cells"]} == {None}
    assert {r["choice_accuracy"] for r in _table(tmp_path)} == {"nan"}
    assert (tmp_path / "eval_long.png").read_bytes().startswith(b"\x89PNG")
