"""`megatron-dots plan --png`: per-rank memory bars against the GPU's limit, and the simulated
timeline of the (best) layout's MoE layers."""

from ..recompute.budget import GIB
from ..schedule.simulate_cli import draw_timeline, timeline_legend
from .evaluate import LayoutPlan
from .report import ITEMS

COLORS = {"parameters": "#4c72b0", "gradients": "#55a868", "optimizer": "#c44e52",
          "activations": "#8172b2", "logits_and_loss": "#ccb974", "a2a_buffers": "#64b5cd",
          "context": "#8c8c8c", "fragmentation": "#c7c7c7"}


def draw_plan(plan: LayoutPlan, png: str) -> str:
    from ..telemetry.plots import new_figure, save_png

    pp = plan.layout.pp
    fig = new_figure(width=15.0, height=2.5 + 0.9 * pp)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3]})
    bottoms = [0.0] * pp
    for item in ITEMS:
        values = [rank.breakdown()[item] / GIB for rank in plan.ranks]
        left.bar(range(pp), values, bottom=bottoms, color=COLORS[item], label=item)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    left.axhline(plan.gpu_memory_gib, color="black", linestyle="--", linewidth=1)
    left.text(-0.4, plan.gpu_memory_gib, f" GPU {plan.gpu_memory_gib:g} GiB", va="bottom",
              fontsize=8)
    left.set_xticks(range(pp), [f"pp {r}" for r in range(pp)])
    left.set_ylabel("GiB per GPU")
    left.set_title(f"{plan.layout.describe()}: "
                   + ("fits" if plan.fits else "does not fit"), fontsize=9)
    left.legend(fontsize=7, loc="upper center", ncol=2, bbox_to_anchor=(0.5, -0.1))
    draw_timeline(right, plan.step.sim)
    right.set_xlabel(f"ms: the MoE layers of the first {plan.step.sim_micro_batches} of "
                     f"{plan.layout.num_micro_batches} micro-batches per step, as simulated "
                     "(forward solid, backward light)")
    timeline_legend(fig)
    return save_png(fig, png)
