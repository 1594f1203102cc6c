"""`megatron-dots analyze experts | ablate-shared` against independent references: a model with
planted routing, transformers' Dots1ForCausalLM with zeroed shared / routed experts, and the
single-process run for TP / EP / PP layouts under torchrun."""

import copy
import csv
import json
import os

import numpy as np
import pytest

from analysis_models import (
    hf_windows_loss,
    plant_routing,
    write_token_range_dataset,
    zero_routed_experts,
    zero_shared_experts,
)
from launch import describe, torchrun
from reference import make_hf_model, tiny_config

from megatron_dots.analysis import ablation, expert_share
from megatron_dots.analysis.cli import main as analyze
from megatron_dots.analysis.domains import DomainSource, cut_windows, domain_windows
from megatron_dots.data.tokenizer import load_tokenizer, train_bpe_tokenizer

SEQ = 32
TOKENS = 1200


def _read_shares(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["domain"], int(r["layer"]), int(r["expert"])): (float(r["share"]), int(r["count"]))
            for r in rows}, list(rows[0].keys())


def _run(*args):
    return analyze([str(a) for a in args] + ["--no-progress", "--bootstrap", "200"])


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two domains as indexed datasets: token ids in the lower / upper half of the vocab."""
    root = tmp_path_factory.mktemp("domains")
    half = tiny_config().vocab_size // 2
    return {"A": write_token_range_dataset(str(root / "a"), 1, half, seed=1),
            "B": write_token_range_dataset(str(root / "b"), half, 2 * half, seed=2)}


def _data_args(domains):
    out = []
    for name, prefix in domains.items():
        out += ["--data", f"{name}={prefix}"]
    return out


@pytest.fixture(scope="module")
def random_hf(tmp_path_factory):
    """A random tiny HF dots model (non-zero expert bias) and its directory."""
    cfg = tiny_config()
    model = make_hf_model(cfg, seed=3, bias_scale=0.3)
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    return model, cfg, str(path)


def test_planted_routing_is_recovered(tmp_path, domains):
    cfg = tiny_config()
    model = make_hf_model(cfg, seed=0)
    plant_routing(model, cfg)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    assert _run("experts", "--hf", tmp_path / "hf", *_data_args(domains), "--tokens", TOKENS,
                "--seq-length", SEQ, "--micro-batch-size", 8, "--out", out) == 0
    shares, columns = _read_shares(out / "expert_share.csv")
    assert columns == ["domain", "layer", "expert", "share", "count"]
    summary = json.loads((out / "summary.json").read_text())
    moe_layers = list(range(cfg.first_k_dense + 1, cfg.num_layers + 1))
    assert [entry["layer"] for entry in summary["layers"]] == moe_layers
    planted = {"A": {0, 1}, "B": {2, 3}}
    for domain, experts in planted.items():
        tokens = summary["tokens"]["domains"][domain]["tokens"]
        assert TOKENS - 20 < tokens <= TOKENS  # one-token windows are dropped
        for layer in moe_layers:
            for e in range(cfg.num_moe_experts):
                share, count = shares[(domain, layer, e)]
                # every token picks exactly the two planted experts (top-2)
                assert (share, count) == ((0.5, tokens) if e in experts else (0.0, 0))
    # the report's thresholds for 128 experts, scaled to 8: dead < 8 %, hot > 80 % on average
    assert (summary["thresholds"]["dead_share"], summary["thresholds"]["hot_share"]) == \
        pytest.approx((0.08, 0.8))
    for entry in summary["layers"]:
        assert entry["dead_experts"] == [4, 5, 6, 7]
        assert entry["hot_experts"] == []  # the planted experts average 25 %
        for domain, experts in planted.items():
            info = entry["domains"][domain]
            assert info["max_expert"] in experts and info["max_share"] == 0.5
            top = info["top_specialists"][:2]
            assert {t["expert"] for t in top} == experts
            assert all(t["ratio"] == 2.0 and t["low"] == 2.0 for t in top)
    assert (out / "expert_share.png").stat().st_size > 0
    assert (out / "specialization.png").stat().st_size > 0


def test_ablation_matches_transformers(tmp_path, domains, random_hf):
    model, cfg, path = random_hf
    out = tmp_path / "out"
    assert _run("ablate-shared", "--hf", path, *_data_args(domains), "--tokens", TOKENS,
                "--seq-length", SEQ, "--micro-batch-size", 8, "--out", out) == 0
    summary = json.loads((out / "ablation.json").read_text())
    no_shared, shared_only = copy.deepcopy(model), copy.deepcopy(model)
    zero_shared_experts(no_shared)
    zero_routed_experts(shared_only)
    references = {"full": model, "no-shared": no_shared, "shared-only": shared_only}
    for name, prefix in domains.items():
        windows = domain_windows(DomainSource(name, prefix), TOKENS, SEQ, cfg.vocab_size).windows
        for variant, reference in references.items():
            ours = summary["domains"][name][variant]["loss"]
            assert abs(ours - hf_windows_loss(reference, windows)) < 1e-4, (name, variant)
        assert summary["domains"][name]["tokens"] == sum(len(w) - 1 for w in windows)
    with open(out / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["domain"], r["variant"]) for r in rows] == [
        (d, v) for d in domains for v in ("full", "no-shared", "shared-only")]
    assert summary["verdict"]["kind"] in ("uniform", "domain-specific", "no measurable rise")
    assert (out / "ablation.png").stat().st_size > 0


def test_zero_shared_experts_make_full_equal_no_shared(tmp_path, domains):
    cfg = tiny_config()
    model = make_hf_model(cfg, seed=4, bias_scale=0.3)
    zero_shared_experts(model)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    assert _run("ablate-shared", "--hf", tmp_path / "hf", *_data_args(domains), "--tokens", 300,
                "--seq-length", SEQ, "--out", out) == 0
    summary = json.loads((out / "ablation.json").read_text())
    for entry in summary["domains"].values():
        assert entry["no-shared"]["loss"] == entry["full"]["loss"]
        assert entry["shared-only"]["loss"] != entry["full"]["loss"]
    assert summary["verdict"]["kind"] == "no measurable rise"


def test_megatron_checkpoint_gives_the_counts_of_its_hf_source(tmp_path, domains, random_hf):
    from megatron_dots.convert.hf_to_mcore import convert_hf_to_mcore

    _, _, path = random_hf
    convert_hf_to_mcore(path, str(tmp_path / "mcore"), progress=False)
    for source, flag in ((path, "--hf"), (tmp_path / "mcore", "--ckpt")):
        assert _run("experts", flag, source, *_data_args(domains), "--tokens", 400,
                    "--seq-length", SEQ, "--out", tmp_path / flag.strip("-")) == 0
    hf_rows, _ = _read_shares(tmp_path / "hf" / "expert_share.csv")
    ckpt_rows, _ = _read_shares(tmp_path / "ckpt" / "expert_share.csv")
    assert hf_rows == ckpt_rows
    assert len({count for _, count in hf_rows.values()}) > 3  # not a trivial routing


LAYOUTS = [
    pytest.param(2, ["--ep", "2"], id="ep2"),
    pytest.param(2, ["--tp", "2"], id="tp2"),
    pytest.param(2, ["--pp", "2"], id="pp2"),
    pytest.param(4, ["--tp", "2", "--pp", "2"], id="tp2-pp2", marks=pytest.mark.heavy),
    pytest.param(4, ["--tp", "2", "--ep", "2"], id="tp2-ep2", marks=pytest.mark.heavy),
]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, domains, random_hf):
    """Both analyses of the random model in this process (the reference for the layouts)."""
    _, _, path = random_hf
    out = tmp_path_factory.mktemp("single")
    common = ["--hf", path, *_data_args(domains), "--tokens", 600, "--seq-length", SEQ,
              "--micro-batch-size", 3, "--out", out]
    assert _run("experts", *common) == 0
    assert _run("ablate-shared", *common) == 0
    return out


@pytest.mark.parametrize("nproc,layout", LAYOUTS)
def test_layouts_give_the_single_process_numbers(tmp_path, domains, random_hf, single_process,
                                                 nproc, layout):
    _, _, path = random_hf
    common = ["--hf", path, *_data_args(domains), "--tokens", "600", "--seq-length", str(SEQ),
              "--micro-batch-size", "3", "--out", str(tmp_path), "--no-progress",
              "--bootstrap", "200", *layout]
    proc = torchrun("parallel/analysis_worker.py", nproc, "analyze", "experts", *common,
                    "--then", "analyze", "ablate-shared", *common, timeout=300)
    assert proc.returncode == 0, describe(proc)
    ours, _ = _read_shares(tmp_path / "expert_share.csv")
    reference, _ = _read_shares(single_process / "expert_share.csv")
    assert ours == reference
    losses = json.loads((tmp_path / "ablation.json").read_text())["domains"]
    expected = json.loads((single_process / "ablation.json").read_text())["domains"]
    for domain, entry in expected.items():
        for variant in ablation.VARIANTS:
            assert abs(losses[domain][variant]["loss"] - entry[variant]["loss"]) < 1e-5
        assert losses[domain]["tokens"] == entry["tokens"]


# ---------------------------------------------------------------- protocol and statistics


class _Tokenizer:
    path = "fake-tokenizer"

    def encode_document(self, text):
        return [int(t) for t in text.split()]


def test_windows_follow_the_protocol(tmp_path):
    docs = [" ".join(str(i) for i in range(1, 12)), "5", " ".join(["7"] * 9)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    got = domain_windows(DomainSource("d", str(path)), 18, 5, 100, _Tokenizer())
    # doc 1: 11 tokens -> 5, 5, 1 (dropped); doc 2: one token (dropped); doc 3 cut at 18 - 12 = 6
    assert [w.tolist() for w in got.windows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10],
                                                 [7, 7, 7, 7, 7]]
    assert got.documents == 3 and got.tokens_taken == 18 and not got.short
    assert got.tokens == 15 and got.predicted == 12
    assert [len(w) for w in cut_windows(np.arange(7), 3)] == [3, 3]
    assert [len(w) for w in cut_windows(np.arange(8), 3)] == [3, 3, 2]
    assert domain_windows(DomainSource("d", str(path)), 1000, 5, 100, _Tokenizer()).short


def test_specialization_statistics_against_hand_computation():
    counts_a = np.array([[[6, 2, 0, 0]], [[4, 4, 0, 0]]])  # 2 windows, 1 layer, 4 experts
    counts_b = np.array([[[0, 2, 6, 0]], [[0, 4, 4, 0]]])
    result = expert_share.ExpertShares.from_windows(["a", "b"], [2], [counts_a, counts_b])
    np.testing.assert_allclose(result.shares[:, 0], [[10 / 16, 6 / 16, 0, 0],
                                                     [0, 6 / 16, 10 / 16, 0]])
    ratio = expert_share.specialization(result.shares)
    np.testing.assert_allclose(ratio[:, 0, :3], [[2, 1, 0], [0, 1, 2]])
    assert np.isnan(ratio[0, 0, 3])
    summary = expert_share.expert_summary(result, replicates=300)
    layer = summary["layers"][0]
    assert layer["dead_experts"] == [3]
    assert [(h["expert"], h["mean_share"]) for h in layer["hot_experts"]] == [
        (0, 5 / 16), (1, 6 / 16), (2, 5 / 16)]
    assert layer["domains"]["a"]["top_specialists"][0]["expert"] == 0
    low, high = (layer["domains"]["a"]["ratio_low"][0], layer["domains"]["a"]["ratio_high"][0])
    assert low == high == 2.0  # expert 0 never serves b: the ratio is 2 in every replicate
    low1, high1 = layer["domains"]["a"]["ratio_low"][1], layer["domains"]["a"]["ratio_high"][1]
    assert low1 < 1.0 < high1  # expert 1's share moves with the windows drawn


def _losses(domain, full, no_shared, windows=40, seed=0):
    rng = np.random.default_rng(seed)
    predicted = np.full(windows, 10)
    noise = rng.normal(0, 0.05, windows) * 10
    return ablation.DomainLosses(domain, {
        "full": full * predicted + noise, "no-shared": no_shared * predicted + noise,
        "shared-only": (full + 1) * predicted + noise}, predicted)


@pytest.mark.parametrize("rises,kind", [
    ((0.5, 0.6), "uniform"), ((0.5, 0.0), "domain-specific"), ((0.2, 1.5), "domain-specific"),
    ((0.0, 0.0), "no measurable rise")])
def test_ablation_verdict(rises, kind):
    results = [_losses(f"d{i}", 2.0, 2.0 + rise, seed=i) for i, rise in enumerate(rises)]
    summary = ablation.ablation_summary(results, replicates=300)
    assert summary["verdict"]["kind"] == kind
    assert ablation.verdict_lines(summary)[-3].startswith(f"verdict: {kind}")


# ---------------------------------------------------------------- bad input


def _error(capsys, *args):
    rc = _run(*args)
    return rc, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer with the tiny model's vocabulary size."""
    path = str(tmp_path_factory.mktemp("tokenizer") / "bpe")
    return train_bpe_tokenizer(_texts(), path, vocab_size=tiny_config().vocab_size)


