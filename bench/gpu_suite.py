"""Every GPU measurement of this project in one command (`bash bench/gpu_suite.sh OUT`).

A lent GPU machine comes with minutes, not hours, and no network, so the suite is one prepared
run: each step in STEPS has its GPU command, a smoke-size CPU command (GPU_SUITE_DRY_RUN=1 or
--dry-run: what the test suite runs, so the script cannot rot), its own time limit, and the
checks that turn its report into rows of measured value against target (targets from
bench/README.md). A failed or timed-out step is recorded and the suite goes on; no step starts
once the suite's budget (--budget-s, default 480 s) is spent, and each step's limit is cut to
what is left. Output: OUT/gpu_suite.json (every step's status, time and rows), OUT/gpu_suite.md
(the table), one log per step, and each benchmark's own JSON report.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
MIN_STEP_S = 10  # no step starts with less of the suite's budget left


def _row(metric: str, measured, target: str, ok: Optional[bool]) -> Dict:
    return {"metric": metric, "measured": measured, "target": target, "ok": ok}


def _report(out: str, name: str) -> Optional[Dict]:
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


# --- checks: report -> rows ----------------------------------------------------------------

def layer_rows(out: str, dry: bool) -> List[Dict]:
    """issue 5 targets (H100): ours-layer <= 28 ms, ours-moe <= 21 ms, peak <= hf-layer's."""
    report = _report(out, "layer_bench.json")
    if report is None:
        return [_row("layer_bench.json", None, "written", False)]
    results = report["results"]
    rows = []
    for case, limit in (("ours-layer", 28.0), ("ours-moe", 21.0)):
        ms = results.get(case, {}).get("ms")
        rows.append(_row(f"{case} ms", ms, f"<= {limit:g} (H100)",
                         None if dry or ms is None else ms <= limit))
    ours, hf = (results.get(c, {}).get("peak_gib") for c in ("ours-layer", "hf-layer"))
    if ours is not None and hf is not None:
        rows.append(_row("ours-layer peak GiB", ours, f"<= hf-layer's {hf:.2f}", ours <= hf))
    step = results.get("train-step", {})
    if step.get("mfu_vs_peak") is not None:
        rows.append(_row("dots-mini train-step MFU", step["mfu_vs_peak"], "reported", None))
    return rows


def numerics_rows(out: str, dry: bool) -> List[Dict]:
    """The grouped backend (ours) against Megatron-Core's sequential experts on the same
    weights, from layer_bench's report: identical routing, bf16-level output differences."""
    report = _report(out, "layer_bench.json")
    check = (report or {}).get("ours_vs_mcore")
    if not check:
        return [_row("ours vs mcore comparison", None, "in layer_bench.json", False)]
    scale = check["reference_abs_max"] or 1.0
    tolerance = 1e-5 if report["shapes"]["dtype"] == "fp32" else 2e-2
    rows = [_row("routing identical", check["routing_identical"], "True",
                 check["routing_identical"] is True)]
    for part in ("layer", "moe"):
        relative = check[part] / scale
        rows.append(_row(f"{part}: max abs diff / max abs output", relative,
                         f"<= {tolerance:g} ({report['shapes']['dtype']})",
                         relative <= tolerance))
    return rows


def a2a_rows(out: str, dry: bool) -> List[Dict]:
    """The paper's check: under 40 % of MoE-layer time exposed with the overlap."""
    report = _report(out, "a2a_overlap.json")
    if report is None:
        return [_row("a2a_overlap.json", None, "written", False)]
    rows = []
    for schedule, result in report["results"].items():
        share = result["exposed_share_of_moe_layer"]
        overlapped = schedule != "plain"
        rows.append(_row(f"{schedule} exposed a2a share", share,
                         "< 0.40" if overlapped else "reported",
                         None if dry or not overlapped else share < 0.40))
    return rows


