"""megatron-dots: dots.llm1-style MoE language models on Megatron-Core.

Public API: `DotsConfig`, `build_dots_model`, `__version__`. Importing the package applies the
runtime patches of `megatron_dots.compat` (and the CPU backend when CUDA is unavailable).
"""

from ._version import __version__
from . import compat

compat.install()

from .config import DotsConfig, DotsConfigError  # noqa: E402
from .model import build_dots_model  # noqa: E402

__all__ = ["DotsConfig", "DotsConfigError", "build_dots_model", "__version__"]
