"""The all-to-all share of the MoE-layer time in real pretrain runs (`--dots-a2a-timing`), with
and without `--dots-a2a-overlap`: the GPU suite's `a2a_timing` step.

Runs `examples/pretrain_dots.py` once per schedule (plain, then overlap) under torchrun on
--nproc processes, expert parallelism over all of them, with `--dots-a2a-timing` writing a CSV,
and reports per schedule the mean over MoE layers and log intervals (the first interval, with
the start-up, is left out when there are more) of dispatch, combine, MoE-layer and exposed
milliseconds per iteration, the a2a share (dispatch + combine) / MoE layer and the exposed
share exposed / MoE layer (see `megatron_dots/telemetry/a2a_timing.py` for how each is
measured; forward passes only). The paper's check is an exposed share under 40 % with the
overlap.

The overlap needs expert parallelism, so on a machine with one GPU only the plain run is made
(EP 1: the "all-to-all" is a local copy) and the overlap is reported as not run. On CPU
(gloo, 2 processes by default) the script is a smoke test: collectives block, so exposed =
dispatch + combine there.

    python bench/a2a_timing_bench.py --markdown --out bench/results/a2a_timing.json
"""

import argparse
import csv
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import host_info, markdown_table, write_report  # noqa: E402

SCHEDULES = {"plain": [], "overlap": ["--dots-a2a-overlap"]}
MS = ("dispatch_ms", "combine_ms", "moe_ms", "exposed_ms")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dots-mini", help="--dots-model preset")
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count() if cuda else 2,
                        help="processes (GPUs); expert parallel size = this (default: all GPUs; "
                        "2 on CPU)")
    parser.add_argument("--seq", type=int, default=4096, help="--seq-length")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="micro-batches per rank and iteration")
    parser.add_argument("--iters", type=int, default=6, help="--train-iters")
    parser.add_argument("--log-interval", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--timeout-s", type=float, default=600, help="per run")
    parser.add_argument("--work", default=None, help="run folder (default: next to --out)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "a2a_timing.json"))
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return parser.parse_args(argv)


def pretrain_argv(args, schedule: str, csv_path: str):
    cuda = torch.cuda.is_available()
    flags = ["--dots-model", args.model, "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.micro_batch_size * args.micro_batches * args.nproc),
             "--seq-length", str(args.seq), "--train-iters", str(args.iters),
             "--lr", "3e-4", "--mock-data", "--tokenizer-type", "NullTokenizer",
             "--vocab-size", str(args.vocab_size), "--log-interval", str(args.log_interval),
             "--eval-iters", "0", "--expert-model-parallel-size", str(args.nproc),
             "--dots-a2a-timing", "--dots-a2a-timing-csv", csv_path, *SCHEDULES[schedule]]
    if cuda:
        flags += ["--bf16", "--dots-expert-backend", "grouped"]
    script = os.path.join(ROOT, "examples", "pretrain_dots.py")
    if args.nproc == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), script, *flags]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(csv_path: str) -> dict:
    """Mean over layers and log intervals (all but the first when there are more)."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    iterations = sorted({int(r["iteration"]) for r in rows})
    kept = iterations[1:] if len(iterations) > 1 else iterations
    used = [r for r in rows if int(r["iteration"]) in kept]
    mean = {k: sum(float(r[k]) for r in used) / len(used) for k in MS}
    moe = mean["moe_ms"]
    return {"status": "ok", **mean,
            "a2a_share": (mean["dispatch_ms"] + mean["combine_ms"]) / moe if moe else None,
            "exposed_share": mean["exposed_ms"] / moe if moe else None,
            "layers": len({r["layer"] for r in used}), "intervals": kept}


def run_schedule(args, schedule: str, work: str) -> dict:
    if schedule == "overlap" and args.nproc < 2:
        return {"status": "not run: --dots-a2a-overlap needs expert parallelism (2+ GPUs, "
                          f"found {args.nproc})"}
    csv_path = os.path.join(work, f"{schedule}.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    start = time.time()
    with open(os.path.join(work, f"{schedule}.log"), "w") as log:
        try:
            proc = subprocess.run(pretrain_argv(args, schedule, csv_path), stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": f"timed out after {args.timeout_s:.0f} s"}
    if proc.returncode != 0 or not os.path.isfile(csv_path):
        return {"status": f"failed (exit code {proc.returncode}, see {schedule}.log)"}
    return {**summarize(csv_path), "seconds": round(time.time() - start, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or os.path.join(os.path.dirname(os.path.abspath(args.out)), "a2a_timing")
    os.makedirs(work, exist_ok=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    results = {}
    for schedule in SCHEDULES:
        print(f"== {schedule}", flush=True)
        results[schedule] = run_schedule(args, schedule, work)
        print(f"   {results[schedule]}", flush=True)
    report = {"host": host_info(device), "nproc": args.nproc, "expert_parallel": args.nproc,
              "shapes": {"model": args.model, "seq": args.seq,
                         "micro_batch_size": args.micro_batch_size,
                         "micro_batches": args.micro_batches, "iters": args.iters},
              "results": results}
    write_report(report, args.out)
    if args.markdown:
        rows = [[name, r["status"], *(f"{r[k]:.3f}" if r.get(k) is not None else "-"
                                      for k in (*MS, "a2a_share", "exposed_share"))]
                for name, r in results.items()]
        print(markdown_table(["schedule", "status", *MS, "a2a share", "exposed share"], rows))
    return 0 if all(r["status"] == "ok" or r["status"].startswith("not run")
                    for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
