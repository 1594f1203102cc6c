"""Test helpers: run a script under torchrun, or code in a fresh interpreter."""

import os
import socket
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MEGATRON_DOTS_QUIET"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def torchrun(script: str, nproc: int, *args: str, timeout: float = 120):
    """``python -m torch.distributed.run --nproc-per-node N --master-port <free> script args``.

    `script` is a path relative to tests/ (or absolute).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        os.path.join(TESTS, script),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def python_snippet(code: str, timeout: float = 120):
    """Run ``code`` in a fresh interpreter (so no patch applied by this pytest process leaks)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(proc) -> str:
    return (
        f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
        f"\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