def a2a_timing_rows(out: str, dry: bool) -> List[Dict]:
    """`--dots-a2a-timing` in real pretrain runs: a2a and exposed share of the MoE-layer time
    per schedule; with the overlap the paper's check (< 40 % exposed). One GPU runs no
    overlap (it needs expert parallelism): that row is reported as not run."""
    report = _report(out, "a2a_timing.json")
    if report is None:
        return [_row("a2a_timing.json", None, "written", False)]
    rows = []
    for schedule, result in report["results"].items():
        if result["status"] != "ok":
            rows.append(_row(f"{schedule} run", result["status"], "ok",
                             None if result["status"].startswith("not run") else False))
            continue
        overlapped = schedule != "plain"
        rows.append(_row(f"{schedule} a2a share", result["a2a_share"], "reported", None))
        share = result["exposed_share"]
        rows.append(_row(f"{schedule} exposed a2a share", share,
                         "< 0.40" if overlapped else "reported",
                         None if dry or not overlapped or share is None else share < 0.40))
    return rows


def analysis_rows(out: str, dry: bool) -> List[Dict]:
    """`megatron-dots analyze` in bf16 on the GPU: it runs, and agrees with fp32 (losses
    within 0.05 nats, >= 99 % of routed slots on the same experts); tokens per second."""
    report = _report(out, "analysis.json")
    if report is None:
        return [_row("analysis.json", None, "written", False)]
    rows = []
    for dtype, result in report["results"].items():
        for key, value in result.items():
            if key.endswith("tokens/s (incl. start-up)"):
                rows.append(_row(f"{dtype} {key}", value, "reported", None))
    agreement = report.get("bf16_vs_fp32")
    if agreement is not None:
        diff, same = agreement["max_loss_diff"], agreement["routed_slots_agreeing"]
        rows.append(_row("bf16 vs fp32 max loss diff", diff, "< 0.05", diff < 0.05))
        rows.append(_row("bf16 vs fp32 routed slots agreeing", same, ">= 0.99", same >= 0.99))
    elif not dry:
        rows.append(_row("bf16 run", None, "ran", False))
    return rows


def recompute_rows(out: str, dry: bool) -> List[Dict]:
    """The planner keeps the peak within budget and is at least as fast as static recompute."""
    report = _report(out, "recompute_bench.json")
    if report is None:
        return [_row("recompute_bench.json", None, "written", False)]
    results = report["results"]
    planner, static = results.get("planner", {}), results.get("static", {})
    rows = [_row("planner peak within budget", planner.get("peak_within_budget"), "True",
                 None if planner.get("peak_within_budget") is None
                 else planner["peak_within_budget"])]
    fast, slow = planner.get("common_tokens_per_s"), static.get("common_tokens_per_s")
    if fast and slow:
        rows.append(_row("planner / static tokens/s", fast / slow, ">= 1.0",
                         None if dry else fast / slow >= 1.0))
    rows.append(_row("no-recompute status", results.get("none", {}).get("status"),
                     "reported", None))
    return rows


def sft_rows(out: str, dry: bool) -> List[Dict]:
    """The SFT workload (many short conversations, a long tail to 8K): the planner under the
    budget on every step and >= 1.2x static recompute's tokens/s; `none` over the budget
    (otherwise the budget does not bind and the comparison says nothing). On CPU the budget
    checks use the planner's predictions; on the GPU the allocator's peak of every step."""
    report = _report(out, "sft_bench.json")
    if report is None:
        return [_row("sft_bench.json", None, "written", False)]
    results = report["results"]
    key, how = ("steps_over_budget_predicted", "predicted") if dry else \
        ("steps_over_budget_cuda", "allocator peak")
    planner, none = results.get("planner", {}), results.get("none", {})
    rows = []
    over = planner.get(key)
    rows.append(_row(f"planner steps over budget ({how})", over,
                     f"0 of {planner.get('steps_checked')}", None if over is None else over == 0))
    ratio = report.get("speedup", {}).get("planner_over_static_common")
    rows.append(_row("planner / static tokens/s", ratio, ">= 1.2",
                     None if dry or ratio is None else ratio >= 1.2))
    rows.append(_row("planner tokens/s (real tokens)", planner.get("common_tokens_per_s"),
                     "reported", None))
    over = none.get(key)
    rows.append(_row(f"no-recompute steps over budget ({how})", over, ">= 1 (the budget binds)",
                     None if over is None else over >= 1))
    return rows


