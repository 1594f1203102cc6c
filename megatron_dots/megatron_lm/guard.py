"""Check that a model Megatron-LM built holds the dots modules (no silent stock model)."""

from ..model.moe import DotsMoELayer
from ..model.router import DotsRouter
from .arguments import DotsArgumentError


def check_dots_modules(chunks) -> int:
    """Raise DotsArgumentError unless every MoE layer of `chunks` (a model or a list of model
    chunks, wrapped or not) is a `DotsMoELayer` with a `DotsRouter`; returns their number
    (0 for a pipeline stage holding dense layers only)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    found, stock = 0, []
    for chunk in chunks if isinstance(chunks, (list, tuple)) else [chunks]:
        for name, module in chunk.named_modules():
            if isinstance(module, MoELayer):
                if isinstance(module, DotsMoELayer) and isinstance(module.router, DotsRouter):
                    found += 1
                else:
                    stock.append(f"{name} ({type(module).__name__}, router "
                                 f"{type(module.router).__name__})")
    if stock:
        raise DotsArgumentError(
            f"the model Megatron-LM built is not a dots model: stock MoE layers "
            f"{', '.join(stock[:3])}{' ...' if len(stock) > 3 else ''}. Was --spec megatron_dots.megatron_lm.spec dots_spec importable by this Python?")
    return found
