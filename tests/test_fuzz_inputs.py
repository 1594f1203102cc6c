"""Fuzzing every reader with damaged inputs: truncations, bit flips, header garbage, wrong
dtypes and types, over small Hugging Face checkpoints (ours with a manifest, and as
transformers writes them, without), torch_dist checkpoints, indexed datasets, JSONL files and
tokenizer files, fed to `convert`, `compare`, `verify`, `preprocess` and pretrain's dataset
check in this process.

Each case must end in one of two ways: success (the damage did not touch anything the reader
can see, e.g. changed weight bytes in a checkpoint without a checksum; `verify --full` must
still catch it where a manifest exists), or our error: exit code 2 (1 for `verify`), one
`error:` line naming a file of the damaged input, no traceback, and no output left behind.
Seeded; the counts of each outcome are printed (`pytest -s`).
"""

import gzip
import json
import os
import random
import shutil
import struct
import sys
from collections import Counter

import pytest

from reference import make_hf_model, tiny_config

from megatron_dots.cli import main as cli_main

SEED = 20261130
CASES_PER_FILE = 6  # mutations drawn per (file, kind)


def micro_config():
    """A dots model small enough that one conversion takes tens of milliseconds."""
    return tiny_config(num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=2,
                       kv_channels=16, ffn_hidden_size=64, num_moe_experts=4,
                       moe_ffn_hidden_size=16, moe_router_topk=2, vocab_size=64)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Intact inputs: a foreign HF checkpoint (sharded, no manifest), its torch_dist
    conversion and the HF export of that (both with manifests)."""
    root = tmp_path_factory.mktemp("pristine")
    make_hf_model(micro_config(), seed=3).save_pretrained(root / "hf", max_shard_size="20KB")
    assert cli_main(["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out",
                     str(root / "mcore"), "--no-progress"]) == 0
    assert cli_main(["convert", "mcore-to-hf", "--ckpt", str(root / "mcore"), "--out",
                     str(root / "hf_ours"), "--no-progress"]) == 0
    return root


# ---- mutations -------------------------------------------------------------------------------

def truncate(path, rng):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(0, max(1, size)))
    return "truncated"


def flip_bits(path, rng, limit=None):
    data = bytearray(open(path, "rb").read())
    if not data:
        return "flip (empty)"
    span = min(len(data), limit or len(data))
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(span)] ^= 1 << rng.randrange(8)
    open(path, "wb").write(bytes(data))
    return "bit flips" + (" in the header" if limit else "")


def garbage_head(path, rng, length=8):
    data = bytearray(open(path, "rb").read())
    data[:length] = bytes(rng.randrange(256) for _ in range(min(length, len(data)) or length))
    open(path, "wb").write(bytes(data))
    return "garbage head"


def safetensors_header(path, rng):
    """Rewrite one header entry: a wrong or unknown dtype, a wrong shape or bad offsets."""
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = rng.choice([k for k in header if k != "__metadata__"])
    kind = rng.choice(["dtype", "unknown dtype", "shape", "offsets", "not an object"])
    if kind == "dtype":
        header[name]["dtype"] = rng.choice(["F16", "BF16", "I64", "U8", "F64"])
    elif kind == "unknown dtype":
        header[name]["dtype"] = "Q7"
    elif kind == "shape":
        header[name]["shape"] = [d + rng.randint(1, 3) for d in header[name]["shape"]] or [2]
    elif kind == "offsets":
        header[name]["data_offsets"] = [header[name]["data_offsets"][0] + 1,
                                        header[name]["data_offsets"][1] + 10 ** 12]
    else:
        header[name] = "junk"
    raw = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    return f"header: {kind}"


def benign_header(path, rng):
    """A change the format allows: entries reordered, a tensor renamed, trailing spaces."""
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    items = list(header.items())
    rng.shuffle(items)
    name = rng.choice([k for k, _ in items if k != "__metadata__"])
    header = {(k + ".renamed" if k == name else k): v for k, v in items}
    raw = json.dumps(header).encode() + b" " * rng.randrange(8)
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    return "benign header change"


def json_damage(path, rng):
    """Damage a JSON file: cut it, make it not an object, or give a field a wrong type."""
    text = open(path, encoding="utf-8").read()
    data = json.loads(text)
    kind = rng.choice(["cut", "array", "wrong type", "missing field"])
    if kind == "cut":
        text = text[:rng.randrange(len(text))]
    elif kind == "array":
        text = json.dumps([data])
    else:
        key = rng.choice(sorted(data))
        if kind == "missing field":
            del data[key]
        else:
            data[key] = rng.choice(["x", [1], {"a": 1}, -1, None, True])
        text = json.dumps(data)
    open(path, "w", encoding="utf-8").write(text)
    return f"json: {kind}"


def delete(path, rng):
    os.remove(path)
    return "deleted"


BINARY = [truncate, flip_bits, garbage_head, delete]


# ---- running one case ------------------------------------------------------------------------

class Outcomes:
    """Counts of outcomes and the cases that broke the contract."""

    def __init__(self, name):
        self.name, self.counts, self.failures = name, Counter(), []

    def report(self):
        print(f"\nfuzz {self.name}: {sum(self.counts.values())} cases: {dict(self.counts)}",
              file=sys.__stdout__)
        assert not self.failures, "\n".join(self.failures[:10])


def run_case(outcomes, case, argv, damaged_dir, out, capsys, error_codes=(2,)):
    """Run the CLI; check the contract (see the module docstring)."""
    capsys.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    except BaseException as err:  # noqa: BLE001 - the point: no exception may escape
        if isinstance(err, KeyboardInterrupt):
            raise
        outcomes.failures.append(f"{case}: {type(err).__name__}: {str(err)[-300:]}")
        return None
    captured = capsys.readouterr()
    err = captured.err
    if rc == 0:
        outcomes.counts["succeeded"] += 1
        return rc
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if rc == 1 and argv[0] == "verify":  # the verdict, on stdout: "DIR: DAMAGED: FILE: ..."
        errors = [line.split("DAMAGED: ", 1)[1] for line in captured.out.splitlines()
                  if "DAMAGED: " in line][:1]
    problems = []
    if rc not in error_codes:
        problems.append(f"exit code {rc}")
    if "Traceback" in err:
        problems.append("traceback on stderr")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    elif os.path.abspath(damaged_dir) not in errors[0]:
        problems.append("the error names no file of the input")
    if out is not None and os.path.exists(out):
        problems.append(f"output {out} left behind")
    parent = None if out is None else os.path.dirname(out)
    if parent is not None and os.path.isdir(parent) and any(
            ".partial" in n for n in os.listdir(parent)):
        problems.append("a .partial directory left behind")
    if problems:
        outcomes.failures.append(f"{case}: {', '.join(problems)}\n  {err.strip()[-600:]}")
    else:
        outcomes.counts["refused with our error"] += 1
    return rc


def damaged_copy(pristine_dir, target, rel, kind, rng):
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine_dir, target)
    return f"{rel}: {kind(os.path.join(target, rel), rng)}"


# ---- Hugging Face checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("source", ["hf", "hf_ours"])
def test_damaged_hf_checkpoints(pristine, tmp_path, capsys, source):
    """hf-to-mcore and verify --hf on damaged HF directories (foreign and ours)."""
    rng = random.Random(f"{SEED}-{source}")
    outcomes = Outcomes(f"HF checkpoint ({source})")
    src = pristine / source
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    plan = [(rel, kind) for rel in shards for kind in
            BINARY + [safetensors_header, lambda p, r: flip_bits(p, r, limit=200)]]
    plan += [(rel, json_damage) for rel in ("config.json", "model.safetensors.index.json")]
    plan += [(rel, kind) for rel in ("config.json", "model.safetensors.index.json")
             for kind in (truncate, garbage_head, delete)]
    for rel, kind in [(r, k) for r, k in plan for _ in range(CASES_PER_FILE if k is not delete
                                                             else 1)]:
        damaged = tmp_path / "damaged"
        case = damaged_copy(src, damaged, rel, kind, rng)
        out = tmp_path / "out" / "mcore"
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        rc = run_case(outcomes, f"hf-to-mcore {source} {case}",
                      ["convert", "hf-to-mcore", "--hf", str(damaged), "--out", str(out),
                       "--no-progress"], damaged, out, capsys)
        verify = run_case(outcomes, f"verify --hf {source} {case}",
                          ["verify", "--hf", str(damaged), "--full"], damaged, None, capsys,
                          error_codes=(1,))
        if source == "hf_ours" and verify == 0:
            outcomes.failures.append(f"verify --full {source} {case}: missed the damage")
        if rc == 0 and verify == 1 and source == "hf":
            outcomes.counts["converted; only verify (structure) saw it"] += 1
    outcomes.report()


def test_safetensors_headers_judged_as_the_safetensors_library_judges_them(pristine, tmp_path):
    """Our header validation refuses exactly the files the safetensors library refuses (the
    independent reference), over truncations, header bit flips and rewritten entries."""
    from safetensors import safe_open

    from megatron_dots.storage.errors import CheckpointError
    from megatron_dots.storage.safetensors_file import read_header

    rng = random.Random(f"{SEED}-library")
    shard = sorted(n for n in os.listdir(pristine / "hf") if n.endswith(".safetensors"))[0]
    verdicts, disagreements = Counter(), []
    for kind in [truncate, garbage_head, safetensors_header, benign_header,
                 lambda p, r: flip_bits(p, r, limit=120)] * 15:
        path = tmp_path / "t.safetensors"
        shutil.copy(pristine / "hf" / shard, path)
        case = kind(str(path), rng)
        try:
            with safe_open(str(path), framework="pt"):
                pass
            library = "accepts"
        except Exception:  # noqa: BLE001 - SafetensorError and friends
            library = "refuses"
        try:
            read_header(str(path))
            ours = "accepts"
        except CheckpointError:
            ours = "refuses"
        verdicts[library] += 1
        if ours != library:
            disagreements.append(f"{case}: library {library}, we {ours}")
    print(f"\nsafetensors headers vs the library: {dict(verdicts)}", file=sys.__stdout__)
    assert verdicts["refuses"] > 20 and verdicts["accepts"] >= 15, dict(verdicts)
    assert not disagreements, disagreements


def test_damaged_hf_checkpoints_in_compare(pristine, tmp_path, capsys):
    """compare refuses damaged HF directories and checkpoints with our error."""
    rng = random.Random(f"{SEED}-compare")
    outcomes = Outcomes("compare")
    shard = sorted(n for n in os.listdir(pristine / "hf") if n.endswith(".safetensors"))[0]
    for kind in (truncate, garbage_head, safetensors_header, delete):
        damaged = tmp_path / "hf"
        case = damaged_copy(pristine / "hf", damaged, shard, kind, rng)
        run_case(outcomes, f"compare {case}", ["compare", "--ckpt", str(pristine / "mcore"),
                                                "--hf", str(damaged)], damaged, None, capsys,
                 error_codes=(2,))
    for rel, kind in ((".metadata", truncate), ("common.pt", garbage_head)):
        damaged = tmp_path / "mcore"
        case = damaged_copy(pristine / "mcore", damaged, f"release/{rel}", kind, rng)
        run_case(outcomes, f"compare {case}", ["compare", "--ckpt", str(damaged), "--hf",
                                                str(pristine / "hf")], damaged, None, capsys)
    outcomes.report()
    assert outcomes.counts["refused with our error"] == 6, dict(outcomes.counts)


# ---- torch_dist checkpoints -------------------------------------------------------------------

def test_damaged_torch_dist_checkpoints(pristine, tmp_path, capsys):
    """mcore-to-hf and verify --ckpt (with and without the manifest) on damaged checkpoints."""
    rng = random.Random(f"{SEED}-dist")
    outcomes = Outcomes("torch_dist checkpoint")
    release = pristine / "mcore" / "release"
    files = sorted(n for n in os.listdir(release) if os.path.isfile(release / n))
    assert "dots_manifest.json" in files and ".metadata" in files
    plan = [(f"release/{rel}", kind) for rel in files for kind in BINARY]
    missed_without_manifest = 0
    for rel, kind in [(r, k) for r, k in plan for _ in range(CASES_PER_FILE if k is not delete
                                                             else 1)]:
        damaged = tmp_path / "damaged"
        case = damaged_copy(pristine / "mcore", damaged, rel, kind, rng)
        out = tmp_path / "out" / "hf"
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        run_case(outcomes, f"mcore-to-hf {case}", ["convert", "mcore-to-hf", "--ckpt",
                                                    str(damaged), "--out", str(out),
                                                    "--no-progress"], damaged, out, capsys)
        verify = run_case(outcomes, f"verify --ckpt {case}", ["verify", "--ckpt", str(damaged),
                                                               "--full"], damaged, None, capsys,
                          error_codes=(1,))
        if verify == 0 and not rel.endswith("dots_manifest.json"):
            outcomes.failures.append(f"verify --full {case}: missed the damage")
        manifest = damaged / "release" / "dots_manifest.json"
        if os.path.exists(manifest) and not rel.endswith("dots_manifest.json"):
            os.remove(manifest)  # a foreign checkpoint: structure and torch.save CRC-32s only
            missed_without_manifest += run_case(
                outcomes, f"verify --ckpt (no manifest) {case}", ["verify", "--ckpt",
                                                                  str(damaged), "--full"],
                damaged, None, capsys, error_codes=(1,)) == 0
    print(f"without a manifest, verify --full missed {missed_without_manifest} damaged "
          "checkpoints (changes to bytes no CRC covers)", file=sys.__stdout__)
    outcomes.report()


# ---- datasets, JSONL, tokenizers --------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from training_data import write_progressions

    root = tmp_path_factory.mktemp("dataset")
    return write_progressions(str(root / "d"), 511, seed=4)


def test_damaged_indexed_datasets(dataset, tmp_path):
    """pretrain's dataset check names the damaged .idx/.bin; an intact copy passes."""
    from megatron_dots.storage.errors import DataFileError
    from megatron_dots.training.data import check_splits

    rng = random.Random(f"{SEED}-data")
    counts = Counter()
    failures = []
    check_splits([dataset], "99,1,0", need_valid=True)
    for ext in (".idx", ".bin"):
        for kind in BINARY + [lambda p, r: garbage_head(p, r, length=40)]:
            for _ in range(CASES_PER_FILE * 2 if kind is not delete else 1):
                prefix = str(tmp_path / "d")
                for e in (".idx", ".bin"):
                    shutil.copy(dataset + e, prefix + e)
                case = f"{ext}: {kind(prefix + ext, rng)}"
                try:
                    check_splits([prefix], "99,1,0", need_valid=True)
                    counts["accepted"] += 1
                    if ext == ".idx" and kind in (truncate, delete):
                        failures.append(f"{case}: accepted")
                except DataFileError as err:
                    counts["refused with our error"] += 1
                    if prefix not in str(err):
                        failures.append(f"{case}: {err} names no file")
                except Exception as err:  # noqa: BLE001
                    failures.append(f"{case}: {type(err).__name__}: {err}")
    print(f"\nfuzz datasets: {sum(counts.values())} cases: {dict(counts)}", file=sys.__stdout__)
    assert not failures, "\n".join(failures[:10])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from megatron_dots.data import train_bpe_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = random.Random(0)
    text = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    return train_bpe_tokenizer(text, str(tmp_path_factory.mktemp("tok") / "bpe"),
                               vocab_size=300)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_damaged_jsonl_and_tokenizers(tokenizer_dir, tmp_path, capsys, suffix):
    """preprocess on damaged JSONL (plain and gzip) and damaged tokenizer files."""
    rng = random.Random(f"{SEED}-{suffix}")
    outcomes = Outcomes(f"preprocess {suffix}")
    rows = [json.dumps({"text": f"alpha beta {i} gamma"}) for i in range(40)]
    pristine = tmp_path / f"pristine{suffix}"
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(pristine, "wt", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    out_dir = tmp_path / "out"

    def run(inputs, tokenizer, case, damaged):
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        rc = run_case(outcomes, case, ["preprocess", "--input", str(inputs), "--tokenizer",
                                       str(tokenizer), "--output-prefix", str(out_dir / "ds"),
                                       "--no-progress"], damaged, None, capsys)
        if rc == 2 and os.listdir(out_dir):
            outcomes.failures.append(f"{case}: left {os.listdir(out_dir)}")

    for kind in (truncate, flip_bits, garbage_head):
        for _ in range(CASES_PER_FILE * 2):
            damaged = tmp_path / f"input{suffix}"
            shutil.copy(pristine, damaged)
            run(damaged, tokenizer_dir, f"{suffix}: {kind(str(damaged), rng)}", damaged)
    for name in sorted(os.listdir(tokenizer_dir)):
        for kind in (truncate, garbage_head, flip_bits):
            damaged = tmp_path / "tok"
            case = damaged_copy(tokenizer_dir, damaged, name, kind, rng)
            run(pristine, damaged, f"tokenizer {case}", damaged)
    outcomes.report()
