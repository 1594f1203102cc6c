"""Running `examples/pretrain_dots.py` from tests: flags for dots-tiny on synthetic data, one
process or torchrun (gloo), and the loss CSV it writes."""

import csv
import os
import subprocess
import sys

from launch import REPO_ROOT, _env, describe, torchrun

EXAMPLE = os.path.join(REPO_ROOT, "examples", "pretrain_dots.py")
VOCAB = 511  # NullTokenizer: ids 0..510, end of document 511; dots-tiny has 512 rows
CONSTANT_LR = dict(lr_decay_style="constant", lr_wsd_decay_iters=None, lr_warmup_iters=0)


def flags(data, out, **changes):
    """Pretrain flags for dots-tiny on the synthetic blend; `changes` override (None drops)."""
    values = {
        "dots_model": "dots-tiny", "micro_batch_size": 4, "global_batch_size": 8,
        "seq_length": 64, "train_iters": 20, "lr": 3e-3, "min_lr": 3e-4,
        "lr_decay_style": "WSD", "lr_warmup_iters": 2, "lr_wsd_decay_iters": 5,
        "data_cache_path": out / "cache", "tokenizer_type": "NullTokenizer",
        "vocab_size": VOCAB, "log_interval": 5, "eval_interval": 10, "eval_iters": 1,
    }
    values.update(changes)
    return ["--data-path", "0.6", data[0], "0.4", data[1]] + as_flags(values)


def as_flags(values):
    """`{"micro_batch_size": 2, "bf16": True}` -> ["--micro-batch-size", "2", "--bf16"];
    None and False drop a flag."""
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def run(args, nproc=1, timeout=300, returncode=0, script=EXAMPLE):
    """Run the example (torchrun when `nproc` > 1); fails the test on another exit code."""
    if nproc > 1:
        proc = torchrun(script, nproc, *args, timeout=timeout)
    else:
        proc = subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, env=_env(),
                              capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == returncode, describe(proc)
    return proc


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def losses(path):
    """iteration -> loss of a --dots-loss-csv file."""
    return {int(r["iteration"]): float(r["loss"]) for r in read_csv(path)}
