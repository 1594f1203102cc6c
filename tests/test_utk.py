"""`megatron-dots utk`: the UtK invariants on random corpora (decoded back with an independent
parser), exact lengths, determinism across seeds and --workers, alignment with pretrain's GPT
datasets, the tokenizer's markers, every bad input, and atomic output."""

import argparse
import json
import os

import numpy
import pytest

from utk_data import (consecutive_markers, decode, marker_dict, random_documents, read_documents,
                      write_documents)

from megatron_dots.utk.cli import main
from megatron_dots.utk.knotting import KnotConfig, build_samples, chunk_lengths
from megatron_dots.utk.markers import marker_ids_from_base, marker_names

VOCAB, EOD = 500, 499
BASE = 1000  # --marker-base: above every data id


def _flags(src, out, seq=256, **extra):
    flags = ["--input-prefix", src, "--output-prefix", out, "--seq-length", str(seq),
             "--chunk-min", "8", "--chunk-max", "64", "--docs-per-knot", "4", "--no-progress"]
    if "tokenizer" not in extra:
        flags += ["--marker-base", str(BASE)]
    for key, value in extra.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = random_documents(7, 120, VOCAB, EOD, 1, 600)
    return write_documents(str(tmp_path_factory.mktemp("src") / "src"), docs), docs


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    src, _ = corpus
    out = str(tmp_path_factory.mktemp("utk") / "utk")
    assert main(_flags(src, out, group_samples=8, seed=3)) == 0
    return out


# ---- the invariants, on the pure builder ----------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_decoded_samples_are_the_source_stream(seed):
    rng = numpy.random.default_rng(100 + seed)
    config = KnotConfig(seq_length=int(rng.integers(80, 400)),
                        knot_fraction=float(rng.choice([0.0, 0.5, 1.0])),
                        docs_per_knot=int(rng.integers(1, 6)),
                        min_chunks=1, max_chunks=int(rng.integers(1, 5)),
                        chunk_min=int(rng.integers(1, 10)), chunk_max=int(rng.integers(20, 70)))
    markers = marker_ids_from_base(BASE, config.docs_per_knot, config.chunk_markers)
    docs = random_documents(seed, int(rng.integers(1, 60)), VOCAB, EOD, 1, 500)
    samples, stats = build_samples(docs, config, markers, numpy.random.default_rng(seed))

    assert samples.shape[1] == config.seq_length  # exact lengths
    decoded = decode(samples, marker_dict(markers))
    # every source token exactly once, chunks of a document in their traced (= original) order
    assert decoded.stream == numpy.concatenate(docs).tolist()
    # markers and padding are the only additions, and counted as such
    assert samples.size == len(decoded.stream) + decoded.markers + decoded.pads
    assert (stats.source_tokens, stats.marker_tokens, stats.pad_tokens) == \
        (len(decoded.stream), decoded.markers, decoded.pads)
    assert decoded.knotted + decoded.plain == len(samples) == stats.samples
    assert max(decoded.docs_per_knot, default=0) <= config.docs_per_knot
    for knot in decoded.knots:  # chunk lengths within the bounds; a lone chunk may be shorter
        for chunks in knot:
            assert all(c <= config.chunk_max for c in chunks)
            if len(chunks) > 1:
                assert all(c >= config.chunk_min for c in chunks)
    if config.knot_fraction == 0.0:  # plain: the stream cut every seq_length tokens
        assert decoded.knotted == 0
    if config.knot_fraction == 1.0:
        assert decoded.plain == 0


def test_short_documents_stay_one_chunk_and_long_ones_are_cut():
    config = KnotConfig(seq_length=200, knot_fraction=1.0, docs_per_knot=3, min_chunks=2,
                        max_chunks=2, chunk_min=10, chunk_max=40)
    markers = marker_ids_from_base(BASE, 3, config.chunk_markers)
    docs = [numpy.arange(5) + 1, numpy.arange(30) + 10, numpy.arange(900) % 400]
    samples, stats = build_samples(docs, config, markers, numpy.random.default_rng(0))
    decoded = decode(samples, marker_dict(markers))
    assert decoded.stream == numpy.concatenate(docs).tolist()
    first = decoded.knots[0]
    assert first[0] == [5]                   # shorter than --chunk-min: one chunk
    assert len(first[1]) == 2 and sum(first[1]) == 30 and min(first[1]) >= 10
    assert stats.short_pieces >= 1
    assert stats.cut_documents >= 900 // 200  # the long document continues over samples
    assert len(samples) >= 935 // 200