def plan_rows(out: str, dry: bool) -> List[Dict]:
    """`megatron-dots plan` against two dots-mini runs: planned / measured memory (allocator
    peak) and step time, recorded; the runs must finish."""
    report = _report(out, "plan_bench.json")
    if report is None:
        return [_row("plan_bench.json", None, "written", False)]
    rows = []
    for name, entry in report["results"].items():
        measured = entry["measured"]
        rows.append(_row(f"{name}: run exit code", measured["rc"], "0", measured["rc"] == 0))
        rows.append(_row(f"{name}: planned / measured memory",
                         entry.get("memory_planned_over_measured"), "reported (CUDA only)", None))
        rows.append(_row(f"{name}: planned / measured step time",
                         entry.get("step_planned_over_measured"), "reported", None))
    return rows


def _log_values(log: str, key: str) -> List[float]:
    values = []
    for line in log.splitlines():
        if "| consumed samples:" in line and f"{key}: " in line:
            values.append(float(line.split(f"{key}: ")[1].split(" ")[0].replace(",", "")))
    return values


def pretrain_rows(out: str, dry: bool) -> List[Dict]:
    """`megatron-dots pretrain` as real runs use it: finishes, finite falling loss, grad norm."""
    with open(os.path.join(out, "pretrain.log")) as handle:
        log = handle.read()
    losses = _log_values(log, "lm loss")
    norms = _log_values(log, "grad norm")
    rows = [_row("iterations logged", len(losses), ">= 1", len(losses) >= 1)]
    if losses:
        finite = all(math.isfinite(v) for v in losses)
        rows.append(_row("last lm loss", losses[-1], f"finite, < first {losses[0]:.3f}",
                         finite and losses[-1] < losses[0]))
        rows.append(_row("grad norm logged every step", len(norms) == len(losses), "True",
                         len(norms) == len(losses)))
        rows.append(_row("tokens/s (last step)", _log_values(log, "tokens per second")[-1],
                         "reported", None))
        rows.append(_row("TFLOP/s/GPU (last step)",
                         _log_values(log, "throughput per GPU (TFLOP/s/GPU)")[-1],
                         "reported", None))
    return rows


def long_context_rows(out: str, dry: bool) -> List[Dict]:
    """Activations at long context (issue 21): per layer the saved bytes match the analytic
    model (within 10 %); the layers' bytes and their attention cores' alone grow linearly in s
    (an s x s tensor would not); Megatron-LM's causal mask keeps what no mask keeps; each
    attention core against one s x s fp32 score matrix, and on the GPU the allocator's bytes
    left by the forward against the counter's, reported."""
    report = _report(out, "long_context_memory.json")
    if report is None:
        return [_row("long_context_memory.json", None, "written", False)]
    records = report["records"]
    rows = []
    worst = max(abs(e["measured_total"] - e["predicted_total"]) / max(e["measured_total"], 1)
                for r in records for e in r["layers"].values())
    rows.append(_row("layer bytes: max relative diff, measured vs predicted", worst, "<= 0.10",
                     worst <= 0.10))

    def saved(record, region):
        return sum(e[region] for e in record["layers"].values())

    plain = sorted((r for r in records if r["mask"] == "none"), key=lambda r: r["seq_length"])
    if len(plain) >= 2:
        short, long = plain[0], plain[-1]
        lengths = long["seq_length"] / short["seq_length"]
        for region, what in (("measured_total", "layers"), ("attn_core", "attn cores")):
            growth = saved(long, region) / max(saved(short, region), 1)
            rows.append(_row(f"{what}: bytes({long['seq_length']}) / bytes("
                             f"{short['seq_length']})", growth, f"{lengths:g} (linear) +- 2 %",
                             abs(growth / lengths - 1) <= 0.02))
    for r in records:
        if r["mask"] != "none":
            twin = next((p for p in plain if p["seq_length"] == r["seq_length"]), None)
            if twin is not None:
                ratio = saved(r, "measured_total") / max(saved(twin, "measured_total"), 1)
                rows.append(_row(f"s {r['seq_length']}: bytes with {r['mask']} mask / without",
                                 ratio, "1 +- 1 %", abs(ratio - 1) <= 0.01))
        attn = max(e["attn_core"] for e in r["layers"].values())
        rows.append(_row(f"s {r['seq_length']} mask {r['mask']}: attn core / one s x s fp32",
                         attn / r["one_score_matrix_fp32"], "reported", None))
        cuda = r.get("cuda")
        if cuda:
            rows.append(_row(f"s {r['seq_length']} mask {r['mask']}: CUDA forward kept / counter",
                             cuda["forward_kept_bytes"] / max(r["total_bytes"], 1), "reported",
                             None))
    return rows