def test_bad_inputs_give_one_line_errors(tmp_path, domains, random_hf, tokenizer_dir, capsys):
    _, cfg, path = random_hf
    out = tmp_path / "out"
    base = ["--hf", path, "--seq-length", SEQ, "--out", out]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, line = _error(capsys, "experts", *base, "--data", f"e={empty}", "--tokenizer",
                      tokenizer_dir)
    assert rc == 2 and str(empty) in line and "no window" in line
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\xff\xfe\x00garbage\n")
    rc, line = _error(capsys, "experts", *base, "--data", f"g={garbage}", "--tokenizer",
                      tokenizer_dir)
    assert rc == 2 and str(garbage) in line
    rc, line = _error(capsys, "experts", *base, "--data", f"m={tmp_path / 'missing.jsonl'}")
    assert rc == 2 and "missing.jsonl" in line and "no such file" in line
    wide = write_token_range_dataset(str(tmp_path / "wide"), 0, cfg.vocab_size + 40, seed=5)
    rc, line = _error(capsys, "experts", *base, "--data", f"w={wide}")
    assert rc == 2 and "wide.bin" in line and "vocabulary" in line
    dense = tmp_path / "dense"
    make_hf_model(tiny_config(first_k_dense=4)).save_pretrained(dense)
    rc, line = _error(capsys, "experts", "--hf", dense, "--data", f"A={domains['A']}",
                      "--out", out)
    assert rc == 2 and os.path.join(str(dense), "config.json") in line and "dense" in line
    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text(json.dumps({"text": "hello"}) + "\n")
    rc, line = _error(capsys, "experts", *base, "--data", f"t={jsonl}")
    assert rc == 2 and "--tokenizer" in line  # no tokenizer next to the model
    big = tmp_path / "big-tokenizer"
    train_bpe_tokenizer(_texts(), str(big), vocab_size=cfg.vocab_size + 200)
    rc, line = _error(capsys, "experts", *base, "--data", f"t={jsonl}", "--tokenizer", big)
    assert rc == 2 and str(big) in line and "not this model's tokenizer" in line
    wide_model = tmp_path / "wide-vocab"
    make_hf_model(tiny_config(vocab_size=2 * cfg.vocab_size + 64)).save_pretrained(wide_model)
    rc, line = _error(capsys, "experts", "--hf", wide_model, "--data", f"t={jsonl}",
                      "--tokenizer", tokenizer_dir, "--out", out)
    assert rc == 2 and tokenizer_dir in line and "under half" in line


