"""megatron-dots: dots.llm1-style MoE language models on Megatron-Core.

Public API: `DotsConfig`, `build_dots_model`, `__version__`. Importing the package applies the
runtime patches of `megatron_dots.compat` (and the CPU backend when CUDA is unavailable).

Anything that keeps the package from importing (an unsupported megatron-core, a missing
dependency) is raised as `MegatronDotsImportError`, a RuntimeError: Megatron-LM core_v0.19's
`--spec` loader ignores ImportErrors and would silently build its stock model instead of ours.
"""

from ._version import __version__


class MegatronDotsImportError(RuntimeError):
    """megatron-dots cannot be imported in this environment; the message says why."""


try:
    from . import compat

    compat.install()

    from .config import DotsConfig, DotsConfigError  # noqa: E402
    from .model import build_dots_model  # noqa: E402
except ImportError as _err:
    raise MegatronDotsImportError(f"megatron-dots {__version__} cannot be imported: {_err}") \
        from _err

__all__ = ["DotsConfig", "DotsConfigError", "MegatronDotsImportError", "build_dots_model",
           "__version__"]
