"""Which checkpoint `--load` resumes from: the tracker's, verified, or the newest intact one.

Rank 0 verifies file sizes against the manifest and the structure; with
`--dots-verify-load-checksums` every rank computes the CRC-32s of its share of the manifest's
files; all ranks see all the damage found and so choose the same directory. A damaged latest
checkpoint of a checkpoint root is reported, naming the file, and the newest older intact
iteration is taken instead, named in the log: an auto-requeued job resumes instead of
crash-looping. A directory named explicitly (`--load ROOT/iter_N`) is never
swapped for another: when damaged, the run stops naming the file. Nothing is loaded unverified.
"""

import os
from typing import List, Tuple

import torch

from ..storage.checkpoint_format import RELEASE, iteration_dir, read_tracker
from ..storage.errors import CheckpointError
from ..storage.manifest import manifest_damage, read_manifest
from ..storage.verify import checkpoints_in_root, directory_kind, verify_directory


def _damage(directory: str, checksums: bool) -> List[Tuple[str, str]]:
    """(file, reason) of each damage of the torch_dist `directory`, the same on every rank.

    Rank 0 checks sizes and structure (cheap); with `checksums` every rank computes the
    CRC-32s of its share of the manifest's files, so reading a large checkpoint is spread over
    the ranks instead of keeping all but one waiting on rank 0 for the process-group timeout.
    """
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    found = []
    if rank == 0:
        found = verify_directory(directory, "torch_dist", checksums=checksums and not distributed
                                 ).damage
    if checksums and distributed and os.path.isdir(directory):
        try:
            records = read_manifest(directory) or {}
        except CheckpointError:
            records = {}  # rank 0 reports the unreadable manifest
        share = {rel: record for i, (rel, record) in enumerate(sorted(records.items()))
                 if i % world == rank}
        found += manifest_damage(directory, share, checksums=True)
    found = [(err.path, err.reason) for err in found]
    if distributed:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, found)
        found = [item for part in gathered for item in part]
    return found


def _error(damage: Tuple[str, str], prefix: str = "", suffix: str = "") -> CheckpointError:
    return CheckpointError(damage[0], prefix + damage[1] + suffix)


def choose_checkpoint(load: str, checksums: bool = False) -> Tuple[str, List[str]]:
    """The verified torch_dist directory to resume from and the lines to log, the same on
    every rank (call it on all); raises `CheckpointError` naming the damaged file otherwise."""
    if directory_kind(load) == "torch_dist":
        damage = _damage(load, checksums)
        if damage:
            raise _error(damage[0], "--load names a damaged checkpoint: ")
        return os.path.normpath(load), []
    latest = read_tracker(load)
    chosen = iteration_dir(load, latest)
    damage = _damage(chosen, checksums)
    if not damage:
        return os.path.normpath(chosen), []
    lines = [f" WARNING: the latest checkpoint {chosen} is damaged: {_error(damage[0])}"]
    if latest == RELEASE:
        raise _error(damage[0])
    for name, directory in checkpoints_in_root(load):
        if name == RELEASE or int(name[len("iter_"):]) >= latest:
            continue  # not a fallback: newer than the tracker's, or not a training checkpoint
        older = _damage(directory, checksums)
        if not older:
            lines.append(f" resuming from {directory}, the newest intact checkpoint, instead")
            return os.path.normpath(directory), lines
        lines.append(f" WARNING: {directory} is damaged too: {_error(older[0])}")
    raise _error(damage[0], suffix=f"; and no older intact checkpoint in {load} to resume "
                 "from instead")
