"""Data preparation: tokenizers (HF BPE trained here, sentencepiece) and JSONL -> indexed dataset.

The reference for every written sequence is the tokenizer library called directly
(transformers.AutoTokenizer / sentencepiece), read back with Megatron-Core's IndexedDataset.
"""

import gzip
import json
import os
import pickle
import random

import numpy
import pytest

from megatron_dots.data import (PreprocessError, TokenizerError, load_tokenizer, preprocess,
                                train_bpe_tokenizer)
from megatron_dots.data.preprocess import main

WORDS = ("the", "a", "router", "expert", "token", "layer", "gate", "picks", "sends", "shared",
         "model", "learns", "quickly", "slowly", "every", "batch", "of", "text", "to", "one")
UNICODE = "Grüße, naïve café — 東京 ✓ Ωmega"
TEXTS = ["", "   ", "\n", UNICODE, "line one\nline two\ttab"]  # plus sentences, see _documents


def _sentences(count, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
            for _ in range(count)]


def _documents():
    """400 documents: sentences with an empty, whitespace-only, unicode and multi-line one."""
    docs = _sentences(395, seed=1)
    for i, text in enumerate(TEXTS):
        docs.insert(7 + 61 * i, text)
    return docs


def _write_jsonl(path, rows, blank_lines=False):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
            if blank_lines:
                f.write("\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_bpe_tokenizer(_sentences(300) + [UNICODE], str(out), vocab_size=400)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "sp"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(300) + [UNICODE]), model_prefix=str(prefix),
        vocab_size=100, model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The documents split over a .jsonl (with blank lines) and a .jsonl.gz file."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents()
    rows = [{"text": t, "id": i} for i, t in enumerate(docs)]
    files = [_write_jsonl(root / "a.jsonl", rows[:250], blank_lines=True),
             _write_jsonl(root / "b.jsonl.gz", rows[250:])]
    return files, docs


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def _outputs(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".idx")))


# ---- tokenizers --------------------------------------------------------------------------------

def test_trained_bpe_loads_in_transformers_and_agrees(hf_dir):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    tok = load_tokenizer(hf_dir)
    assert (tok.kind, tok.eod, auto.eos_token_id, auto.pad_token_id) == ("hf", 0, 0, 0)
    assert auto.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tok.vocab_size == len(auto) and 300 < len(auto) <= 400  # merges of a small corpus
    for text in [UNICODE, "  two  spaces , and  punctuation .\n", "model learns"] + _sentences(5):
        ids = auto.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids and 0 not in ids
        assert auto.decode(ids) == text and tok.decode(ids) == text
    assert len(tok.encode("the router picks the expert")) < len("the router picks the expert")


def test_bpe_training_is_deterministic_and_refuses_to_clobber(hf_dir, tmp_path):
    again = train_bpe_tokenizer(iter(_sentences(300) + [UNICODE]), str(tmp_path / "again"), 400)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(hf_dir, name), "rb") as a, open(os.path.join(again, name),
                                                               "rb") as b:
            assert a.read() == b.read(), name
    config = json.load(open(os.path.join(again, "tokenizer_config.json")))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    with pytest.raises(FileExistsError):
        train_bpe_tokenizer(_sentences(10), again, 300)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe_tokenizer(_sentences(10), str(tmp_path / "small"), 100)
    with pytest.raises(TokenizerError, match="no text"):
        train_bpe_tokenizer([], str(tmp_path / "none"), 300)
    assert not os.path.exists(tmp_path / "small") and not os.path.exists(tmp_path / "none")


