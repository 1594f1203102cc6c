"""`megatron-dots verify (--ckpt DIR | --hf DIR) [--full]`: is a checkpoint intact?

Prints one line per checkpoint directory (every iteration of a checkpoint root, the tracker's
marked) and exits 0 when all are intact, 1 when one is damaged (the line names the file), 2
when the path is not a checkpoint at all.
"""

import argparse
import os
import sys

from .checkpoint_format import iteration_dir, read_tracker
from .errors import CheckpointError
from .progress import progress_bar
from .verify import checkpoints_in_root, directory_kind, verify_directory

def _targets(args):
    """[(label, directory, kind)] to verify, or CheckpointError."""
    path = os.path.abspath(args.ckpt or args.hf)
    if not os.path.isdir(path):
        raise CheckpointError(path, "no such directory")
    if args.hf:
        return [(path, path, "hf")]
    if directory_kind(path) == "torch_dist":
        return [(path, path, "torch_dist")]
    found = checkpoints_in_root(path)
    if not found:
        raise CheckpointError(path, "neither a torch_dist checkpoint directory (no "
                              "metadata.json) nor a checkpoint root (no iter_*/release)")
    latest = read_tracker(path)
    latest = iteration_dir(path, latest) if latest is not None else None
    return [(directory + (" (latest)" if directory == latest else ""), directory, "torch_dist")
            for _, directory in found]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-dots verify",
        description="Check a checkpoint: file sizes against its dots_manifest.json (fast) or "
        "CRC-32s (--full), and its structure (torch_dist metadata and shards, safetensors "
        "headers); foreign checkpoints without a manifest get the structural check. Exit 0 "
        "intact, 1 damaged (the file is named), 2 not a checkpoint.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="Megatron checkpoint root (every iteration is checked) "
                        "or one torch_dist directory")
    source.add_argument("--hf", help="Hugging Face model directory")
    parser.add_argument("--full", action="store_true", help="read every byte and compare "
                        "CRC-32s (default: sizes and structure only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        targets = _targets(args)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    damaged = 0
    for label, directory, kind in targets:
        total = None
        if args.full:
            total = sum(os.path.getsize(os.path.join(r, f))
                        for r, _, fs in os.walk(directory) for f in fs)
        with progress_bar(total or 0, "verify", unit="B", enabled=bool(
                args.full and not args.no_progress and sys.stderr.isatty())) as bar:
            verdict = verify_directory(directory, kind, checksums=args.full,
                                       on_bytes=bar.update)
        damaged += not verdict.intact
        print(f"{label}: {verdict.describe()}")
        for extra in verdict.damage[1:]:
            print(f"  also: {extra}")
    return 1 if damaged else 0
