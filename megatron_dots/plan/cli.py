"""`megatron-dots plan`: flags, and the run that plans one layout or searches them all."""

import argparse
import json
import os
import sys
from typing import List, Optional

from ..config import PRESETS, DotsConfig, DotsConfigError
from ..storage.atomic import atomic_write_text
from ..storage.progress import progress_bar
from .evaluate import LayoutPlan, plan_layout
from .from_pretrain import model_flags
from .hardware import HARDWARE_PRESETS, Hardware
from .layout import Layout, LayoutError
from .memory import Allowance
from .report import layout_report, run_lines, search_table
from .search import search, smallest_fitting_gpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dots plan",
        description="Predict per-GPU memory and step time of a dots training layout before "
        "a GPU is spent: parameters, gradients and optimizer state exactly, activations, "
        "pipeline in-flight micro-batches, all-to-all buffers, logits and an allowance; step "
        "time from the schedule simulator with roofline op times. --search ranks every layout "
        "Megatron-Core can build on --gpus GPUs.", allow_abbrev=False)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--dots-model", choices=sorted(PRESETS), help="a dots preset")
    model.add_argument("--hf", metavar="DIR", help="a Hugging Face dots1 model directory or "
                       "config.json (only the config is read)")
    gpu = parser.add_argument_group("cluster")
    gpu.add_argument("--gpus", type=int, required=True, help="GPUs of the run")
    gpu.add_argument("--gpu-memory-gb", type=float, default=None, metavar="GIB",
                     help="memory per GPU in GiB (default: the --gpu preset's)")
    gpu.add_argument("--gpu", default="h100", choices=sorted(HARDWARE_PRESETS),
                     help="hardware preset for the peaks below (default h100)")
    gpu.add_argument("--peak-tflops", type=float, default=None,
                     help="dense bf16 peak TFLOP/s per GPU (default: the preset's)")
    gpu.add_argument("--intra-node-gbps", type=float, default=None, metavar="GB/S",
                     help="per-GPU bandwidth inside a node, GB/s one way (NVLink; default: the "
                     "preset's)")
    gpu.add_argument("--inter-node-gbps", type=float, default=None, metavar="GB/S",
                     help="per-GPU bandwidth between nodes, GB/s one way (IB / RoCE; default: "
                     "the preset's)")
    gpu.add_argument("--gpus-per-node", type=int, default=None,
                     help="GPUs per node (default: the preset's, 8)")
    gpu.add_argument("--context-gb", type=float, default=Allowance.context_gib, metavar="GIB",
                     help="allowance for the CUDA context, cuBLAS / NCCL workspaces and buffers "
                     f"(default {Allowance.context_gib:g} GiB)")
    gpu.add_argument("--fragmentation", type=float, default=Allowance.fragmentation,
                     help="allowance for allocator fragmentation, a share of the counted bytes "
                     f"(default {Allowance.fragmentation:g})")
    gpu.add_argument("--routing-imbalance", type=float, default=1.0,
                     help="tokens the busiest expert-parallel rank receives, relative to an even "
                     "split (default 1.0: the bias-balanced expectation)")
    par = parser.add_argument_group("layout and batch (pretrain's flag names)")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1, dest="tp",
                     help="tensor (and expert-tensor) parallel size (default 1)")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1, dest="pp",
                     help="pipeline stages (default 1)")
    par.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                     dest="vpp", help="model chunks per pipeline rank")
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                     help="layers per model chunk (alternative to the flag above)")
    par.add_argument("--expert-model-parallel-size", type=int, default=1, dest="ep",
                     help="expert parallel size (default 1)")
    par.add_argument("--micro-batch-size", type=int, default=None,
                     help="sequences per micro-batch (default 1; --search tries 1, 2, 4)")
    par.add_argument("--global-batch-size", type=int, required=True,
                     help="sequences per step (the largest --dots-batch-stages batch)")
    par.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    par.add_argument("--sequence-parallel", action="store_true", default=None,
                     help="(on by default under TP)")
    par.add_argument("--bf16", action="store_true", help="bf16 weights (default)")
    par.add_argument("--fp16", action="store_true", help="fp16 weights")
    par.add_argument("--fp32", action="store_true", help="fp32 weights")
    par.add_argument("--use-distributed-optimizer", action="store_true", default=None,
                     help="(default on; --no-distributed-optimizer for the plain optimizer)")
    par.add_argument("--no-distributed-optimizer", action="store_true",
                     help="plan Megatron-Core's plain optimizer (Adam state on every replica)")
    par.add_argument("--overlap-grad-reduce", action="store_true",
                     help="gradient reduce-scatter during the backward in buckets (and, with "
                     "the distributed optimizer, --overlap-param-gather)")
    par.add_argument("--overlap-param-gather", action="store_true",
                     help="(implied by --overlap-grad-reduce here)")
    par.add_argument("--dots-a2a-overlap", action="store_true",
                     help="the all-to-all overlap schedule (pretrain's flag)")
    par.add_argument("--delay-wgrad-compute", action="store_true",
                     help="routed experts' weight gradients fill the backward dispatch's wait "
                     "(with --dots-a2a-overlap)")
    par.add_argument("--dots-recompute-budget-gb", type=float, default=None, metavar="GIB",
                     help="plan with the recompute planner at this budget")
    out = parser.add_argument_group("output")
    out.add_argument("--search", action="store_true",
                     help="rank every valid layout on --gpus GPUs (layout flags above ignored)")
    out.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    out.add_argument("--json", metavar="FILE", help='write {"layouts": [...]}, best first')
    out.add_argument("--png", metavar="FILE", help="memory per rank and the best layout's "
                     "simulated timeline")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _config(args) -> DotsConfig:
    if args.dots_model:
        return DotsConfig.preset(args.dots_model)
    return DotsConfig.from_hf_config(args.hf)


