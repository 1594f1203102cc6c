"""The megatron-core API differences (0.16.x vs 0.19.x) that the dots model code meets.

* Expert modules in a spec: 0.16 `BackendSpecProvider.grouped_mlp_modules(grouped, legacy)`
  returns `(module class, submodules)`; 0.19 `grouped_mlp_modules(grouped)` returns a ready
  builder (`functools.partial`); an `MoESubmodules.experts` entry is a `ModuleSpec` on 0.16 (built
  with `build_module`) and a callable on 0.19. -> `experts_spec`, `experts_builder`.
* Process groups for MoE subclasses: 0.16 `transformer/transformer_layer.py`
  (TransformerLayer.__init__) passes `pg_collection` only to MLP classes it lists by identity
  (`MoELayer`, `SequentialMLP`, ...), so a `MoELayer` subclass silently falls back to the global
  groups and a WARNING "Unknown MLP type" is logged per layer; 0.19 passes `pg_collection` (and
  `is_mtp_layer`, `name`) to every MLP builder and instead logs "Rewrapping ModuleSpec" for
  `ModuleSpec(MLP)`. -> `DotsTransformerLayer`.
* Combined 1F1B layer plans (`models/common/model_chunk_schedule_plan.py`): the node that runs
  attention, the pre-MLP norm, the router and the dispatch preprocessing is
  `TransformerLayerSchedulePlan.attn` on 0.16 and `.pre_dispatch_computation` on 0.19.
  -> `pre_dispatch_node`.
* CUDA-graph scope: 0.16's default `cuda_graph_scope="full"` warns that it is deprecated;
  0.19 deprecates the field and names it `cuda_graph_modules`. -> `whole_layer_cuda_graph_kwargs`.
"""

import dataclasses
import logging
from contextlib import contextmanager

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from .versions import MCORE_AT_LEAST_019


def experts_spec(provider, grouped: bool):
    """The routed-experts entry of `MoESubmodules` for this backend provider."""
    if MCORE_AT_LEAST_019:
        return provider.grouped_mlp_modules(grouped)
    module, submodules = provider.grouped_mlp_modules(grouped, False)
    return ModuleSpec(module=module, submodules=submodules)


def experts_builder(module: type):
    """The routed-experts entry of `MoESubmodules` for our own experts class `module`
    (constructor ``(num_local_experts, config, submodules=None, pg_collection=None, name=None)``)."""
    return module if MCORE_AT_LEAST_019 else ModuleSpec(module=module)


def pre_dispatch_node(layer_plan):
    """The combined-1F1B node of `layer_plan` that ends with the dispatch preprocessing."""
    return layer_plan.pre_dispatch_computation if MCORE_AT_LEAST_019 else layer_plan.attn


def whole_layer_cuda_graph_kwargs() -> dict:
    """TransformerConfig kwargs meaning "CUDA graphs, if enabled, capture the whole layer"."""
    return {"cuda_graph_modules" if MCORE_AT_LEAST_019 else "cuda_graph_scope": []}


_UPSTREAM_LAYER_LOGGER = logging.getLogger("megatron.core.transformer.transformer_layer")
_EXPECTED_LAYER_RECORDS = ("Unknown MLP type", "Rewrapping ModuleSpec")


class _DropExpectedLayerRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_LAYER_RECORDS)


@contextmanager
def _without_expected_layer_records():
    flt = _DropExpectedLayerRecords()
    _UPSTREAM_LAYER_LOGGER.addFilter(flt)
    try:
        yield
    finally:
        _UPSTREAM_LAYER_LOGGER.removeFilter(flt)


class DotsTransformerLayer(TransformerLayer):
    """TransformerLayer whose MoE-subclass MLP gets the layer's process groups on any release.

    On 0.16 the groups travel in the MLP spec's params; on 0.19 upstream passes them itself.
    The upstream log records that our (intended) specs trigger are dropped while building.
    """

    def __init__(self, config, submodules, *args, pg_collection=None, **kwargs):
        mlp = submodules.mlp
        if not MCORE_AT_LEAST_019 and _is_moe_subclass_spec(mlp):
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups()
            mlp = ModuleSpec(
                module=mlp.module,
                params={**mlp.params, "pg_collection": pg_collection},
                submodules=mlp.submodules,
            )
            submodules = dataclasses.replace(submodules, mlp=mlp)
        with _without_expected_layer_records():
            super().__init__(config, submodules, *args, pg_collection=pg_collection, **kwargs)


def _is_moe_subclass_spec(mlp) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return (
        isinstance(mlp, ModuleSpec)
        and isinstance(mlp.module, type)
        and issubclass(mlp.module, MoELayer)
        and mlp.module is not MoELayer
    )
