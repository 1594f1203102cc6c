"""`megatron-dots plan --search`: every layout Megatron-Core can build on N GPUs, those that fit,
ranked by predicted step time.

Enumerated: TP over the divisors of the heads, query groups and FFN widths that fit in one node
(TP crosses no node: its collectives are per layer), PP over the divisors of the layer count,
VPP over the divisors of the layers per stage (with PP > 1), EP over the divisors of the expert
count, micro-batch sizes (the given one, or 1, 2, 4), and the all-to-all overlap where it
applies (EP > 1; VPP > 1 with PP > 1), always with sequence parallelism under TP and the
distributed optimizer unless the base layout says otherwise. `Layout.check` drops what
Megatron-Core would refuse. A layout whose activations do not fit is planned again with the
recompute planner at the budget the GPU leaves (`Allowance.planner_budget_gib`).
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

from ..config import DotsConfig
from .evaluate import LayoutPlan, plan_layout
from .hardware import Hardware
from .layout import Layout, LayoutError
from .memory import Allowance


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class SearchResult:
    gpus: int
    candidates: int  # layouts Megatron-Core can build
    plans: List[LayoutPlan] = field(default_factory=list)  # fitting, fastest first
    misfits: List[LayoutPlan] = field(default_factory=list)  # planned but not fitting

    @property
    def best(self) -> Optional[LayoutPlan]:
        return self.plans[0] if self.plans else None


def candidate_layouts(cfg: DotsConfig, base: Layout, gpus_per_node: int,
                      micro_batch_sizes: Sequence[int] = (1, 2, 4)) -> Iterator[Layout]:
    """Every valid layout on `base.gpus` GPUs, keeping base's batch, sequence, precision and
    optimizer settings."""
    tp_limit = min(gpus_per_node, base.gpus)
    for tp in (t for t in divisors(cfg.num_attention_heads) if t <= tp_limit):
        for pp in divisors(cfg.num_layers):
            if base.gpus % (tp * pp):
                continue
            vpps = [1] + ([v for v in divisors(cfg.num_layers // pp) if v > 1] if pp > 1 else [])
            for vpp in vpps:
                for ep in divisors(cfg.num_moe_experts):
                    for mbs in micro_batch_sizes:
                        overlaps = [False, True] if ep > 1 and (pp == 1 or vpp > 1) else [False]
                        for overlap in overlaps:
                            layout = base.replace(
                                tp=tp, pp=pp, vpp=vpp, ep=ep, micro_batch_size=mbs,
                                sequence_parallel=None, a2a_overlap=overlap,
                                delay_wgrad=overlap, recompute_budget_gib=None)
                            try:
                                yield layout.check(cfg)
                            except LayoutError:
                                continue


def _fitting_plan(cfg, layout, hw, gpu_memory_gib, allowance, routing_imbalance
                  ) -> Tuple[LayoutPlan, bool]:
    plan = plan_layout(cfg, layout, hw, gpu_memory_gib, allowance, routing_imbalance)
    if plan.fits or layout.recompute_budget_gib is not None:
        return plan, plan.fits
    budget = allowance.planner_budget_gib(gpu_memory_gib)
    replanned = plan_layout(cfg, layout.replace(recompute_budget_gib=budget), hw, gpu_memory_gib,
                            allowance, routing_imbalance)
    return (replanned, True) if replanned.fits else (plan, False)


def search(cfg: DotsConfig, base: Layout, hw: Hardware, gpu_memory_gib: float,
           allowance: Allowance = Allowance(), micro_batch_sizes: Sequence[int] = (1, 2, 4),
           routing_imbalance: float = 1.0, progress=None) -> SearchResult:
    """Plan every candidate layout; fitting ones fastest first."""
    layouts = list(candidate_layouts(cfg, base, hw.gpus_per_node, micro_batch_sizes))
    result = SearchResult(base.gpus, len(layouts))
    if progress is not None:
        progress.reset(total=len(layouts))
    for layout in layouts:
        plan, fits = _fitting_plan(cfg, layout, hw, gpu_memory_gib, allowance, routing_imbalance)
        (result.plans if fits else result.misfits).append(plan)
        if progress is not None:
            progress.update(1)
    result.plans.sort(key=lambda p: (p.step.step_time_s, p.worst.total_bytes))
    result.misfits.sort(key=lambda p: p.worst.total_bytes)
    return result


def smallest_fitting_gpus(cfg: DotsConfig, base: Layout, hw: Hardware, gpu_memory_gib: float,
                          allowance: Allowance = Allowance(), max_doublings: int = 8
                          ) -> Optional[int]:
    """The fewest GPUs (the given count doubled, up to 2^max_doublings times) on which some
    layout with micro-batch size 1 fits; None when none does."""
    gpus = base.gpus
    for _ in range(max_doublings):
        gpus *= 2
        trial = base.replace(gpus=gpus)
        for layout in candidate_layouts(cfg, trial, hw.gpus_per_node, (1,)):
            if layout.a2a_overlap:
                continue
            if _fitting_plan(cfg, layout, hw, gpu_memory_gib, allowance, 1.0)[1]:
                return gpus
    return None
