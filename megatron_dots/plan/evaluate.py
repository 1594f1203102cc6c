"""One layout planned: every rank's memory against the GPU and the predicted step, as the
`{"layouts": [...]}` entries of `megatron-dots plan --json`."""

from dataclasses import dataclass
from typing import Dict, List

from ..config import DotsConfig
from ..recompute.budget import GIB
from .hardware import Hardware
from .layout import Layout
from .memory import Allowance, RankMemory, rank_memories
from .step_time import StepPrediction, predict_step


@dataclass
class LayoutPlan:
    cfg: DotsConfig
    layout: Layout
    gpu_memory_gib: float
    ranks: List[RankMemory]
    step: StepPrediction

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total_bytes)

    @property
    def fits(self) -> bool:
        planner_ok = all(getattr(r.activations, "fits_budget", True) for r in self.ranks)
        return planner_ok and self.worst.total_bytes <= self.gpu_memory_gib * GIB

    def why_not(self) -> str:
        """Why the layout does not fit ('' when it does)."""
        worst = self.worst
        if not all(getattr(r.activations, "fits_budget", True) for r in self.ranks):
            return (f"--dots-recompute-budget-gb {self.layout.recompute_budget_gib:g}: even full "
                    f"recompute exceeds it on {worst.label()}")
        if worst.total_bytes > self.gpu_memory_gib * GIB:
            return (f"{worst.label()} needs {worst.total_bytes / GIB:.1f} GiB of "
                    f"{self.gpu_memory_gib:g}")
        return ""

    def to_dict(self) -> Dict:
        total, active = self.cfg.num_parameters()
        step = self.step.to_dict()
        kinds = []
        for rank in self.ranks:
            kinds.append(rank.to_dict())
        return {
            "flags": self.layout.pretrain_flags(),
            "layout": self.layout.to_dict(),
            "fits": self.fits,
            "worst_rank": self.worst.label(),
            "worst_rank_memory_gib": self.worst.total_bytes / GIB,
            "gpu_memory_gib": self.gpu_memory_gib,
            "step_time_s": self.step.step_time_s,
            "mfu": self.step.mfu,
            "tokens_per_s_per_gpu": self.step.tokens_per_s_per_gpu,
            "gpu_hours_per_trillion_tokens": self.step.gpu_hours_per_trillion_tokens,
            "total_parameters": total,
            "active_parameters": active,
            "per_rank": kinds,
            "step": step,
        }


def plan_layout(cfg: DotsConfig, layout: Layout, hw: Hardware, gpu_memory_gib: float,
                allowance: Allowance = Allowance(), routing_imbalance: float = 1.0) -> LayoutPlan:
    """Memory and step time of one (checked) layout."""
    layout.check(cfg)
    ranks = rank_memories(cfg, layout, allowance, routing_imbalance=routing_imbalance)
    recompute = max(r.activations.recompute_flops for r in ranks)
    optimizer = max(r.static.optimizer_bytes for r in ranks)
    step = predict_step(cfg, layout, hw, recompute_flops_per_rank=recompute,
                        optimizer_state_bytes=optimizer,
                        overlap_grad_sync=layout.overlap_grad_reduce,
                        routing_imbalance=routing_imbalance)
    return LayoutPlan(cfg, layout, gpu_memory_gib, ranks, step)
