"""`megatron-dots simulate-schedule`: step time, bubble and exposed all-to-all of 1F1B,
interleaved 1F1B and the all-to-all-overlapped schedule from per-op times; PNG timeline, JSON."""

import argparse
import json
import os
import sys
from dataclasses import asdict, fields
from typing import List, Optional

from .simulator import COMM, SCHEDULES, OpTimes, SimResult, simulate

COLORS = {"attention": "#4c72b0", "experts": "#55a868", "shared": "#8172b2",
          "dispatch": "#dd8452", "combine": "#c44e52", "experts_wgrad": "#937860"}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="megatron-dots simulate-schedule",
        description=__doc__ + "\nTimes are milliseconds per layer and micro-batch (measure them "
        "with bench/layer_bench.py --profile, or on a real run).")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None,
                        help="virtual pipeline stages (model chunks) per rank")
    parser.add_argument("--ep", type=int, default=8,
                        help="expert-parallel size (1: no all-to-all)")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--layers-per-chunk", type=int, default=1,
                        help="MoE layers in each model chunk")
    parser.add_argument("--schedules", default=None,
                        help=f"comma-separated subset of {', '.join(SCHEDULES)} (default: those "
                        "that fit the sizes: 1f1b when vpp is unset, interleaved when pp, vpp >= 2, "
                        "overlap always)")
    parser.add_argument("--no-delay-wgrad", action="store_true",
                        help="overlap schedule without delayed expert weight gradients")
    for f in fields(OpTimes):
        default = f.default
        parser.add_argument("--" + f.name.replace("_", "-"), type=float, default=default,
                            help=f"ms per layer and micro-batch (default: {default}"
                            + (", from the forward time" if default is None else "") + ")")
    parser.add_argument("--times", default=None, metavar="JSON",
                        help="a JSON object of OpTimes fields (overrides the flags above)")
    parser.add_argument("--png", default=None, help="draw the timelines into this PNG")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    for name in ("pp", "ep", "micro_batches", "layers_per_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return parser, args


def op_times(args) -> OpTimes:
    values = {f.name: getattr(args, f.name) for f in fields(OpTimes)}
    if args.times:
        with open(args.times) as f:
            loaded = json.load(f)
        unknown = sorted(set(loaded) - set(values))
        if unknown:
            raise ValueError(f"{args.times}: unknown op time(s) {unknown}; known: "
                             f"{', '.join(values)}")
        values.update(loaded)
    return OpTimes(**values)


def default_schedules(pp: int, vpp: Optional[int]) -> List[str]:
    out = ["1f1b"] if not vpp or vpp == 1 else []
    if pp >= 2 and vpp and vpp >= 2:
        out.append("interleaved")
    return out + ["overlap"]


def draw_timeline(ax, res: SimResult) -> None:
    """One schedule's ops on `ax`: a compute and a comm row per pipeline rank."""
    ranks = max(op.rank for op in res.ops) + 1
    for op in res.ops:
        row = 2 * op.rank + (1 if op.stream == COMM else 0)
        base = op.name.replace("_bwd", "").replace("_dgrad", "")
        color = COLORS.get(op.name, COLORS.get(base, "#999999"))
        ax.barh(row, op.end - op.start, left=op.start, height=0.8, color=color,
                alpha=0.55 if op.kind == "B" else 1.0, edgecolor="none")
    ax.set_yticks(range(2 * ranks),
                  [f"rank {r} {s}" for r in range(ranks) for s in ("compute", "a2a")])
    ax.invert_yaxis()
    s = res.summary()
    ax.set_title(f"{res.schedule}: step {s['step_ms']:.1f} ms, bubble {100 * s['bubble']:.1f}%, "
                 f"exposed a2a {s['exposed_a2a_ms']:.1f} ms "
                 f"({100 * s['exposed_a2a_share_of_moe_layer']:.1f}% of MoE-layer time)",
                 fontsize=9)


def timeline_legend(fig) -> None:
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=n) for n, c in COLORS.items()], loc="outside right")


def draw(results: List[SimResult], png: str) -> str:
    """One panel per schedule: a compute and a comm row per pipeline rank."""
    from ..telemetry.plots import new_figure, save_png

    ranks = max(op.rank for r in results for op in r.ops) + 1
    fig = new_figure(width=14.0, height=1.0 + 0.9 * ranks * len(results))
    axes = fig.subplots(len(results), 1, squeeze=False, sharex=True)[:, 0]
    for ax, res in zip(axes, results):
        draw_timeline(ax, res)
    axes[-1].set_xlabel("ms (forward solid, backward light)")
    timeline_legend(fig)
    return save_png(fig, png)


def main(argv=None) -> int:
    parser, args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        times = op_times(args)
        names = (args.schedules.split(",") if args.schedules
                 else default_schedules(args.pp, args.vpp))
        results = [simulate(name.strip(), times, pp=args.pp, vpp=args.vpp, ep=args.ep,
                            micro_batches=args.micro_batches,
                            layers_per_chunk=args.layers_per_chunk,
                            delay_wgrad=not args.no_delay_wgrad) for name in names]
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"{'schedule':12s} {'step ms':>10s} {'bubble':>8s} {'exposed a2a ms':>15s} "
          f"{'of MoE-layer time':>18s}")
    for res in results:
        s = res.summary()
        print(f"{s['schedule']:12s} {s['step_ms']:10.2f} {100 * s['bubble']:7.1f}% "
              f"{s['exposed_a2a_ms']:15.2f} {100 * s['exposed_a2a_share_of_moe_layer']:17.1f}%")
    if args.png:
        print(f"timeline: {draw(results, args.png)}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"times": asdict(times), "pp": args.pp, "vpp": args.vpp, "ep": args.ep,
                       "micro_batches": args.micro_batches,
                       "layers_per_chunk": args.layers_per_chunk,
                       "results": [{**r.summary(), "compute_ms": r.compute_ms,
                                    "bubble_per_rank": r.bubble,
                                    "exposed_a2a_ms_per_rank": r.exposed_a2a_ms}
                                   for r in results]}, f, indent=2)
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