def _hardware(args) -> Hardware:
    overrides = {k: v for k, v in (("peak_tflops", args.peak_tflops),
                                   ("intra_node_gbps", args.intra_node_gbps),
                                   ("inter_node_gbps", args.inter_node_gbps),
                                   ("gpus_per_node", args.gpus_per_node),
                                   ("memory_gib", args.gpu_memory_gb)) if v is not None}
    return Hardware.preset(args.gpu, **overrides)


def _layout(args, cfg: DotsConfig) -> Layout:
    precisions = [p for p in ("bf16", "fp16", "fp32") if getattr(args, p)]
    if len(precisions) > 1:
        raise LayoutError(f"choose one of --{' / --'.join(precisions)}")
    vpp = args.vpp or 1
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per = args.num_layers_per_virtual_pipeline_stage
        if per < 1 or cfg.num_layers % (args.pp * per):
            raise LayoutError(f"--num-layers-per-virtual-pipeline-stage {per} x "
                              f"--pipeline-model-parallel-size {args.pp} does not divide "
                              f"num_layers {cfg.num_layers}")
        vpp = cfg.num_layers // (args.pp * per)
    if args.use_distributed_optimizer and args.no_distributed_optimizer:
        raise LayoutError("--use-distributed-optimizer and --no-distributed-optimizer conflict")
    return Layout(gpus=args.gpus, tp=args.tp, pp=args.pp, vpp=vpp, ep=args.ep,
                  micro_batch_size=args.micro_batch_size or 1,
                  global_batch_size=args.global_batch_size, seq_length=args.seq_length,
                  sequence_parallel=args.sequence_parallel,
                  distributed_optimizer=not args.no_distributed_optimizer,
                  overlap_grad_reduce=args.overlap_grad_reduce or args.overlap_param_gather,
                  precision=(precisions or ["bf16"])[0], a2a_overlap=args.dots_a2a_overlap,
                  delay_wgrad=args.delay_wgrad_compute,
                  recompute_budget_gib=args.dots_recompute_budget_gb)


def _write_json(path: str, plans: List[LayoutPlan], extra: Optional[dict] = None) -> None:
    body = {"layouts": [p.to_dict() for p in plans], **(extra or {})}
    atomic_write_text(path, json.dumps(body, indent=1) + "\n")


def run(args) -> int:
    cfg = _config(args)
    hw = _hardware(args)
    memory = hw.memory_gib
    allowance = Allowance(args.context_gb, args.fragmentation)
    base = _layout(args, cfg)
    if args.search:
        sizes = (args.micro_batch_size,) if args.micro_batch_size else (1, 2, 4)
        with progress_bar(0, "planning layouts", "layout", enabled=not args.no_progress) as bar:
            result = search(cfg, base, hw, memory, allowance, sizes, args.routing_imbalance,
                            progress=bar)
        for line in search_table(result, args.top):
            print(line)
        if not result.plans:
            more = smallest_fitting_gpus(cfg, base, hw, memory, allowance)
            hint = (f"the smallest GPU count (doubling --gpus) on which one fits is {more}"
                    if more else "no count up to 256x --gpus fits (or the global batch does "
                    "not divide over the data-parallel ranks)")
            print(f"error: no layout fits {args.gpus} GPUs of {memory:g} GiB; {hint}",
                  file=sys.stderr)
            if args.json:
                _write_json(args.json, result.misfits[:args.top], {"smallest_fitting_gpus": more})
            return 1
        best = result.best
        print()
        for line in layout_report(best) + run_lines(best, model_flags(cfg), hw.gpus_per_node):
            print(line)
        shown = result.plans[:args.top]
    else:
        best = plan_layout(cfg, base, hw, memory, allowance, args.routing_imbalance)
        for line in layout_report(best) + run_lines(best, model_flags(cfg), hw.gpus_per_node):
            print(line)
        shown = [best]
    if args.json:
        _write_json(args.json, shown)
        print(f"json: {args.json}")
    if args.png:
        from .figures import draw_plan

        print(f"png: {draw_plan(best, args.png)}")
    return 0 if best.fits else 1


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.gpus < 1:
        parser.error(f"--gpus {args.gpus}: must be at least 1")
    try:
        return run(args)
    except (LayoutError, DotsConfigError, ValueError) as err:
        parser.error(str(err))
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
