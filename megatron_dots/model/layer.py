"""`DotsTransformerLayer`: Megatron-Core's TransformerLayer that also builds `DotsMoELayer` right.

Upstream (`megatron/core/transformer/transformer_layer.py`, TransformerLayer.__init__, 0.16 and
0.19) passes `pg_collection` only to MLP classes it lists by identity (`MoELayer`,
`SequentialMLP`, ...), so a MoELayer subclass would silently fall back to the global process
groups and log "Unknown MLP type" once per layer. This layer hands its own process groups to
the dots MoE block through the spec's params and drops that one log record while it builds.
"""

import dataclasses
import logging
from contextlib import contextmanager

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from .moe import DotsMoELayer

_UPSTREAM_LOGGER = logging.getLogger("megatron.core.transformer.transformer_layer")


class _DropUnknownMlpRecord(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


@contextmanager
def _without_unknown_mlp_record():
    flt = _DropUnknownMlpRecord()
    _UPSTREAM_LOGGER.addFilter(flt)
    try:
        yield
    finally:
        _UPSTREAM_LOGGER.removeFilter(flt)


class DotsTransformerLayer(TransformerLayer):
    """TransformerLayer whose dots MoE block gets the layer's process groups."""

    def __init__(self, config, submodules, *args, pg_collection=None, **kwargs):
        mlp = submodules.mlp
        if not (isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type)
                and issubclass(mlp.module, DotsMoELayer)):
            super().__init__(config, submodules, *args, pg_collection=pg_collection, **kwargs)
            return
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        mlp = ModuleSpec(
            module=mlp.module,
            params={**mlp.params, "pg_collection": pg_collection},
            submodules=mlp.submodules,
        )
        submodules = dataclasses.replace(submodules, mlp=mlp)
        with _without_unknown_mlp_record():
            super().__init__(config, submodules, *args, pg_collection=pg_collection, **kwargs)