@pytest.mark.parametrize("length,count", [(100, 2), (128, 2), (129, 3), (300, 5), (64, 4)])
def test_chunk_lengths_stay_within_bounds(length, count):
    config = KnotConfig(seq_length=200, chunk_min=16, chunk_max=64)
    for seed in range(20):
        lengths = chunk_lengths(length, count, config, numpy.random.default_rng(seed))
        assert lengths.sum() == length and len(lengths) == count
        assert lengths.min() >= 16 and lengths.max() <= 64


# ---- the command: output, determinism, training alignment -----------------------------------

def test_cli_output_decodes_to_the_source(corpus, built, capsys):
    _, docs = corpus
    out_docs = read_documents(built)
    assert {len(d) for d in out_docs} == {256}
    config = KnotConfig(256, docs_per_knot=4, chunk_min=8, chunk_max=64)
    decoded = decode(out_docs, consecutive_markers(BASE, 4, config.chunk_markers))
    assert decoded.stream == numpy.concatenate(docs).tolist()
    assert 0.6 < decoded.knotted / len(out_docs) < 0.95  # --knot-fraction 0.8
    groups_padding = decoded.pads
    assert groups_padding < 256 * (1 + len(out_docs) // 8)  # at most one pad run per group


def test_summary_counts(corpus, tmp_path, capsys):
    src, docs = corpus
    assert main(_flags(src, str(tmp_path / "o"), knot_fraction=1.0)) == 0
    line = capsys.readouterr().out
    total = sum(len(d) for d in docs)
    assert f"{total:,} source tokens" in line and "100.0% knotted" in line
    assert f"from {len(docs):,} documents" in line


def test_same_seed_same_bytes_any_workers(corpus, built, tmp_path):
    src, _ = corpus
    other = str(tmp_path / "w3")
    assert main(_flags(src, other, group_samples=8, seed=3, workers=3)) == 0
    for ext in (".bin", ".idx"):
        assert open(built + ext, "rb").read() == open(other + ext, "rb").read()
    reseeded = str(tmp_path / "s4")
    assert main(_flags(src, reseeded, group_samples=8, seed=4)) == 0
    assert open(built + ".bin", "rb").read() != open(reseeded + ".bin", "rb").read()


def test_each_training_sequence_is_one_utk_sample(built, tmp_path):
    """pretrain's GPT dataset over the output (as build_datasets makes it): the first L tokens
    of every training sequence are exactly one UtK sample, its +1 label the next one's start."""
    import torch

    from megatron_dots.training.data import DatasetTokenizer, build_datasets, micro_batches

    out_docs = read_documents(built)
    by_bytes = {d.astype(numpy.int64).tobytes(): i for i, d in enumerate(out_docs)}
    starts = {int(d[0]) for d in out_docs}
    args = argparse.Namespace(seed=5, seq_length=256, split="1,0,0", mock_data=False,
                              data_path=[built], data_cache_path=str(tmp_path / "cache"))
    tokenizer = DatasetTokenizer("NullTokenizer", EOD, 2000)
    train, _ = build_datasets(args, tokenizer, train_samples=3 * len(out_docs), valid_samples=0)
    seen = set()
    for i in range(len(train)):
        sample = train[i]
        tokens = sample["tokens"].numpy().astype(numpy.int64)
        assert tokens.tobytes() in by_bytes, f"training sequence {i} is not one UtK sample"
        seen.add(by_bytes[tokens.tobytes()])
        assert int(sample["labels"][-1]) in starts
        assert bool((sample["loss_mask"] == 1).all())  # no loss mask: markers carry loss too
    assert len(seen) == len(out_docs)
    batches = micro_batches(train, 0, 8, 2, 0, 1, torch.device("cpu"), vocab_size=2000)
    rows = [row for batch in batches for row in batch["tokens"].numpy().astype(numpy.int64)]
    assert len(rows) == 8 and all(row.tobytes() in by_bytes for row in rows)


def test_marker_ids_above_uint16_widen_the_output(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = random_documents(3, 40, VOCAB, EOD, 1, 300)
    src = write_documents(str(tmp_path / "src"), docs, dtype=numpy.uint16)
    out = str(tmp_path / "o")
    flags = _flags(src, out)
    flags[flags.index("--marker-base") + 1] = "70000"
    assert main(flags) == 0
    assert "output dtype int32" in capsys.readouterr().out
    assert IndexedDataset(out).index.dtype == numpy.int32
    config = KnotConfig(256, docs_per_knot=4, chunk_min=8, chunk_max=64)
    decoded = decode(read_documents(out), consecutive_markers(70000, 4, config.chunk_markers))
    assert decoded.stream == numpy.concatenate(docs).tolist()


# ---- tokenizer markers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A tiny BPE with the UtK markers, and a preprocess dataset of prose made with it."""
    from megatron_dots.data import preprocess, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tok")
    rng = numpy.random.default_rng(0)
    words = ["knot", "chunk", "router", "expert", "long", "context", "the", "a", "of", "data"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 120)))) for _ in range(80)]
    with_markers = train_bpe_tokenizer(texts, str(root / "with"), 400,
                                       special_tokens=marker_names(4, 8))
    without = train_bpe_tokenizer(texts, str(root / "without"), 400)
    with open(root / "docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    prefix = preprocess([str(root / "docs.jsonl")], with_markers, str(root / "corpus"),
                        progress=False)["text"]
    return with_markers, without, prefix


