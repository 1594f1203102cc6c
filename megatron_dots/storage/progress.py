"""Progress bars for long conversions (tqdm on stderr; off when asked or not on a terminal)."""

import contextlib
import sys

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar, or a silent stand-in with the same `update` method."""
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
               disable=not enabled)
    try:
        yield bar
    finally:
        bar.close()
