"""Import megatron-core without its missing-TE/apex warnings.

megatron-core warns once per module (about ten lines) when Transformer Engine or apex is
absent. On the TE-free path that is expected, so we import the modules we use with those
specific warnings filtered and report the situation once ourselves (see `backend_summary`).
"""

import importlib
import warnings

_UPSTREAM_MESSAGES = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*Transformer Engine is not installed.*",
    r".*TransformerEngine.*not installed.*",
    r".*nvidia-resiliency-ext.*",
    r".*Triton is not installed.*",
    r".*absl.logging is not installed.*",  # 0.19: megatron/core/hyper_comm_grid.py
)

_MODULES = (
    "megatron.core",
    "megatron.core.models.backends",
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
)


def import_megatron_quietly() -> None:
    with warnings.catch_warnings():
        for pattern in _UPSTREAM_MESSAGES:
            warnings.filterwarnings("ignore", message=pattern)
        for name in _MODULES:
            importlib.import_module(name)