def megatron_lm_rows(out: str, dry: bool) -> List[Dict]:
    """Megatron-LM's own pretrain() with our model: every release path exits 0."""
    report = _report(out, os.path.join("megatron_lm", "megatron_lm.json"))
    if dry:
        with open(os.path.join(out, "megatron_lm.log")) as handle:
            commands = [line for line in handle if "megatron_dots" in line]
        return [_row("commands prepared", len(commands), ">= 1", len(commands) >= 1)]
    if report is None:
        return [_row("megatron_lm.json", None, "written", False)]
    return [_row(f"{run} exit code", result["rc"], "0", result["rc"] == 0)
            for run, result in report.items()]


# --- steps (data) ----------------------------------------------------------------------------

def _bench(script: str, *args: str) -> List[str]:
    return [PY, os.path.join(HERE, script), *args]


PRETRAIN_FLAGS = ["--dots-expert-backend", "grouped", "--bf16", "--use-distributed-optimizer",
                  "--overlap-grad-reduce", "--overlap-param-gather", "--clip-grad", "1.0",
                  "--lr", "3e-4", "--mock-data", "--tokenizer-type", "NullTokenizer",
                  "--log-interval", "1", "--eval-iters", "0"]


def steps(out: str) -> List[Dict]:
    """Each step: name, limit_s, gpu / dry argv (None: derived from another step's report),
    rows(out, dry)."""
    return [
        dict(name="layer_bench", limit_s=180, rows=layer_rows,
             gpu=_bench("layer_bench.py", "--markdown", "--out", f"{out}/layer_bench.json"),
             dry=_bench("layer_bench.py", "--model", "dots-tiny", "--batch", "2", "--seq", "32",
                        "--iters", "1", "--warmup", "0", "--cases",
                        "ours-layer,ours-moe,mcore-layer,mcore-moe,hf-moe,experts-balanced",
                        "--out", f"{out}/layer_bench.json")),
        dict(name="grouped_vs_sequential", limit_s=0, rows=numerics_rows, gpu=None, dry=None),
        dict(name="a2a_overlap", limit_s=150, rows=a2a_rows,
             gpu=_bench("a2a_overlap_bench.py", "--markdown", "--out", f"{out}/a2a_overlap.json"),
             dry=_bench("a2a_overlap_bench.py", "--model", "dots-tiny", "--layers", "2",
                        "--experts", "4", "--vocab-size", "512", "--seq", "32",
                        "--micro-batches", "4", "--iters", "1", "--warmup", "0",
                        "--link-gbps", "0.5", "--out", f"{out}/a2a_overlap.json")),
        dict(name="recompute", limit_s=150, rows=recompute_rows,
             gpu=_bench("recompute_bench.py", "--model", "dots-mini", "--min-seq", "512",
                        "--max-seq", "8192", "--budget-gb", "70", "--steps", "12",
                        "--micro-batches", "4", "--warmup", "1", "--markdown",
                        "--out", f"{out}/recompute_bench.json"),
             dry=_bench("recompute_bench.py", "--model", "dots-tiny", "--min-seq", "32",
                        "--max-seq", "128", "--steps", "4", "--micro-batches", "2",
                        "--budget-gb", "0.012", "--bucket", "32", "--warmup", "1",
                        "--out", f"{out}/recompute_bench.json")),
        dict(name="sft", limit_s=150, rows=sft_rows,
             gpu=_bench("sft_bench.py", "--model", "dots-mini", "--vocab-size", "32000",
                        "--max-seq", "8192", "--budget-gb", "50", "--global-batch", "16",
                        "--steps", "8", "--warmup", "1", "--markdown",
                        "--out", f"{out}/sft_bench.json"),
             dry=_bench("sft_bench.py", "--model", "dots-tiny", "--max-seq", "256",
                        "--median", "40", "--tail-min", "96", "--pad-multiple", "16",
                        "--global-batch", "8", "--micro-batch-size", "2", "--steps", "4",
                        "--warmup", "1", "--budget-gb", "0.02", "--bucket", "32",
                        "--out", f"{out}/sft_bench.json")),
        dict(name="plan", limit_s=150, rows=plan_rows,
             gpu=_bench("plan_bench.py", "--gpu", "h200", "--iters", "6", "--timeout-s", "70",
                        "--markdown", "--out", f"{out}/plan_bench.json"),
             dry=_bench("plan_bench.py", "--model", "dots-tiny", "--seq", "64", "--iters", "3",
                        "--vocab-size", "500", "--out", f"{out}/plan_bench.json")),
        dict(name="pretrain", limit_s=150, rows=pretrain_rows,
             gpu=[PY, os.path.join(ROOT, "examples", "pretrain_dots.py"), "--dots-model",
                  "dots-mini", "--micro-batch-size", "1", "--global-batch-size", "8",
                  "--seq-length", "4096", "--train-iters", "10", "--vocab-size", "32000",
                  *PRETRAIN_FLAGS],
             dry=[PY, os.path.join(ROOT, "examples", "pretrain_dots.py"), "--dots-model",
                  "dots-tiny", "--micro-batch-size", "2", "--global-batch-size", "4",
                  "--seq-length", "64", "--train-iters", "3", "--vocab-size", "500",
                  "--ddp-bucket-size", "20000", *PRETRAIN_FLAGS]),
        dict(name="a2a_timing", limit_s=150, rows=a2a_timing_rows,
             gpu=_bench("a2a_timing_bench.py", "--seq", "2048", "--timeout-s", "70",
                        "--markdown", "--out", f"{out}/a2a_timing.json"),
             dry=_bench("a2a_timing_bench.py", "--model", "dots-tiny", "--nproc", "2",
                        "--seq", "64", "--micro-batch-size", "2", "--micro-batches", "2",
                        "--iters", "4", "--vocab-size", "500",
                        "--out", f"{out}/a2a_timing.json")),
        dict(name="analysis", limit_s=120, rows=analysis_rows,
             gpu=_bench("analysis_bench.py", "--timeout-s", "50", "--markdown",
                        "--out", f"{out}/analysis.json"),
             dry=_bench("analysis_bench.py", "--out", f"{out}/analysis.json")),
        dict(name="megatron_lm", limit_s=240, rows=megatron_lm_rows,
             gpu=["bash", os.path.join(HERE, "megatron_lm_gpu.sh"), f"{out}/megatron_lm"],
             dry=["bash", os.path.join(HERE, "megatron_lm_gpu.sh"), f"{out}/megatron_lm"]),
        dict(name="long_context", limit_s=90, rows=long_context_rows,
             gpu=_bench("long_context_memory.py", "--device", "cuda", "--dots-model",
                        "dots-mini", "--layers", "2", "--vocab-size", "32000",
                        "--out", f"{out}/long_context_memory.json"),
             dry=_bench("long_context_memory.py", "--lengths", "128,512", "--layers", "2",
                        "--out", f"{out}/long_context_memory.json")),
    ]


