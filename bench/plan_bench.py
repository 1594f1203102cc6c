"""`megatron-dots plan` against real runs: planned vs measured memory and step time.

For each layout (`--layouts`, pretrain flags after the model's), the plan of exactly what
`pretrain` runs (`plan.from_pretrain.layout_from_pretrain_flags`: the same parser and
validation) and a short `examples/pretrain_dots.py` run of it on this machine's one device.
Measured: the allocator's peak (`mem-max-allocated-gib` of pretrain's log line, CUDA only) and
the median iteration time of the steps after the first two. Planned: the worst rank's counted
bytes (parameters, gradients, optimizer state, activations, logits and all-to-all buffers;
without the context / fragmentation allowance, which the allocator's peak does not see) and the
step time on the `--gpu` preset.

GPU (one H100 / H200, dots-mini; the GPU suite's `plan` step):

    python bench/plan_bench.py --gpu h200 --markdown --out /tmp/plan_bench.json

CPU smoke check (dots-tiny: the plumbing only; host memory is not the allocator's peak and
the CPU is not an H200, so nothing is compared):

    python bench/plan_bench.py --model dots-tiny --seq 64 --iters 3 --vocab-size 500 \\
        --out /tmp/plan_bench.json
"""

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from common import markdown_table, write_report  # noqa: E402

LAYOUTS = {
    "mbs1": ["--micro-batch-size", "1", "--global-batch-size", "4"],
    "mbs2-budget": ["--micro-batch-size", "2", "--global-batch-size", "4",
                    "--dots-recompute-budget-gb", "40"],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dots-mini", help="dots preset (default dots-mini)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--vocab-size", type=int, default=32000, help="NullTokenizer vocabulary")
    p.add_argument("--iters", type=int, default=8, help="training iterations per layout")
    p.add_argument("--gpu", default="h200", help="plan's hardware preset (default h200)")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--timeout-s", type=float, default=120, help="per run")
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--markdown", action="store_true", help="print a table")
    return p.parse_args(argv)


def pretrain_flags(args, name):
    flags = ["--dots-model", args.model, "--seq-length", str(args.seq), "--train-iters",
             str(args.iters), "--lr", "3e-4", "--mock-data", "--tokenizer-type",
             "NullTokenizer", "--vocab-size", str(args.vocab_size), "--log-interval", "1",
             "--eval-iters", "0", "--use-distributed-optimizer", *LAYOUTS[name]]
    if args.model != "dots-tiny":
        flags += ["--bf16", "--dots-expert-backend", "grouped"]
    elif "--dots-recompute-budget-gb" in flags:  # a budget dots-tiny at --seq 64 binds
        i = flags.index("--dots-recompute-budget-gb")
        flags[i + 1] = "0.02"
    return flags


def _values(log, key):
    out = []
    for line in log.splitlines():
        if "| consumed samples:" in line and f"{key}: " in line:
            out.append(float(line.split(f"{key}: ")[1].split(" ")[0].replace(",", "")))
    return out


def plan_of(flags, gpu):
    from megatron_dots.plan.evaluate import plan_layout
    from megatron_dots.plan.from_pretrain import layout_from_pretrain_flags
    from megatron_dots.plan.hardware import Hardware

    cfg, layout = layout_from_pretrain_flags(flags, gpus=1)
    hw = Hardware.preset(gpu)
    plan = plan_layout(cfg, layout, hw, hw.memory_gib)
    return {"counted_gib": plan.worst.counted_bytes / 2**30,
            "with_allowance_gib": plan.worst.total_bytes / 2**30,
            "step_time_s": plan.step.step_time_s, "fits": plan.fits,
            "breakdown_gib": {k: v / 2**30 for k, v in plan.worst.breakdown().items()}}


def measure(flags, timeout):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_dots.py"),
                           *flags], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, MEGATRON_DOTS_QUIET="1", PYTHONPATH=os.pathsep.join(
                              [ROOT, os.environ.get("PYTHONPATH", "")])))
    log = proc.stdout + proc.stderr
    times = _values(log, "elapsed time per iteration (ms)")
    peak = _values(log, "mem-max-allocated-gib")
    return {"rc": proc.returncode, "iterations": len(times),
            "step_time_s": statistics.median(times[2:]) / 1e3 if len(times) > 2 else None,
            "max_allocated_gib": max(peak) if peak else None,
            "log_tail": log[-1500:] if proc.returncode else ""}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = {}
    for name in args.layouts.split(","):
        flags = pretrain_flags(args, name)
        planned = plan_of(flags, args.gpu)
        measured = measure(flags, args.timeout_s)
        entry = {"flags": flags, "planned": planned, "measured": measured}
        if measured["max_allocated_gib"]:
            entry["memory_planned_over_measured"] = (planned["counted_gib"]
                                                     / measured["max_allocated_gib"])
        if measured["step_time_s"]:
            entry["step_planned_over_measured"] = (planned["step_time_s"]
                                                   / measured["step_time_s"])
        results[name] = entry
    report = {"model": args.model, "seq": args.seq, "gpu_preset": args.gpu, "results": results}
    write_report(report, args.out)
    if args.markdown:
        rows = [[name, f"{r['planned']['counted_gib']:.2f}",
                 r["measured"]["max_allocated_gib"], f"{r['planned']['step_time_s']:.3f}",
                 r["measured"]["step_time_s"]] for name, r in results.items()]
        print(markdown_table(["layout", "planned GiB", "measured GiB (allocator peak)",
                              "planned step s", "measured step s"], rows))
    return 0 if all(r["measured"]["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
