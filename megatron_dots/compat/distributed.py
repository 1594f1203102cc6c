"""torch.distributed start-up helpers that work on CPU (gloo) and GPU (nccl).

``init_distributed`` reads the usual torchrun environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without them it starts a
single-process group on a free local port, so the same code runs under ``python script.py``
and under ``torchrun``. ``lost_peer`` tells a collective that failed because another rank died
or hung from other errors.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta
from typing import Optional

import torch

__all__ = ["default_device", "init_distributed", "local_rank", "lost_peer"]


def local_rank() -> int:
    """The process's rank on its node (``LOCAL_RANK``), 0 when not launched by torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    backend: Optional[str] = None, timeout_minutes: Optional[float] = None
) -> bool:
    """Initialise the default process group from torchrun env vars, if not done yet.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when CUDA is available, else
            ``gloo``.
        timeout_minutes: collective timeout; default torch's own.

    Returns:
        True if this call initialised the group, False if it was already initialised.

    On GPU the current CUDA device is set to ``LOCAL_RANK`` first. Without ``RANK`` /
    ``WORLD_SIZE`` / ``MASTER_*`` in the environment a world of one process is created on a
    free local port, without changing the environment.
    """
    if not torch.distributed.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if torch.distributed.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend='nccl' needs CUDA; use backend='gloo' on CPU")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        init_method = "env://"
    elif world_size == 1:
        # A private one-process world; nothing is written to os.environ, so subprocesses
        # (e.g. a torchrun launched from here) do not inherit a stale rank or port.
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    else:
        raise RuntimeError("MASTER_ADDR and MASTER_PORT must be set for a multi-process launch")

    kwargs = {}
    if timeout_minutes is not None:
        kwargs["timeout"] = timedelta(minutes=timeout_minutes)
    torch.distributed.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs
    )
    return True


# gloo's transport errors: "[.../gloo/transport/tcp/pair.cc:537] Read error [ip]:port:
# Connection reset by peer. This is typically caused by ..." (a peer process died) or
# "[.../unbound_buffer.cc:78] Timed out waiting 600000ms for recv operation to complete" (a peer
# hung past the timeout).
_GLOO_TRANSPORT = "gloo/transport/"
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*")
_BOILERPLATE = re.compile(r"\s*This is typically caused by.*$", re.DOTALL)


def lost_peer(err: BaseException) -> Optional[str]:
    """One line describing `err` when it is a collective or store failure caused by another
    rank (it died, or hung past the process groups' timeout); None for any other error.

    gloo reports a dead peer at once ("Connection reset/closed by peer") and a hung one after
    the timeout ("Timed out waiting ..."), both as plain RuntimeErrors from its transport;
    torch reports a lost store connection as ``DistNetworkError`` / ``DistStoreError``. Other
    backend errors (``DistBackendError``, e.g. NCCL's) keep their traceback: they can be bugs.
    """
    text = str(err)
    store_errors = tuple(getattr(torch.distributed, name)
                         for name in ("DistNetworkError", "DistStoreError")
                         if hasattr(torch.distributed, name))
    if not (isinstance(err, store_errors)
            or (isinstance(err, RuntimeError) and _GLOO_TRANSPORT in text)):
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = _BOILERPLATE.sub("", _SOURCE_PREFIX.sub("", lines[0] if lines else type(err).__name__))
    return line.rstrip(". ")[:300]
