"""Which megatron-core and optional accelerators are installed.

The one place that reads versions; everything else asks the flags defined here instead of
comparing version strings itself.
"""

import importlib.util

from packaging.version import Version

import megatron.core

MCORE_VERSION = Version(megatron.core.__version__)
MCORE_016 = Version("0.16") <= MCORE_VERSION < Version("0.17")
MCORE_AT_LEAST_019 = MCORE_VERSION >= Version("0.19")
# Verified releases: 0.16.1 (Megatron-LM core_v0.16.1), 0.19.x (core_v0.19.0, PyPI 0.19.2) and
# 0.20.0 (Megatron-LM main d98e8a6, not on the package index).
SUPPORTED = (Version("0.16.1"), Version("0.21"))

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_APEX = importlib.util.find_spec("apex") is not None


def check_supported() -> None:
    """Raise a clear error on a megatron-core release we have not verified."""
    low, high = SUPPORTED
    if not (low <= MCORE_VERSION < high):
        raise ImportError(
            f"megatron-dots supports megatron-core >={low},<{high}; found {MCORE_VERSION} "
            f"({megatron.core.__file__}). Install a supported release, e.g. "
            f"`pip install 'megatron-core>={low},<{high}'`."
        )