def run_step(step: Dict, out: str, dry: bool, seconds_left: float) -> Dict:
    argv = step["dry" if dry else "gpu"]
    record = {"seconds": 0.0, "rc": None, "status": "derived"}
    if argv is not None:
        if seconds_left < MIN_STEP_S:
            return {"seconds": 0.0, "rc": None, "status": "not started (suite budget spent)",
                    "rows": []}
        limit = min(step["limit_s"], seconds_left)
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                              if p))
        if dry:
            env["GPU_SUITE_DRY_RUN"] = "1"
        start = time.time()
        with open(os.path.join(out, f"{step['name']}.log"), "w") as log:
            try:
                proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=ROOT, timeout=limit)
                record["rc"] = proc.returncode
                record["status"] = "ok" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                record["status"] = f"timed out after {limit:.0f} s"
        record["seconds"] = round(time.time() - start, 1)
    try:
        record["rows"] = step["rows"](out, dry)
    except Exception as exc:  # a broken report is a failed row, not a stopped suite
        record["rows"] = [_row("report", None, "readable", False)]
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown(results: Dict[str, Dict]) -> str:
    lines = ["| step | status | s | metric | measured | target | ok |",
             "|---|---|---:|---|---:|---|---|"]
    for name, record in results.items():
        rows = record["rows"] or [_row("-", None, "-", None)]
        for i, row in enumerate(rows):
            ok = {True: "yes", False: "**NO**", None: "-"}[row["ok"]]
            head = (name, record["status"], _fmt(record["seconds"])) if i == 0 else ("", "", "")
            lines.append("| " + " | ".join((*head, row["metric"], _fmt(row["measured"]),
                                             row["target"], ok)) + " |")
    return "\n".join(lines)


