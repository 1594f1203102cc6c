"""Everything that depends on the megatron-core release or the device.

* `versions`: the installed megatron-core / TE / apex, read once.
* `runtime_patches`: fixes of upstream defects, applied on every device (each names its site).
* `cpu_backend`: makes megatron-core's hard-coded CUDA sites run on CPU + gloo; enabled only when
  CUDA is unavailable, never on GPU runs.
* `distributed`: torch.distributed initialisation for torchrun (gloo on CPU, nccl on GPU).

`install()` runs at `import megatron_dots`.
"""

import multiprocessing
import os
import sys

import torch

from ._quiet_import import import_megatron_quietly

import_megatron_quietly()

from . import versions  # noqa: E402
from .cpu_backend import cpu_backend_active, enable_cpu_backend  # noqa: E402
from .runtime_patches import apply_runtime_patches  # noqa: E402

_INSTALLED = False


def install() -> None:
    """Apply runtime patches and, without CUDA, the CPU backend; idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    versions.check_supported()
    apply_runtime_patches()
    if not torch.cuda.is_available():
        enable_cpu_backend()
    _INSTALLED = True
    _announce()


def backend_summary() -> str:
    """One line saying which path is in use and why."""
    parts = [f"megatron-core {versions.MCORE_VERSION}"]
    if versions.HAVE_TE:
        parts.append("Transformer Engine found: TE layers available")
    else:
        parts.append("no Transformer Engine: using the TE-free path (local layers, torch experts)")
    if not versions.HAVE_APEX:
        parts.append("no apex: torch optimizers")
    if cpu_backend_active():
        parts.append("no CUDA: CPU backend active (gloo)")
    return "megatron-dots: " + "; ".join(parts)


def _announce() -> None:
    if os.environ.get("MEGATRON_DOTS_QUIET") == "1":
        return
    if os.environ.get("RANK", "0") != "0":
        return
    if (multiprocessing.parent_process() is not None
            or getattr(multiprocessing.current_process(), "_inheriting", False)):
        # A helper process (e.g. megatron-core's checkpoint writer, or the spawned manager of
        # its results queue while it re-imports the parent's main module) importing us.
        return
    if versions.HAVE_TE and not cpu_backend_active():
        return
    print(backend_summary(), file=sys.stderr)


__all__ = [
    "apply_runtime_patches", "backend_summary", "cpu_backend_active", "enable_cpu_backend",
    "install", "versions",
]
