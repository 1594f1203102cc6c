"""What `megatron-dots plan` prints: one layout's per-rank memory and step prediction, the search
table, and the ready-to-run `pretrain` / sbatch lines of a layout."""

import shlex
from typing import List

from ..recompute.budget import GIB
from .evaluate import LayoutPlan
from .search import SearchResult

ITEMS = ("parameters", "gradients", "optimizer", "activations", "logits_and_loss", "a2a_buffers",
         "context", "fragmentation")


def memory_table(plan: LayoutPlan) -> List[str]:
    """Per pipeline rank: each memory item in GiB and the total against the GPU."""
    heads = ["params", "grads", "optim", "activ", "logits", "a2a", "context", "frag"]
    lines = [f"{'rank':34s}" + "".join(f"{h:>9s}" for h in heads) + f"{'total':>9s}  of "
             f"{plan.gpu_memory_gib:g} GiB"]
    worst = plan.worst
    for rank in plan.ranks:
        parts = rank.breakdown()
        mark = "  <- worst" if rank is worst else ""
        lines.append(f"{rank.label():34s}" + "".join(f"{parts[k] / GIB:9.2f}" for k in ITEMS)
                     + f"{rank.total_bytes / GIB:9.2f}{mark}")
    return lines


def _passes(n: int) -> str:
    return f"{n} micro-batch pass{'' if n == 1 else 'es'} (micro-batch x model chunk)"


def layout_report(plan: LayoutPlan) -> List[str]:
    layout, step = plan.layout, plan.step
    total, active = plan.cfg.num_parameters()
    lines = [f"layout: {layout.describe()} on {layout.gpus} GPUs "
             f"({layout.num_micro_batches} micro-batches of {layout.micro_batch_size} x "
             f"{layout.seq_length} tokens per step and data-parallel rank, schedule "
             f"{layout.schedule})",
             f"model: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active per token"]
    lines += memory_table(plan)
    for rank in plan.ranks:
        a = rank.activations
        if layout.recompute_budget_gib is not None:
            modes = ", ".join(f"{k} {v}" for k, v in sorted(a.recompute.items())
                              if v and k != "none")
            lines.append(f"  {rank.label()}: planner recomputes {modes or 'nothing'} "
                         f"(layer passes per step); {_passes(a.in_flight)} in flight")
        else:
            lines.append(f"  {rank.label()}: {_passes(a.in_flight)} in flight, no recompute")
    verdict = "fits" if plan.fits else f"DOES NOT FIT: {plan.why_not()}"
    lines.append(f"memory: worst {plan.worst.label()} {plan.worst.total_bytes / GIB:.1f} GiB "
                 f"of {plan.gpu_memory_gib:g}: {verdict}")
    lines.append(f"step: {step.step_time_s:.2f} s, MFU {100 * step.mfu:.1f}%, "
                 f"{step.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
                 f"{step.gpu_hours_per_trillion_tokens:,.0f} GPU hours per trillion tokens")
    return lines


def search_table(result: SearchResult, top: int) -> List[str]:
    lines = [f"{result.candidates} layouts Megatron-Core can build on {result.gpus} GPUs; "
             f"{len(result.plans)} fit"]
    if not result.plans:
        return lines
    lines.append(f"{'#':>3s}  {'layout':44s}{'step s':>8s}{'MFU':>7s}{'tok/s/GPU':>11s}"
                 f"{'GPU h/T':>10s}{'worst GiB':>11s}")
    for i, plan in enumerate(result.plans[:top], 1):
        s = plan.step
        lines.append(f"{i:3d}  {plan.layout.describe():44s}{s.step_time_s:8.2f}"
                     f"{100 * s.mfu:6.1f}%{s.tokens_per_s_per_gpu:11,.0f}"
                     f"{s.gpu_hours_per_trillion_tokens:10,.0f}"
                     f"{plan.worst.total_bytes / GIB:11.1f}")
    return lines


def run_lines(plan: LayoutPlan, model_flags: List[str], gpus_per_node: int) -> List[str]:
    """How to run the layout: `pretrain` flags and the sbatch geometry."""
    flags = model_flags + plan.layout.pretrain_flags()
    nodes = -(-plan.layout.gpus // gpus_per_node)
    per_node = min(gpus_per_node, plan.layout.gpus)
    return [
        "run it: torchrun --nnodes " + str(nodes) + f" --nproc-per-node {per_node} "
        "examples/pretrain_dots.py " + shlex.join(flags) + " --data-path ... --save ...",
        f"sbatch: #SBATCH --nodes={nodes} --ntasks-per-node={per_node} "
        f"--gpus-per-node={per_node}; pass the same flags (examples/slurm/dots_llm1.sbatch)",
    ]
