"""A checkpoint written by megatron-core 0.19.2 (common state inside the torch_dist files, no
common.pt) resumes exactly on 0.16.1, the newest release for Python 3.11 (runtime patch 11).

Needs both releases: the installed one must be 0.16.1 and MEGATRON_DOTS_MCORE019_SITE a
directory holding megatron-core 0.19.2 (`.ci/setup_mcore019.sh DIR` makes DIR/site; .ci/run
sets the variable)."""

import os
import subprocess
import sys

import pytest

from launch import REPO_ROOT, describe
from pretrain_runs import EXAMPLE, losses

SITE_019 = os.environ.get("MEGATRON_DOTS_MCORE019_SITE", "")


def _release(pythonpath):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, "-c", "import megatron.core as m; print(m.__version__)"],
                         capture_output=True, text=True, env=env, timeout=120)
    return out.stdout.strip()


def _pretrain(pythonpath, *args):
    env = dict(os.environ, PYTHONPATH=pythonpath, MEGATRON_DOTS_QUIET="1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    flags = ["--dots-model", "dots-tiny", "--mock-data", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--seq-length", "32", "--lr", "3e-3",
             "--lr-decay-style", "constant", "--tokenizer-type", "NullTokenizer",
             "--vocab-size", "511", "--log-interval", "1", "--seed", "7"]
    proc = subprocess.run([sys.executable, EXAMPLE, *flags, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    return proc


@pytest.mark.skipif(not os.path.isdir(os.path.join(SITE_019, "megatron")),
                    reason="MEGATRON_DOTS_MCORE019_SITE does not hold megatron-core 0.19.2")
def test_a_0_19_checkpoint_resumes_exactly_on_0_16(tmp_path):
    new, old = SITE_019 + os.pathsep + REPO_ROOT, REPO_ROOT
    if _release(new) != "0.19.2" or _release(old) != "0.16.1":
        pytest.skip(f"needs 0.19.2 in {SITE_019} and 0.16.1 installed "
                    f"(found {_release(new)} / {_release(old)})")
    _pretrain(new, "--train-iters", "6", "--dots-loss-csv", str(tmp_path / "straight.csv"))
    _pretrain(new, "--train-iters", "3", "--save", str(tmp_path / "ckpt"), "--save-interval", "3")
    written = tmp_path / "ckpt" / "iter_0000003"
    assert not (written / "common.pt").exists(), "0.19.2 wrote a legacy common.pt"
    _pretrain(old, "--train-iters", "6", "--load", str(tmp_path / "ckpt"),
              "--dots-loss-csv", str(tmp_path / "resumed.csv"))
    straight, resumed = losses(tmp_path / "straight.csv"), losses(tmp_path / "resumed.csv")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), (step, resumed)
