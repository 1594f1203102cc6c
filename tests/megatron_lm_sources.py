"""The real Megatron-LM sources the integration tests run against (../shared/megatron-lm/).

Each archive (core_v0.16.1, core_v0.19.0, main) is unpacked once per test session; a process
gets one on PYTHONPATH *before* the installed packages, so its own `megatron/core` is the
megatron-core in use (Megatron-LM pairs each release with its own). Without the archives the
tests skip, unless MEGATRON_DOTS_REQUIRE_MEGATRON_LM=1 (CI) makes that a failure.
"""

import os
import subprocess
import sys
import tarfile

import pytest

from launch import REPO_ROOT, TESTS, free_port

ARCHIVES = os.environ.get("MEGATRON_LM_ARCHIVES",
                          os.path.join(os.path.dirname(REPO_ROOT), "shared", "megatron-lm"))
RELEASES = {  # name -> (archive, megatron-core version inside)
    "core_v0.16.1": ("Megatron-LM-core_v0.16.1.tar.gz", "0.16.1"),
    "core_v0.19.0": ("Megatron-LM-core_v0.19.0.tar.gz", "0.19.1"),
    "main": ("Megatron-LM-main-d98e8a6.tar.gz", "0.20.0"),
}


def unpack(release: str, into: str) -> str:
    """The root of `release`'s source tree (unpacked under `into` on first use)."""
    archive, _ = RELEASES[release]
    path = os.path.join(ARCHIVES, archive)
    if not os.path.isfile(path):
        message = f"Megatron-LM source archive {path} not found (set MEGATRON_LM_ARCHIVES)"
        if os.environ.get("MEGATRON_DOTS_REQUIRE_MEGATRON_LM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    root = os.path.join(into, archive[:-len(".tar.gz")])
    if not os.path.isdir(root):
        with tarfile.open(path) as tar:
            tar.extractall(into, filter="data")
    return root


def env(root: str) -> dict:
    """Environment of a process that runs Megatron-LM at `root` with megatron-dots."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (root, REPO_ROOT, TESTS) if p)
    out.update(OMP_NUM_THREADS="1", MEGATRON_DOTS_QUIET="1", PYTHONWARNINGS="ignore",
               CUDA_DEVICE_MAX_CONNECTIONS="1")  # Megatron-LM's validate_args demands it at TP>1
    return out


def run(root: str, argv, nproc: int = 1, timeout: float = 600):
    """`python argv...` (or torchrun with nproc ranks) inside Megatron-LM's tree at `root`."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                     "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return subprocess.run(launcher + list(argv), cwd=root, env=env(root), capture_output=True,
                          text=True, timeout=timeout)
