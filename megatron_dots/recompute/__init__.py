"""Input-aware activation recompute (the Mimose idea, arXiv 2209.02478) for dots models.

`RecomputeController` predicts each micro-batch's activation memory from its shape with a
memory model fitted online (`memory_model`, measured by `measure`), and per step applies the
planner's cheapest per-layer recompute (`planner`, `layer`) that keeps this rank's predicted
peak (`schedule_order`) inside the budget left beside parameters, gradients and optimizer
state (`budget`).
"""

from .budget import activation_budget, static_bytes
from .controller import RecomputeController
from .layer import MODES, PlannedRecomputeLayer
from .memory_model import ActivationMemoryModel
from .planner import RecomputePlanner
from .shapes import MicroBatchShape

__all__ = [
    "ActivationMemoryModel",
    "MODES",
    "MicroBatchShape",
    "PlannedRecomputeLayer",
    "RecomputeController",
    "RecomputePlanner",
    "activation_budget",
    "static_bytes",
]
