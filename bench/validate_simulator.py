"""Check the step-time simulator (`megatron-dots simulate-schedule`) against real CPU runs.

1. Calibrate (one process): forward and backward milliseconds per layer and micro-batch, from
   timed `forward_backward` steps of the whole model (forward-only steps give the forward
   share), all layers identical MoE layers.
2. Measure (torchrun, gloo, one process per pipeline rank, one thread each): the same model
   under pipeline parallelism, 1F1B (PP=2) and interleaved 1F1B (PP=2 x VPP=2); per step the
   wall time and, per rank, the bubble = 1 - process CPU time / wall time (a gloo receive
   sleeps, so CPU time is the rank's busy time). The p2p time is measured by a ping-pong of
   one activation.
3. Simulate the same schedules with those per-layer times and compare step time and bubble.

The simulator's all-to-all overlap cannot be checked on CPU (gloo blocks; nothing runs
concurrently): that is what `bench/a2a_overlap_bench.py` measures on a GPU.

    python bench/validate_simulator.py --markdown --out bench/results/simulator_cpu.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

LAYOUTS = {"1f1b": dict(pp=2, vpp=None), "interleaved": dict(pp=2, vpp=2)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="MoE layers (no dense layer)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--iters", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--schedules", default=",".join(LAYOUTS),
                        help=f"comma-separated subset of {', '.join(LAYOUTS)}")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--out", default=None, help="JSON report path")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # torchrun mode
    args = parser.parse_args(argv)
    args.schedules = [s for s in args.schedules.split(",") if s]
    unknown = sorted(set(args.schedules) - set(LAYOUTS))
    if unknown:
        parser.error(f"--schedules: unknown {', '.join(unknown)}")
    if args.layers % 4:
        parser.error("--layers must be a multiple of 4 (PP=2 x VPP=2 chunks of equal size)")
    return args


def dots_overrides(args) -> dict:
    heads = max(1, args.hidden // 64)
    return dict(num_layers=args.layers, first_k_dense=0, hidden_size=args.hidden,
                num_attention_heads=heads, num_query_groups=heads, kv_channels=64,
                ffn_hidden_size=2 * args.hidden, moe_ffn_hidden_size=args.hidden // 2,
                num_moe_experts=8, moe_router_topk=2, max_position_embeddings=max(256, args.seq))


def build_chunks(args, pp: int, vpp):
    import megatron_dots  # noqa: F401
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_dots.compat.distributed import init_distributed
    from megatron_dots.config import DotsConfig
    from megatron_dots.model import build_dots_model_chunks
    from megatron_dots.training.step import wrap_with_ddp

    init_distributed()
    parallel_state.initialize_model_parallel(1, pp, virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(1234)
    dc = DotsConfig.preset("dots-tiny", **dots_overrides(args))
    config = dc.to_transformer_config(pipeline_model_parallel_size=pp,
                                      virtual_pipeline_model_parallel_size=vpp,
                                      params_dtype=torch.float32, pipeline_dtype=torch.float32,
                                      batch_p2p_comm=False)
    return dc, wrap_with_ddp(build_dots_model_chunks(dc, config, backend="grouped"), config)


def batches(args, vocab):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (args.micro_batch_size, args.seq + 1), generator=gen)
            for _ in range(args.micro_batches)]


def timed_steps(args, chunks, data, forward_only=False, warmup=None, iters=None):
    from megatron_dots.training.step import forward_backward

    warmup = args.warmup if warmup is None else warmup
    iters = args.iters if iters is None else iters
    walls, cpus = [], []
    for i in range(warmup + iters):
        wall, cpu = time.perf_counter(), time.process_time()
        forward_backward(chunks, data, args.seq, args.micro_batch_size, forward_only=forward_only)
        if i >= warmup:
            walls.append((time.perf_counter() - wall) * 1e3)
            cpus.append((time.process_time() - cpu) * 1e3)
    return walls, cpus


def calibrate(args) -> dict:
    """Per-layer, per-micro-batch forward / backward ms of a one-process run.

    Backward is the difference of a forward+backward and a forward-only step, so one noisy
    sample (a busy machine) could make it negative: after one untimed warm-up step the two
    kinds alternate for at least three rounds and the fastest of each is used, the sample
    least disturbed by other load."""
    from megatron_dots.training.step import forward_backward

    dc, chunks = build_chunks(args, 1, None)
    data = batches(args, dc.vocab_size)
    forward_backward(chunks, data, args.seq, args.micro_batch_size)
    fb, fwd = [], []
    for _ in range(max(3, args.iters)):
        fb += timed_steps(args, chunks, data, warmup=0, iters=1)[0]
        fwd += timed_steps(args, chunks, data, forward_only=True, warmup=0, iters=1)[0]
    per = args.micro_batches * args.layers
    forward, backward = min(fwd) / per, (min(fb) - min(fwd)) / per
    if backward <= 0:
        raise SystemExit(f"calibration: forward+backward ({min(fb):.1f} ms) was not slower than "
                         f"forward only ({min(fwd):.1f} ms); the machine is too busy to measure")
    return {"forward_ms": forward, "backward_ms": backward,
            "one_process_step_ms": statistics.median(fb)}


def worker(args) -> None:
    """torchrun mode: one pipeline rank of `args.worker`'s layout; rank 0 writes the JSON
    given by the environment variable VALIDATE_SIMULATOR_OUT."""
    layout = LAYOUTS[args.worker]
    dc, chunks = build_chunks(args, layout["pp"], layout["vpp"])
    rank = torch.distributed.get_rank()
    activation = torch.zeros(args.seq, args.micro_batch_size, args.hidden)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(10):  # ping-pong between the two stages
        if rank == 0:
            torch.distributed.send(activation, 1)
            torch.distributed.recv(activation, 1)
        else:
            torch.distributed.recv(activation, 0)
            torch.distributed.send(activation, 0)
    p2p_ms = (time.perf_counter() - start) * 1e3 / 20
    walls, cpus = timed_steps(args, chunks, batches(args, dc.vocab_size))
    mine = torch.tensor([statistics.median(walls), 1 - sum(cpus) / sum(walls), p2p_ms],
                        dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    if rank == 0:
        with open(os.environ["VALIDATE_SIMULATOR_OUT"], "w") as f:
            json.dump({"step_ms": max(g[0].item() for g in gathered),
                       "bubble": [g[1].item() for g in gathered],
                       "p2p_ms": statistics.mean(g[2].item() for g in gathered)}, f)
    # An orderly shutdown: a process exiting with gloo's threads alive may abort.
    torch.distributed.barrier()
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def measure(args, schedule: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "measured.json")
        env = dict(os.environ, VALIDATE_SIMULATOR_OUT=out, OMP_NUM_THREADS="1",
                   MEGATRON_DOTS_QUIET="1",
                   PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        flags = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--seq",
                 str(args.seq), "--micro-batch-size", str(args.micro_batch_size),
                 "--micro-batches", str(args.micro_batches), "--iters", str(args.iters),
                 "--warmup", str(args.warmup)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               os.path.abspath(__file__), "--worker", schedule, *flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}"
                               f"\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simulated(args, schedule: str, calibration: dict, p2p_ms: float):
    from megatron_dots.schedule import OpTimes, simulate

    layout = LAYOUTS[schedule]
    vpp = layout["vpp"] or 1
    # Whole layers as "attention" (no all-to-all: EP = 1).
    times = OpTimes(attention=calibration["forward_ms"], attention_bwd=calibration["backward_ms"],
                    dispatch=0.0, combine=0.0, experts=0.0, experts_dgrad=0.0,
                    experts_wgrad=0.0, shared=0.0, shared_bwd=0.0, p2p=p2p_ms)
    return simulate(schedule, times, pp=layout["pp"], vpp=layout["vpp"], ep=1,
                    micro_batches=args.micro_batches,
                    layers_per_chunk=args.layers // (layout["pp"] * vpp))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from common import host_info, markdown_table, write_report

    calibration = calibrate(args)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    print(f"calibration: forward {calibration['forward_ms']:.2f} ms, backward "
          f"{calibration['backward_ms']:.2f} ms per layer and micro-batch", flush=True)
    results = {}
    for schedule in args.schedules:
        measured = measure(args, schedule)
        sim = simulated(args, schedule, calibration, measured["p2p_ms"])
        bubble = sum(sim.bubble) / len(sim.bubble)
        results[schedule] = {
            "measured_step_ms": measured["step_ms"], "simulated_step_ms": sim.step_ms,
            "step_error": sim.step_ms / measured["step_ms"] - 1,
            "measured_bubble": measured["bubble"], "simulated_bubble": sim.bubble,
            "bubble_error": bubble - statistics.mean(measured["bubble"]),
            "p2p_ms": measured["p2p_ms"],
        }
        r = results[schedule]
        print(f"{schedule:>12}: step measured {r['measured_step_ms']:.1f} ms, simulated "
              f"{r['simulated_step_ms']:.1f} ms ({100 * r['step_error']:+.1f} %); bubble "
              f"measured {statistics.mean(r['measured_bubble']):.3f}, simulated {bubble:.3f}",
              flush=True)
    if args.markdown:
        print("\n" + markdown_table(
            ("schedule", "measured step ms", "simulated step ms", "error", "measured bubble",
             "simulated bubble"),
            [(name, f"{r['measured_step_ms']:.1f}", f"{r['simulated_step_ms']:.1f}",
              f"{100 * r['step_error']:+.1f} %", f"{statistics.mean(r['measured_bubble']):.3f}",
              f"{statistics.mean(r['simulated_bubble']):.3f}") for name, r in results.items()]))
    report = {"host": host_info(torch.device("cpu")), "setup": vars(args),
              "calibration": calibration, "results": results}
    if args.out:
        write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
