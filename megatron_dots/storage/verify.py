"""Verify a checkpoint directory: its manifest where it has one, its structure always.

`verify_directory` judges one torch_dist or Hugging Face directory: with a manifest, every
listed file's size (and with `checksums` its CRC-32), then the structure; without one, the
structure (and with `checksums` the CRC-32s torch.save records carry). `checkpoints_in_root`
lists a Megatron checkpoint root's iterations, newest first, for `verify --ckpt ROOT` and for
resuming from the newest intact one.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from .errors import CheckpointError
from .manifest import MANIFEST, checkpoint_files, manifest_damage, read_manifest
from .structure import dist_checkpoint_damage, hf_directory_damage, read_dcp_metadata

_ITERATION = re.compile(r"iter_(\d{7,})$")


@dataclass
class Verdict:
    """What `verify_directory` found in one directory."""

    directory: str
    kind: str  # "torch_dist" or "hf"
    files: int = 0
    bytes: int = 0
    manifest: bool = False
    checksums: bool = False
    damage: List[CheckpointError] = field(default_factory=list)
    dcp_metadata: Any = None  # torch_dist: the DCP Metadata read while checking, for readers

    @property
    def intact(self) -> bool:
        return not self.damage

    def describe(self) -> str:
        """One line: intact with what was checked, or the first damaged file."""
        if self.damage:
            more = f" (and {len(self.damage) - 1} more)" if len(self.damage) > 1 else ""
            return f"DAMAGED: {self.damage[0]}{more}"
        if self.manifest:
            how = "sizes and CRC-32s" if self.checksums else "sizes"
            how += f" against {MANIFEST}, structure"
        else:
            how = "structure" + (" and torch.save CRC-32s" if self.checksums and
                                 self.kind == "torch_dist" else "") + f" (no {MANIFEST})"
        return f"intact: {self.files} files, {self.bytes / 2**20:.1f} MiB; checked {how}"


def directory_kind(directory: str) -> Optional[str]:
    """'torch_dist' (metadata.json), 'hf' (config.json) or None."""
    if os.path.isfile(os.path.join(directory, "metadata.json")):
        return "torch_dist"
    if os.path.isfile(os.path.join(directory, "config.json")):
        return "hf"
    return None


def verify_directory(directory: str, kind: str, checksums: bool = False,
                     on_bytes: Optional[Callable[[int], None]] = None) -> Verdict:
    """Judge the torch_dist (`kind` 'torch_dist') or HF ('hf') checkpoint in `directory`."""
    verdict = Verdict(directory, kind, checksums=checksums)
    if not os.path.isdir(directory):
        verdict.damage.append(CheckpointError(directory, "missing"))
        return verdict
    files = checkpoint_files(directory)
    verdict.files = len(files)
    verdict.bytes = sum(os.path.getsize(os.path.join(directory, rel)) for rel in files)
    try:
        records = read_manifest(directory)
    except CheckpointError as err:
        verdict.damage.append(err)
        return verdict
    verdict.manifest = records is not None
    if records is not None:
        verdict.damage += manifest_damage(directory, records, checksums, on_bytes)
        if verdict.damage:
            return verdict
    if kind == "torch_dist":
        try:
            verdict.dcp_metadata = read_dcp_metadata(directory)
        except CheckpointError as err:
            verdict.damage.append(err)
            return verdict
        deep = checksums and records is None
        verdict.damage += dist_checkpoint_damage(directory, verdict.dcp_metadata, deep=deep,
                                                 on_bytes=on_bytes)
    else:
        verdict.damage += hf_directory_damage(directory)
    return verdict


def checkpoints_in_root(root: str) -> List[Tuple[str, str]]:
    """(name, directory) of each iter_* checkpoint under a Megatron checkpoint root, newest
    first, then `release`."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _ITERATION.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), name))
    out = [(name, os.path.join(root, name)) for _, name in sorted(found, reverse=True)]
    if os.path.isdir(os.path.join(root, "release")):
        out.append(("release", os.path.join(root, "release")))
    return out
