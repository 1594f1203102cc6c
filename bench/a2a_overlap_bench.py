"""How much expert all-to-all the overlap schedule hides, measured on one GPU.

One GPU has no expert-parallel peers, so the all-to-all is emulated: the token dispatcher's
`all_to_all` (Megatron-Core `transformer/moe/token_dispatcher.py`, called for dispatch and
combine, forward and backward) is replaced by a copy plus a timed kernel
(`torch.cuda._sleep`, calibrated) on the stream the schedule issues it on, lasting

    bytes sent off the GPU / link bandwidth = numel x element size x (E-1)/E / --link-gbps

for an emulated expert-parallel size E (--emulated-ep). Like NCCL's kernels it occupies the
communication stream, not the compute SMs, so the schedule hides it exactly as far as it
overlaps communication with compute. The model is one EP rank's view of a dots layer stack:
every layer MoE (--layers), --experts local experts (dots.llm1 at EP 8: 128 / 8 = 16) with the
preset's top-k, hidden and FFN sizes, shared experts included.

For each schedule (plain: Megatron-Core's 1F1B without pipelining; overlap: --dots-a2a-overlap;
overlap-delay-wgrad: with delayed expert wgrad) it times forward+backward of
--micro-batches micro-batches with the emulated all-to-all and with a free one (same model):

    exposed all-to-all = step(with) - step(free)
    MoE-layer time     = step(free) + all-to-all issued      (all layers are MoE layers)
    exposed share      = exposed / MoE-layer time            (the paper's check: < 40 %)

as the step-time simulator (`megatron-dots simulate-schedule`) defines them. On CPU the script
runs (the tests use it as a smoke test) but measures nothing useful: CPU work is synchronous,
so every emulated all-to-all is exposed.

    python bench/a2a_overlap_bench.py --markdown --out bench/results/a2a_overlap.json
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (  # noqa: E402
    build,
    free_memory,
    host_info,
    markdown_table,
    sync,
    write_report,
)

SCHEDULES = ("plain", "overlap", "overlap-delay-wgrad")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dots.llm1", help="DotsConfig preset (layer sizes)")
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (no dense layer)")
    parser.add_argument("--experts", type=int, default=16,
                        help="experts on the GPU: the preset's experts / emulated EP")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="small, so the layers dominate the step")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=8, help="per step")
    parser.add_argument("--link-gbps", type=float, default=50.0,
                        help="all-to-all bandwidth per GPU in GB/s (default 50)")
    parser.add_argument("--emulated-ep", type=int, default=8,
                        help="expert-parallel size whose off-GPU share (E-1)/E is sent")
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help=f"comma-separated subset of {', '.join(SCHEDULES)}")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--expert-backend", default="auto",
                        choices=("auto", "te", "grouped", "sequential"))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--out", default=None, help="JSON report path")
    args = parser.parse_args(argv)
    args.schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = sorted(set(args.schedules) - set(SCHEDULES))
    if unknown:
        parser.error(f"--schedules: unknown {', '.join(unknown)} (choose from "
                     f"{', '.join(SCHEDULES)})")
    if args.emulated_ep < 2:
        parser.error("--emulated-ep must be >= 2 (an EP size of 1 sends nothing)")
    if args.link_gbps <= 0:
        parser.error("--link-gbps must be positive")
    return args


# ------------------------------------------------------------------ emulated all-to-all
class EmulatedAllToAll:
    """Stand-in for the dispatcher's `all_to_all(group, input, output_splits, input_splits)`
    on a single-rank group: the tensor comes back copied after a delay proportional to the
    bytes an EP rank would send; `enabled=False` makes it free (copy only)."""

    def __init__(self, link_gbps: float, emulated_ep: int, device: torch.device):
        self.bytes_per_ms = link_gbps * 1e6 * emulated_ep / (emulated_ep - 1)
        self.enabled = True
        self.issued_ms = 0.0
        self.cycles_per_ms = calibrate_sleep(device) if device.type == "cuda" else None

    def delay(self, tensor: torch.Tensor) -> None:
        if not self.enabled:
            return
        ms = tensor.numel() * tensor.element_size() / self.bytes_per_ms
        self.issued_ms += ms
        if self.cycles_per_ms is not None:
            torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms)))
        else:
            time.sleep(ms / 1e3)

    def __call__(self, group, input, output_split_sizes=None, input_split_sizes=None, *args,
                 **kwargs):
        if group is not None and group.size() != 1:
            raise RuntimeError("the emulated all-to-all only stands in for a 1-rank EP group")
        return _DelayedCopy.apply(input, self)


class _DelayedCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, emulator):
        ctx.emulator = emulator
        emulator.delay(tensor)
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.emulator.delay(grad)
        return grad.clone(), None


def calibrate_sleep(device) -> float:
    """GPU clock cycles of `torch.cuda._sleep` per millisecond on `device`."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(3):
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        samples.append(cycles / start.elapsed_time(end))
    return statistics.median(samples)


