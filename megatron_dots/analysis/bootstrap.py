"""Bootstrap over sequences: each replicate redraws a domain's windows with replacement, so a
statistic's spread reflects how much it varies from one stretch of text to another (tokens of
a window are not independent; windows nearly are)."""

import warnings
from typing import Tuple

import numpy as np

LEVEL = 0.95


def resample_weights(n_windows: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[replicates, n_windows] multiplicities: how often each window is drawn in a replicate
    of `n_windows` draws with replacement."""
    return rng.multinomial(n_windows, np.full(n_windows, 1.0 / n_windows), size=replicates
                           ).astype(np.float64)


def interval(samples: np.ndarray, axis: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Percentile interval at `LEVEL` of bootstrap `samples` along `axis` (NaNs ignored)."""
    tail = (1.0 - LEVEL) / 2 * 100
    with warnings.catch_warnings():  # an all-NaN slice (undefined statistic) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(samples, [tail, 100 - tail], axis=axis)
    return low, high