def test_tokenizer_pickles_and_sentencepiece_loads(hf_dir, sp_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    for path in (hf_dir, sp_model):
        tok = load_tokenizer(path)
        copy = pickle.loads(pickle.dumps(tok))
        assert (copy.path, copy.kind, copy.eod, copy.vocab_size) == (tok.path, tok.kind, tok.eod,
                                                                     tok.vocab_size)
        assert copy.encode(UNICODE) == tok.encode(UNICODE)
    tok = load_tokenizer(sp_model)
    assert (tok.kind, tok.vocab_size, tok.eod) == ("sentencepiece", 100, sp.eos_id())
    assert tok.encode(UNICODE) == sp.encode(UNICODE)


def test_tokenizer_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="nowhere.*no such tokenizer"):
        load_tokenizer(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=f"{empty}: not a loadable Hugging Face"):
        load_tokenizer(str(empty))
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(TokenizerError, match=f"{junk}: not a sentencepiece model"):
        load_tokenizer(str(junk))
    err = pickle.loads(pickle.dumps(TokenizerError("p", "msg")))
    assert str(err) == "p: msg" and err.path == "p"


def test_tokenizer_without_eos(tmp_path, corpus):
    import sentencepiece

    prefix = tmp_path / "noeos"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(300) + [UNICODE]), model_prefix=str(prefix),
        vocab_size=100, model_type="bpe", eos_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    model = f"{prefix}.model"
    with pytest.raises(TokenizerError, match="noeos.model: .*no eos"):
        load_tokenizer(model).eod
    with pytest.raises(TokenizerError, match="no eos"):
        preprocess(corpus[0], model, str(tmp_path / "x"), progress=False)
    assert _outputs(tmp_path) == []
    # without end-of-document tokens the sequences are the bare encodings
    result = preprocess(corpus[0], model, str(tmp_path / "x"), append_eod=False, progress=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    _, seqs = _read(result["text"])
    assert seqs == [ids for ids in (sp.encode(t) for t in corpus[1]) if ids]


# ---- preprocess --------------------------------------------------------------------------------

def test_preprocess_matches_tokenizer_for_any_worker_count(hf_dir, corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    files, docs = corpus
    one = preprocess(files, hf_dir, str(tmp_path / "w1"), workers=1, progress=False)
    two = preprocess(files, hf_dir, str(tmp_path / "w2"), workers=2, progress=False)
    assert one == {"text": str(tmp_path / "w1_text_document")}
    for ext in (".bin", ".idx"):
        with open(one["text"] + ext, "rb") as a, open(two["text"] + ext, "rb") as b:
            assert a.read() == b.read(), ext
    auto = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    expected = [auto.encode(t, add_special_tokens=False) + [auto.eos_token_id] for t in docs
                if t]
    ds, seqs = _read(one["text"])
    assert seqs == expected
    assert ds.index.dtype == numpy.uint16
    assert ds.document_indices.tolist() == list(range(len(expected) + 1))  # one sequence a doc
    stats = one.stats["text"]
    assert (stats.documents, stats.skipped) == (len(docs) - 1, 1)  # "" only: BPE keeps spaces
    assert stats.tokens == sum(map(len, expected))
    out = capsys.readouterr()
    assert f"{len(docs) - 1:,} documents" in out.out and "1 empty" in out.out
    assert "preprocess:" not in out.err  # progress=False: no bar
    assert _outputs(tmp_path) == ["w1_text_document.bin", "w1_text_document.idx",
                                  "w2_text_document.bin", "w2_text_document.idx"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_preprocess_sentencepiece_and_several_keys(sp_model, tmp_path):
    import sentencepiece

    docs = _documents()[:200]
    titles = [f"title {i}" if i % 5 else "" for i in range(len(docs))]
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": t, "title": ti, "n": 1}
                                                 for t, ti in zip(docs, titles)])
    result = preprocess([path], sp_model, str(tmp_path / "sp"), json_keys=["text", "title"],
                        workers=2, progress=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    for key, texts in (("text", docs), ("title", titles)):
        assert result[key] == str(tmp_path / f"sp_{key}_document")
        expected = [ids + [sp.eos_id()] for ids in (sp.encode(t) for t in texts) if ids]
        ds, seqs = _read(result[key])
        assert seqs == expected and ds.index.dtype == numpy.uint16
        assert result.stats[key].skipped == len(texts) - len(expected)
    assert result.stats["text"].skipped == 3  # "", "   " and "\n" have no sentencepiece tokens
    assert result.stats["title"].skipped == 40


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "expected a JSON object, got an array"),
    ('{"body": "no text key"}', "missing json key 'text'"),
    ('{"text": 42}', "json key 'text' must be a string, got a number"),
    ('{"text": null}', "json key 'text' must be a string, got null"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_and_line(hf_dir, tmp_path, line, message, workers):
    good = [{"text": s} for s in _sentences(150)]
    path = _write_jsonl(tmp_path / "bad.jsonl", good[:140] + [line] + good[140:])
    with pytest.raises(PreprocessError) as err:
        preprocess([path], hf_dir, str(tmp_path / "out"), workers=workers, progress=False)
    assert f"{path}:141: {message}" in str(err.value)
    assert _outputs(tmp_path) == []  # neither final nor hidden partial files


def test_failed_run_keeps_the_previous_dataset(hf_dir, tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": s} for s in _sentences(50)])
    prefix = preprocess([good], hf_dir, str(tmp_path / "out"), progress=False)["text"]
    before = {n: open(tmp_path / n, "rb").read() for n in _outputs(tmp_path)}
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": s} for s in _sentences(300)] + ["{"])
    with pytest.raises(PreprocessError, match=f"{bad}:301"):
        preprocess([bad], hf_dir, str(tmp_path / "out"), workers=2, progress=False)
    assert {n: open(tmp_path / n, "rb").read() for n in _outputs(tmp_path)} == before
    assert len(_read(prefix)[1]) == 50


def test_input_output_and_empty_errors(hf_dir, tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}])
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(PreprocessError, match=f"{missing}: input file not found"):
        preprocess([good, missing], hf_dir, str(tmp_path / "out"), progress=False)
    with pytest.raises(PreprocessError, match="no_dir.*does not exist"):
        preprocess([good], hf_dir, str(tmp_path / "no_dir" / "out"), progress=False)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(PreprocessError, match=f"{empty}: no documents .* 'text' \\(2 empty\\)"):
        preprocess([empty], hf_dir, str(tmp_path / "out"), progress=False)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(PreprocessError, match=f"{broken}: cannot read"):
        preprocess([good, str(broken)], hf_dir, str(tmp_path / "out"), workers=2, progress=False)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PreprocessError, match=f"{latin}:2: not valid JSON .*utf-8"):
        preprocess([str(latin)], hf_dir, str(tmp_path / "out"), progress=False)
    with pytest.raises(PreprocessError, match="workers"):
        preprocess([good], hf_dir, str(tmp_path / "out"), workers=0, progress=False)
    assert _outputs(tmp_path) == []


def test_main_success_and_errors(hf_dir, tmp_path, capsys):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": s} for s in _sentences(20)])
    assert main(["--input", good, "--tokenizer-model", hf_dir, "--output-prefix",
                 str(tmp_path / "cli"), "--no-progress", "--no-append-eod"]) == 0
    out = capsys.readouterr()
    assert "20 documents" in out.out and out.err == ""
    _, seqs = _read(str(tmp_path / "cli_text_document"))
    assert 0 not in [i for s in seqs for i in s] and len(seqs) == 20  # --no-append-eod

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "x"}])
    assert main(["--input", bad, "--tokenizer", hf_dir, "--output-prefix",
                 str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}:2: missing json key 'text'" in err
    assert main(["--input", good, "--tokenizer", str(tmp_path / "none"), "--output-prefix",
                 str(tmp_path / "bad")]) == 2
    assert "error: " in capsys.readouterr().err
    assert _outputs(tmp_path) == ["cli_text_document.bin", "cli_text_document.idx"]
    with pytest.raises(SystemExit) as exit_:
        main(["--input", good, "--tokenizer", hf_dir])  # no --output-prefix
    assert exit_.value.code == 2
