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

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_APEX = importlib.util.find_spec("apex") is not None


def check_supported() -> None:
    """Raise a clear error on a megatron-core release we have not verified."""
    if not (Version("0.16.1") <= MCORE_VERSION < Version("0.20")):
        raise ImportError(
            f"megatron-dots supports megatron-core >=0.16.1,<0.20; found {MCORE_VERSION}. "
            "Install a supported release, e.g. `pip install 'megatron-core>=0.16.1,<0.20'`."
        )
