"""A rank's memory against its GPU: the exact static bytes (`static_memory`), the analytic
activations (`activations`), and a stated allowance for what neither counts.

The allowance is `Allowance.context_gib` fixed bytes (the CUDA context, cuBLAS / NCCL
workspaces and communicator buffers: about 1-2 GiB on an H100 with NCCL) plus
`Allowance.fragmentation` of everything else (the caching allocator's fragmentation; PyTorch's
own guidance and Megatron-LM's practice put it at 5-15% for long runs with varying shapes).
Both are flags of `megatron-dots plan`.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config import DotsConfig
from ..recompute.budget import GIB
from .activations import ActivationMemory, rank_activation_memory
from .layout import Layout
from .static_memory import StaticMemory, rank_static_memory


@dataclass(frozen=True)
class Allowance:
    """What the plan adds for memory no model counts (see module docstring)."""

    context_gib: float = 1.5
    fragmentation: float = 0.10

    def __post_init__(self):
        if self.context_gib < 0:
            raise ValueError(f"--context-gb must be >= 0, got {self.context_gib}")
        if not 0 <= self.fragmentation < 1:
            raise ValueError(f"--fragmentation must lie in [0, 1), got {self.fragmentation}")

    def planner_budget_gib(self, gpu_memory_gib: float) -> float:
        """The --dots-recompute-budget-gb that leaves this allowance free on the GPU (rounded
        down to 0.5 GiB): the planner's budget covers parameters, gradients, optimizer state
        and activations."""
        usable = (gpu_memory_gib - self.context_gib) * (1 - self.fragmentation)
        return max(0.5, int(usable * 2) / 2)


@dataclass
class RankMemory:
    """One pipeline rank's memory (every TP / EP / DP peer on that stage holds the same)."""

    pp_rank: int
    layers: List[range]  # layers of each model chunk
    static: StaticMemory
    activations: ActivationMemory
    allowance: Allowance

    @property
    def counted_bytes(self) -> float:
        a = self.activations
        return (self.static.total() + a.peak_bytes + a.logits_and_loss_bytes
                + a.a2a_buffer_bytes)

    def breakdown(self) -> Dict[str, float]:
        """Bytes per item; the items sum to `total_bytes`."""
        a = self.activations
        return {
            "parameters": float(self.static.param_bytes + self.static.param_padding_bytes),
            "gradients": float(self.static.grad_bytes),
            "optimizer": float(self.static.optimizer_bytes),
            "activations": float(a.peak_bytes),
            "logits_and_loss": float(a.logits_and_loss_bytes),
            "a2a_buffers": float(a.a2a_buffer_bytes),
            "context": self.allowance.context_gib * GIB,
            "fragmentation": self.allowance.fragmentation * self.counted_bytes,
        }

    @property
    def total_bytes(self) -> float:
        return sum(self.breakdown().values())

    def label(self) -> str:
        chunks = ", ".join(f"{r.start + 1}-{r.stop}" for r in self.layers)
        return f"pp rank {self.pp_rank} (layers {chunks})"

    def to_dict(self) -> Dict:
        out = {"pp_rank": self.pp_rank, "label": self.label(),
               "layers": [[r.start + 1, r.stop] for r in self.layers],
               "total_gib": self.total_bytes / GIB,
               "breakdown_gib": {k: v / GIB for k, v in self.breakdown().items()},
               "parameters": self.static.parameters,
               "expert_parameters": self.static.expert_parameters,
               "activation_detail": self.activations.to_dict()}
        return out


def rank_memories(cfg: DotsConfig, layout: Layout, allowance: Allowance = Allowance(),
                  attention: str = "flash", routing_imbalance: float = 1.0,
                  ) -> List[RankMemory]:
    """Every pipeline rank's memory under `layout` (its planner budget, if any, applied)."""
    out = []
    for pp_rank in range(layout.pp):
        static = rank_static_memory(cfg, layout, pp_rank,
                                    overlap_grad_reduce=layout.overlap_grad_reduce)
        budget: Optional[float] = None
        if layout.recompute_budget_gib is not None:
            budget = layout.recompute_budget_gib * GIB - static.total()
        activations = rank_activation_memory(cfg, layout, pp_rank, activation_budget_bytes=budget,
                                             attention=attention,
                                             routing_imbalance=routing_imbalance)
        out.append(RankMemory(pp_rank, layout.stage_layers(cfg, pp_rank), static, activations,
                              allowance))
    return out