def _texts():
    from megatron_dots.demo import local_corpus

    return local_corpus(min_bytes=1000)[:300]


def test_jsonl_domains_are_tokenized_document_by_document(tmp_path, random_hf, tokenizer_dir):
    _, cfg, path = random_hf
    texts = _texts()[:40]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert _run("experts", "--hf", path, "--data", f"docs={jsonl}", "--tokenizer",
                tokenizer_dir, "--tokens", 800, "--seq-length", SEQ, "--out", tmp_path) == 0
    tokenizer = load_tokenizer(tokenizer_dir)
    taken, windows = 0, 0
    for text in texts:
        ids = tokenizer.encode_document(text)[: 800 - taken]
        taken += len(ids)
        windows += len(cut_windows(np.array(ids), SEQ))
        if taken == 800:
            break
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"]["domains"]["docs"]["tokens_taken"] == 800
    assert summary["tokens"]["domains"]["docs"]["windows"] == windows


def test_short_domain_warns_and_uses_what_there_is(tmp_path, domains, random_hf, capsys):
    _, _, path = random_hf
    assert _run("experts", "--hf", path, "--data", f"A={domains['A']}", "--tokens", 10 ** 7,
                "--seq-length", SEQ, "--out", tmp_path) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    used = summary["tokens"]["domains"]["A"]["tokens_taken"]
    assert f"has {used:,} tokens, fewer than --tokens 10,000,000: using those" in err
