"""Megatron-LM's checkpoint directory layout and our common state, shared by training and
conversion.

``ROOT/latest_checkpointed_iteration.txt`` holds an iteration number or ``release``;
``ROOT/iter_{iteration:07d}/`` (or ``ROOT/release/``) is one torch_dist checkpoint.
Converted Hugging Face checkpoints are ``release`` checkpoints, as in Megatron-LM: they hold
model weights only, and training started from them begins at iteration 0.
"""

import os
from typing import Dict, Optional, Union

from .._version import __version__
from .errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"


def iteration_dir(root: str, iteration: Union[int, str]) -> str:
    """The checkpoint directory of one iteration (or `release`)."""
    if iteration == RELEASE:
        return os.path.join(root, RELEASE)
    return os.path.join(root, f"iter_{int(iteration):07d}")


def read_tracker(root: str) -> Optional[Union[int, str]]:
    """The iteration (int) or 'release' named by ROOT's tracker file; None without one."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(path, f"holds {text!r}; expected an iteration number or "
                              "'release'") from None


def resolve_checkpoint_dir(path: str) -> str:
    """A torch_dist directory from a checkpoint root (tracker file) or the directory itself."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(path, "no such checkpoint directory")
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(path, f"neither a checkpoint root (no {TRACKER}) nor a "
                              "torch_dist checkpoint directory (no metadata.json)")
    found = iteration_dir(path, iteration)
    if not os.path.isdir(found):
        raise CheckpointError(os.path.join(path, TRACKER),
                              f"names {iteration!r} but {found} does not exist")
    return found


CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


def dots_common_state(cfg, padded_vocab_size: int, parallel: Dict[str, int],
                      iteration: int = 0, **extra) -> Dict:
    """The non-sharded state of our checkpoints (common.pt): Megatron-LM's `iteration` and
    `checkpoint_version`, plus a `dots` entry with the model config, the vocab padding and the
    parallel layout that saved it. (No `args`: Megatron-LM would compare them to its own.)"""
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "dots": {"config": cfg.to_dict(), "padded_vocab_size": padded_vocab_size,
                 "parallel": dict(parallel), "megatron_dots_version": __version__, **extra},
    }