def test_tokenizer_markers_resolve_and_round_trip(tokenized, tmp_path):
    from megatron_dots.data import load_tokenizer
    from megatron_dots.utk.markers import marker_ids_from_tokenizer

    with_markers, _, prefix = tokenized
    out = str(tmp_path / "utk")
    assert main(_flags(prefix, out, seq=128, tokenizer=with_markers)) == 0
    tokenizer = load_tokenizer(with_markers)
    chunk_markers = KnotConfig(128, chunk_max=64).chunk_markers
    markers = marker_ids_from_tokenizer(tokenizer, 4, chunk_markers)
    assert [tokenizer.decode([m]) for m in markers.all_ids()] == marker_names(4, chunk_markers)
    decoded = decode(read_documents(out), marker_dict(markers))
    assert decoded.stream == numpy.concatenate(read_documents(prefix)).tolist()


def test_tokenizer_without_markers_is_refused_with_the_fix(tokenized, tmp_path, capsys):
    _, without, prefix = tokenized
    out = str(tmp_path / "utk")
    assert main(_flags(prefix, out, seq=128, tokenizer=without)) == 2
    err = capsys.readouterr().err
    assert without in err and "<|utk_knot|>" in err and "<|utk_doc_3|>" in err
    assert "add_special_tokens" in err and "152064" in err
    assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".idx")


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,flag", [
    ({"seq_length": "60"}, "--seq-length"),            # below the longest chunk + markers
    ({"chunk_max": "12"}, "--chunk-max"),              # < 2 x --chunk-min
    ({"knot_fraction": "1.5"}, "--knot-fraction"),
    ({"workers": "0"}, "--workers"),
    ({"docs_per_knot": "0"}, "--docs-per-knot"),
    ({"max_chunks": "1", "min_chunks": "2"}, "--max-chunks"),
    ({"marker_base": "-1"}, "--marker-base"),
])
def test_bad_flags_exit_2_naming_the_flag(corpus, tmp_path, capsys, extra, flag):
    src, _ = corpus
    flags = _flags(src, str(tmp_path / "o"))
    for key, value in extra.items():
        name = f"--{key.replace('_', '-')}"
        if name in flags:
            flags[flags.index(name) + 1] = value
        else:
            flags += [name, value]
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_markers_need_a_tokenizer_or_a_base(corpus, tmp_path, capsys):
    src, _ = corpus
    flags = _flags(src, str(tmp_path / "o"))
    at = flags.index("--marker-base")
    with pytest.raises(SystemExit) as exit_info:
        main(flags[:at] + flags[at + 2:])
    assert exit_info.value.code == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_missing_input_and_output_directory(corpus, tmp_path, capsys):
    src, _ = corpus
    assert main(_flags(str(tmp_path / "nope"), str(tmp_path / "o"))) == 2
    assert "--input-prefix" in capsys.readouterr().err
    assert main(_flags(src, str(tmp_path / "missing" / "o"))) == 2
    assert "--output-prefix" in capsys.readouterr().err


def test_all_documents_shorter_than_a_chunk(tmp_path, capsys):
    src = write_documents(str(tmp_path / "tiny"), random_documents(0, 30, VOCAB, EOD, 1, 7))
    assert main(_flags(src, str(tmp_path / "o"))) == 1
    assert "--chunk-min" in capsys.readouterr().err


def test_marker_ids_in_the_source_fail_and_leave_the_old_output(corpus, tmp_path, capsys):
    src, docs = corpus
    out = str(tmp_path / "o")
    assert main(_flags(src, out)) == 0
    before = {ext: open(out + ext, "rb").read() for ext in (".bin", ".idx")}
    bad_docs = [d.copy() for d in docs]
    bad_docs[-3][2] = BASE + 5  # a document marker id inside the data
    bad = write_documents(str(tmp_path / "bad"), bad_docs, dtype=numpy.int32)
    capsys.readouterr()
    assert main(_flags(bad, out, group_samples=2, workers=2)) == 1
    err = capsys.readouterr().err
    assert f"document {len(docs) - 3}" in err and "marker" in err
    assert {ext: open(out + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.bin", "bad.idx", "o.bin", "o.idx"]