def host() -> Dict:
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        return {"device": device, "torch": torch.__version__, "python": sys.version.split()[0]}
    except ImportError:
        return {"device": "unknown"}


def main(argv=None, plan: Optional[List[Dict]] = None) -> int:
    """Run the suite; `plan` replaces STEPS (tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the logs, reports, gpu_suite.json / .md")
    parser.add_argument("--dry-run", action="store_true",
                        default=os.environ.get("GPU_SUITE_DRY_RUN") == "1",
                        help="every step at smoke size on CPU (also GPU_SUITE_DRY_RUN=1)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for the whole suite; no step starts after (default 480)")
    parser.add_argument("--steps", default=None,
                        help="comma-separated subset of the steps to run (default: all)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    plan = steps(out) if plan is None else plan
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {s["name"] for s in plan})
        if unknown:
            parser.error(f"unknown step(s) {unknown}")
        plan = [s for s in plan if s["name"] in wanted]
    start = time.time()
    results = {}
    for step in plan:
        left = args.budget_s - (time.time() - start)
        print(f"== {step['name']} ({left:.0f} s of the suite left)", flush=True)
        results[step["name"]] = record = run_step(step, out, args.dry_run, left)
        print(f"   {record['status']} in {record['seconds']} s", flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": host(), "dry_run": args.dry_run,
              "budget_s": args.budget_s, "seconds": round(time.time() - start, 1),
              "steps": results}
    with open(os.path.join(out, "gpu_suite.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    table = markdown(results)
    with open(os.path.join(out, "gpu_suite.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    failed = [name for name, r in results.items()
              if r["status"] not in ("ok", "derived") or any(row["ok"] is False
                                                             for row in r["rows"])]
    print(f"gpu suite: {len(results) - len(failed)} of {len(results)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
