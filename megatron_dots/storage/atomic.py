"""Atomic output directories: write into a hidden sibling, rename into place when complete.

A crash or kill while writing leaves only ``.{name}.partial-{pid}`` next to the target, never a
directory under the target's name that looks complete.
"""

import contextlib
import os
import shutil
from typing import Iterator


def _nonempty(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


@contextlib.contextmanager
def atomic_directory(target: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory that becomes `target` when the block succeeds.

    Refuses (FileExistsError) a non-empty `target` unless `overwrite`; an existing target is
    replaced only after the new one is complete.
    """
    target = os.path.abspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target}: exists and is not a directory")
    if _nonempty(target) and not overwrite:
        raise FileExistsError(f"{target}: exists and is not empty (pass --overwrite to "
                              "replace it)")
    parent, name = os.path.split(target)
    created = _first_missing_ancestor(parent)
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
        fsync_path(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        _remove_empty_dirs(parent, created)
        raise
    promote_directory(partial, target)


def _first_missing_ancestor(path: str):
    """The outermost directory of `path` that does not exist yet (None if it exists)."""
    missing = None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_empty_dirs(path: str, up_to) -> None:
    """Remove `path` and its parents up to `up_to` (the first we created) while empty."""
    if up_to is None:
        return
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == up_to:
            return
        path = os.path.dirname(path)


def promote_directory(complete: str, target: str) -> None:
    """Rename the finished directory `complete` to `target`, replacing an old `target` only
    once the new one is in place."""
    parent, name = os.path.split(os.path.abspath(target))
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(complete, target)
    fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str, text: str) -> None:
    """Replace `path` with `text` atomically (write a sibling, fsync, rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