def install_emulator(emulator) -> None:
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.all_to_all = emulator


# ------------------------------------------------------------------ measurement
def configure_schedule(schedule):
    def configure(config):
        if schedule != "plain":
            # EP is 1 here (the all-to-all is emulated), which enable_a2a_overlap rejects as
            # pointless on a real run; set the two fields it sets.
            config.overlap_moe_expert_parallel_comm = True
            config.delay_wgrad_compute = schedule == "overlap-delay-wgrad"
    return configure


def time_steps(args, chunks, batches, device, iters):
    from megatron_dots.training.step import forward_backward

    times, losses = [], []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        losses.append(forward_backward(chunks, batches, args.seq, args.micro_batch_size))
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times, losses


def measure(args, schedule, emulator, batches):
    overrides = dict(num_layers=args.layers, first_k_dense=0, num_moe_experts=args.experts,
                     vocab_size=args.vocab_size)
    dc, cfg, chunks, _, device, dtype = build(args, overrides, configure_schedule(schedule))
    emulator.enabled = True
    time_steps(args, chunks, batches, device, args.warmup)
    first_issued = emulator.issued_ms
    with_a2a, losses = time_steps(args, chunks, batches, device, args.iters)
    issued_per_step = (emulator.issued_ms - first_issued) / args.iters
    emulator.enabled = False
    free, _ = time_steps(args, chunks, batches, device, args.iters)
    step_with, step_free = statistics.median(with_a2a), statistics.median(free)
    exposed = max(0.0, step_with - step_free)
    moe_layer_ms = step_free + issued_per_step
    result = {
        "step_ms": step_with, "step_free_a2a_ms": step_free,
        "a2a_issued_ms": issued_per_step, "exposed_a2a_ms": exposed,
        "hidden_share": 1 - exposed / issued_per_step if issued_per_step else None,
        "exposed_share_of_moe_layer": exposed / moe_layer_ms,
        "first_loss": losses[0],
        "overlap": bool(cfg.overlap_moe_expert_parallel_comm),
        "delay_wgrad": bool(cfg.delay_wgrad_compute),
        "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                     if device.type == "cuda" else None),
    }
    del chunks
    free_memory(device)
    return result, dtype, dc


def main(argv=None):
    args = parse_args(argv)
    import megatron_dots  # noqa: F401  (compat patches before Megatron-Core is used)
    from megatron_dots.compat.distributed import default_device

    device = default_device()
    if device.type == "cuda" and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
        print("WARNING: CUDA_DEVICE_MAX_CONNECTIONS=1 serialises the streams: nothing can "
              "overlap (unset it)", file=sys.stderr)
    emulator = EmulatedAllToAll(args.link_gbps, args.emulated_ep, device)
    install_emulator(emulator)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq + 1),
                             generator=gen).to(device) for _ in range(args.micro_batches)]
    results, dc, dtype = {}, None, None
    for schedule in args.schedules:
        results[schedule], dtype, dc = measure(args, schedule, emulator, batches)
        r = results[schedule]
        print(f"{schedule:>20}: step {r['step_ms']:.1f} ms (free all-to-all "
              f"{r['step_free_a2a_ms']:.1f} ms), all-to-all issued {r['a2a_issued_ms']:.1f} ms, "
              f"exposed {r['exposed_a2a_ms']:.1f} ms = {100 * r['exposed_share_of_moe_layer']:.1f}"
              f" % of MoE-layer time", flush=True)
    losses = [r["first_loss"] for r in results.values()]
    report = {
        "host": host_info(device), "dtype": dtype,
        "setup": {"model": args.model, "layers": args.layers, "experts": args.experts,
                  "hidden": dc.hidden_size, "moe_ffn": dc.moe_ffn_hidden_size,
                  "topk": dc.moe_router_topk, "shared_experts": dc.num_shared_experts,
                  "seq": args.seq, "micro_batch_size": args.micro_batch_size,
                  "micro_batches": args.micro_batches, "link_gbps": args.link_gbps,
                  "emulated_ep": args.emulated_ep, "expert_backend": args.expert_backend},
        "results": results,
        "first_loss_spread": max(losses) - min(losses),
        "note": ("CPU: synchronous, nothing can overlap" if device.type != "cuda" else
                 "all-to-all emulated by a timed kernel on the schedule's communication stream"),
    }
    if args.markdown:
        print("\n" + markdown_table(
            ("schedule", "step ms", "free-a2a step ms", "a2a issued ms", "exposed ms",
             "exposed / MoE-layer time"),
            [(name, f"{r['step_ms']:.1f}", f"{r['step_free_a2a_ms']:.1f}",
              f"{r['a2a_issued_ms']:.1f}", f"{r['exposed_a2a_ms']:.1f}",
              f"{100 * r['exposed_share_of_moe_layer']:.1f} %") for name, r in results.items()]))
    if args.out:
        write_report(report, args.out)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
