"""The input-aware recompute planner (megatron_dots/recompute): memory model accuracy, plans
that fit the budget and recompute the least, identical training with and without it
(one process here; tensor-, expert- and pipeline-parallel layouts under torchrun), and the
planner under the all-to-all overlap schedule (restricted modes, the combined 1F1B's order,
training equal to the plain schedule without recompute)."""

import json

import pytest
import torch

from launch import torchrun

from megatron_dots.recompute.layer import MODES, NODE_PATH_MODES
from megatron_dots.recompute.memory_model import ActivationMemoryModel
from megatron_dots.recompute.planner import (
    ChunkLayout,
    RecomputeCosts,
    RecomputePlanner,
    StepPlan,
    simulate_peak,
)
from megatron_dots.recompute.schedule_order import max_in_flight, schedule_events
from megatron_dots.recompute.shapes import MicroBatchShape, bucket, shape_of

MBS = 2


# -- one process, dots-tiny ------------------------------------------------------------------
@pytest.fixture
def tiny(seeded):
    from megatron_dots import DotsConfig
    from megatron_dots.model import build_dots_model_chunks
    from megatron_dots.training import wrap_with_ddp

    dc = DotsConfig.preset("dots-tiny")
    tc = dc.to_transformer_config()

    def build(seed=5):
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        return wrap_with_ddp(build_dots_model_chunks(dc, tc, backend="sequential"), tc)

    return dc, tc, build


def tokens(dc, seq, seed, count=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, dc.vocab_size, (MBS, seq + 1), generator=g) for _ in range(count)]


def calibrated(tc, chunks, dc, lengths=(64, 256, 160), budget=1e12):
    from megatron_dots.recompute import RecomputeController
    from megatron_dots.training import forward_backward

    ctl = RecomputeController(chunks, tc, budget_bytes=budget, bucket_tokens=32)
    for i, seq in enumerate(lengths):
        forward_backward(chunks, tokens(dc, seq, i), seq, MBS, recompute=ctl)
        assert ctl.history[-1]["calibration"], "a new longest shape is measured, not predicted"
    return ctl


def forced(ctl, modes):
    """Make the controller's next steps apply `modes` to every layer."""

    def plan_step(shapes, events):
        layers = len(ctl.layouts[0].layer_kinds)
        from megatron_dots.recompute.planner import ItemPlan

        item = ItemPlan((modes,) * layers, 0.0, 0.0, 0.0)
        return StepPlan(tuple((item,) for _ in shapes), 0.0, 0.0)

    ctl.planner.plan_step = plan_step


@pytest.mark.parametrize("mode", ["none", "core_attn", "mlp", "core_attn+mlp", "full"])
def test_memory_model_predicts_unseen_lengths_within_10_percent(tiny, mode):
    from megatron_dots.training import forward_backward

    dc, tc, build = tiny
    chunks = build()
    ctl = calibrated(tc, chunks, dc)
    assert ctl.model._coefficients("dense", "attn_core")[1] > 0, "unfused attention is quadratic"
    forced(ctl, mode)
    for i, seq in enumerate((80, 120, 200, 232, 250)):  # none of them measured
        forward_backward(chunks, tokens(dc, seq, 100 + i), seq, MBS, recompute=ctl)
        record = ctl.history[-1]
        assert not record["calibration"]
        assert record["modes"] == {mode: 2 * len(ctl.layouts[0].layer_kinds)}
        assert record["max_prediction_error"] < 0.10, (mode, seq, record)


def test_recompute_modes_keep_less(tiny):
    """The counter is not blind to the modes: each keeps what the model says, ordered."""
    from megatron_dots.training import forward_backward

    dc, tc, build = tiny
    chunks = build()
    ctl = calibrated(tc, chunks, dc)
    kept = {}
    for mode in ("none", "core_attn+mlp", "full"):
        forced(ctl, mode)
        forward_backward(chunks, tokens(dc, 256, 7), 256, MBS, recompute=ctl)
        kept[mode] = max(c.total() for c in ctl._counters.values())
    assert kept["none"] > 2 * kept["core_attn+mlp"] > 2 * kept["full"]


def test_training_with_the_planner_equals_training_without(tiny):
    """Variable-length steps under a tight budget: same losses, gradients and router biases
    as without recompute, while the plans really mix modes and spare short micro-batches."""
    from megatron_dots.training import forward_backward

    dc, tc, build = tiny
    planned, plain = build(), build()
    ctl = calibrated(tc, planned, dc)
    for i, seq in enumerate((64, 256, 160)):  # the plain twin takes the same steps
        forward_backward(plain, tokens(dc, seq, i), seq, MBS)
    long_peak = ctl.planner.plan_step([MicroBatchShape(MBS, 256)] * 2, ctl._events(2))
    ctl.planner.budget = 0.5 * long_peak.predicted_peak
    ctl.planner.reset()
    seen = set()
    for step, seq in enumerate((48, 250, 96, 200, 32, 240)):
        batches = tokens(dc, seq, 50 + step)
        loss_a = forward_backward(planned, batches, seq, MBS, recompute=ctl)
        loss_b = forward_backward(plain, batches, seq, MBS)
        assert loss_a == loss_b
        for a, b in zip(planned, plain):
            for (name, pa), pb in zip(a.module.named_parameters(), b.module.parameters()):
                assert torch.equal(pa.main_grad, pb.main_grad), name
                pa.data.add_(pa.main_grad, alpha=-0.5)
                pb.data.add_(pb.main_grad, alpha=-0.5)
            for (name, ba), bb in zip(a.module.named_buffers(), b.module.buffers()):
                assert torch.equal(ba, bb), name
        record = ctl.history[-1]
        assert record["fits"] and record["predicted_peak"] <= ctl.planner.budget
        if seq <= 64:
            assert set(record["modes"]) == {"none"}, (seq, record["modes"])
        seen.update(record["modes"])
    assert {"none", "full"} <= seen and len(seen) >= 3, seen


def test_evaluation_is_not_recomputed(tiny):
    from megatron_dots.training import forward_backward

    dc, tc, build = tiny
    chunks = build()
    ctl = calibrated(tc, chunks, dc, lengths=(64,))
    with torch.no_grad():
        forward_backward(chunks, tokens(dc, 64, 3), 64, MBS, forward_only=True, recompute=ctl)
    assert len(ctl.history) == 1 and not ctl._counters


def test_log_line_reports_modes_and_measured_bytes(tiny):
    """The window summary and its log line say what was recomputed (layer passes per mode),
    the predicted and the measured (saved-tensor) activation peak, and the calibration steps."""
    from megatron_dots.training import forward_backward

    dc, tc, build = tiny
    chunks = build()
    ctl = calibrated(tc, chunks, dc)
    forced(ctl, "core_attn")
    forward_backward(chunks, tokens(dc, 200, 9), 200, MBS, recompute=ctl)
    record = ctl.history[-1]
    assert 0 < record["measured_peak"] <= record["measured_total"]
    # no pipelining: one micro-batch alive at a time
    assert record["measured_peak"] == max(c.total() for c in ctl._counters.values())
    window = ctl.take_window()
    layers = 2 * len(ctl.layouts[0].layer_kinds)
    assert window["calibration_steps"] == 3 and window["modes/core_attn"] == layers
    assert window["measured_peak_gib"] * (1 << 30) == pytest.approx(record["measured_peak"])
    line = ctl.describe(window)
    assert "3 calibrating" in line and "layer passes recomputed 100%" in line
    assert f"(core_attn {layers} of {layers})" in line
    assert "predicted activation peak" in line and "measured saved-tensor peak" in line
    assert "overlap" not in line


# -- the planner on a synthetic memory model -------------------------------------------------
def synthetic_planner(budget, layers=4, chunks=1, kinds=None, allowed=None):
    model = ActivationMemoryModel("unfused")
    per_token = {"rest": 40, "attn_core": 8, "mlp": 60, "core_in": 12, "mlp_in": 8, "input": 8}
    for s in (128, 512, 1024):
        shape = MicroBatchShape(1, s)
        values = {q: v * s for q, v in per_token.items()}
        values["attn_core"] += 2 * s * s
        model.add("moe", shape, values)
        model.add("dense", shape, dict(values, mlp=80 * s))
        model.add("chunk:pre+post", shape, {"outside": 100 * s})
    costs = RecomputeCosts(hidden=64, heads=4, kv_heads=4, head_dim=16, ffn=128, moe_ffn=32,
                           shared_ffn=64, experts=8, topk=2)
    layout = [ChunkLayout(tuple(kinds or ("moe",) * layers), "chunk:pre+post")] * chunks
    return RecomputePlanner(model, costs, layout, budget, margin=0.0, allowed_modes=allowed)


def test_memory_model_fit_and_leave_one_out_error():
    planner = synthetic_planner(1e9)
    model = planner.model
    a, c = model._coefficients("moe", "attn_core")
    assert a == pytest.approx(8) and c == pytest.approx(2)
    assert model.predict("moe", "mlp", MicroBatchShape(2, 300)) == pytest.approx(60 * 600)
    assert model.errors()["moe"] < 1e-9
    assert model.covers(MicroBatchShape(1, 700), min_points=3)
    assert not model.covers(MicroBatchShape(1, 2048), min_points=3)  # longer: measure first


def test_plan_fits_the_budget_and_costs_less_with_more_memory():
    shapes = [MicroBatchShape(1, s) for s in (1024, 256, 1024, 512, 128, 1024)]
    events = schedule_events(len(shapes), pp_size=2, pp_rank=0)
    unlimited = synthetic_planner(1e15).plan_step(shapes, events)
    assert unlimited.recompute_flops == 0
    flops = []
    for share in (0.25, 0.5, 0.75):
        plan = synthetic_planner(share * unlimited.predicted_peak).plan_step(shapes, events)
        assert plan.fits
        assert simulate_peak(events, plan.items) == pytest.approx(plan.predicted_peak)
        assert plan.predicted_peak <= share * unlimited.predicted_peak
        # The short micro-batch is spared while the long ones pay.
        assert set(plan.modes(4, 0)) == {"none"}
        assert set(plan.modes(0, 0)) != {"none"}
        flops.append(plan.recompute_flops)
    assert flops[0] > flops[1] > flops[2] > 0


def test_more_micro_batches_in_flight_need_more_recompute():
    """1F1B: the first stage holds pp micro-batches at once, the last one."""
    shapes = [MicroBatchShape(1, 512)] * 8
    one = synthetic_planner(1e15).plan_step(shapes[:1], schedule_events(1))
    budget = 2.5 * one.predicted_peak
    first = synthetic_planner(budget).plan_step(shapes, schedule_events(8, 4, 0))
    last = synthetic_planner(budget).plan_step(shapes, schedule_events(8, 4, 3))
    assert first.fits and last.fits
    assert first.recompute_flops > last.recompute_flops == 0


def test_too_small_budget_is_reported_and_plans_are_cached():
    shapes = [MicroBatchShape(1, 1024)] * 2
    events = schedule_events(2)
    planner = synthetic_planner(1000.0)
    plan = planner.plan_step(shapes, events)
    assert not plan.fits and set(plan.modes(0, 0)) == {"full"}
    assert planner.plan_step(shapes, events) is plan
    assert (planner.cache_hits, planner.cache_misses) == (1, 1)
    with pytest.raises(ValueError, match="positive"):
        synthetic_planner(0.0)


@pytest.mark.parametrize("pp,vpp,m", [(1, None, 3), (2, None, 5), (4, None, 8), (2, 2, 4),
                                      (4, 2, 8), (2, 3, 6)])
def test_schedule_events_follow_megatron(pp, vpp, m):
    for rank in range(pp):
        events = schedule_events(m, pp, rank, vpp)
        chunks = vpp or 1
        assert sorted(e for e in events if e[0] == "F") == sorted(
            ("F", mb, c) for mb in range(m) for c in range(chunks))
        done = set()
        for kind, mb, c in events:
            if kind == "F":
                done.add((mb, c))
            else:
                assert (mb, c) in done  # backward after forward
        if vpp is None:
            assert max_in_flight(events) == min(m, pp - rank)
        else:
            warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp
            assert max_in_flight(events) == min(m * vpp, warmup + 1)


@pytest.mark.parametrize("pp,vpp,m", [(1, None, 1), (1, None, 5), (2, 2, 4), (4, 2, 8),
                                      (2, 3, 6), (2, 2, 2)])
def test_overlap_schedule_events_follow_the_combined_1f1b(pp, vpp, m):
    """Megatron-Core's combined 1F1B: without pipelining F0, F(k+1) with B(k), the last B
    alone (two micro-batches in flight); interleaved, one more warmup virtual micro-batch."""
    for rank in range(pp):
        events = schedule_events(m, pp, rank, vpp, overlap=True)
        plain = schedule_events(m, pp, rank, vpp)
        chunks = vpp or 1
        assert sorted(events) == sorted(plain)  # the same passes, in another order
        assert [e for e in events if e[0] == "F"] == [e for e in plain if e[0] == "F"]
        assert [e for e in events if e[0] == "B"] == [e for e in plain if e[0] == "B"]
        if vpp is None:
            expected = [("F", 0, 0)]
            for k in range(m - 1):
                expected += [("F", k + 1, 0), ("B", k, 0)]
            assert events == expected + [("B", m - 1, 0)]
            assert max_in_flight(events) == min(m, 2) and max_in_flight(plain) == 1
        else:
            warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp + 1
            assert max_in_flight(events) == min(m * chunks, warmup + 1)
            assert max_in_flight(events) == min(m * chunks, max_in_flight(plain) + 1)


def test_overlap_schedule_needs_interleaving_with_pipelining():
    with pytest.raises(ValueError, match="only interleaved"):
        schedule_events(4, pp_size=2, pp_rank=0, overlap=True)


def test_restricted_planner_uses_only_the_overlap_schedules_modes():
    """Under the overlap schedule MoE layers may only recompute core attention and dense layers
    anything but the whole layer: however tight the budget, no other mode is planned, and the
    least memory the restricted modes reach is what an impossible budget gets."""
    kinds = ("dense", "moe", "moe", "moe")
    shapes = [MicroBatchShape(1, s) for s in (1024, 256, 1024, 512)]
    events = schedule_events(len(shapes), overlap=True)
    free = synthetic_planner(1e15, kinds=kinds, allowed=NODE_PATH_MODES).plan_step(shapes, events)
    floor = synthetic_planner(1.0, kinds=kinds, allowed=NODE_PATH_MODES).plan_step(shapes, events)
    assert free.recompute_flops == 0 and not floor.fits
    for mb in range(len(shapes)):
        assert floor.modes(mb, 0) == ("core_attn+mlp",) + ("core_attn",) * 3
    unrestricted = synthetic_planner(1.0, kinds=kinds).plan_step(shapes, events)
    assert set(unrestricted.modes(0, 0)) == {"full"}  # what the restriction rules out
    seen = set()
    for share in (0.9, 0.7, 0.5, 0.3):
        budget = floor.predicted_peak + share * (free.predicted_peak - floor.predicted_peak)
        plan = synthetic_planner(budget, kinds=kinds, allowed=NODE_PATH_MODES).plan_step(
            shapes, events)
        assert plan.fits and plan.predicted_peak <= budget
        for row in plan.items:
            for kind, mode in zip(kinds, row[0].modes):
                assert mode in NODE_PATH_MODES[kind], (kind, mode)
                seen.add((kind, mode))
    assert ("moe", "core_attn") in seen and ("moe", "none") in seen


def test_restrict_switches_modes_and_forgets_plans():
    shapes = [MicroBatchShape(1, 1024)] * 2
    events = schedule_events(2, overlap=True)
    planner = synthetic_planner(1.0)
    assert set(planner.plan_step(shapes, events).modes(0, 0)) == {"full"}
    planner.restrict(NODE_PATH_MODES)
    assert planner.modes_for("moe") == ("none", "core_attn")
    assert set(planner.plan_step(shapes, events).modes(0, 0)) == {"core_attn"}
    planner.restrict(None)
    assert planner.modes_for("moe") == MODES
    assert set(planner.plan_step(shapes, events).modes(0, 0)) == {"full"}
    with pytest.raises(ValueError, match="must include 'none'"):
        planner.restrict({"moe": ("core_attn",)})
    with pytest.raises(ValueError, match="must include 'none'"):
        planner.restrict({"moe": ("none", "everything")})


def test_shapes_and_buckets():
    assert shape_of(torch.zeros(3, 65, dtype=torch.long)) == MicroBatchShape(3, 64)
    packed = {"tokens": torch.zeros(1, 10, dtype=torch.long),
              "cu_seqlens": torch.tensor([0, 4, 10])}
    assert shape_of(packed).segments == (4, 6)
    assert bucket(MicroBatchShape(2, 300), 256) == MicroBatchShape(2, 512)
    assert bucket(MicroBatchShape(2, 512), 256) == MicroBatchShape(2, 512)
    assert MicroBatchShape(2, 8).attention_score_elements("flash") == 0
    assert MicroBatchShape(2, 8).attention_score_elements("unfused") == 128


def test_static_memory_and_budget_errors():
    from megatron_dots.recompute import activation_budget, static_bytes

    layer = torch.nn.Linear(256, 256, bias=False)  # 65536 fp32 parameters
    assert static_bytes([layer]) == 65536 * (4 + 4 + 8)
    assert static_bytes([layer], distributed_optimizer=True, data_parallel_size=4) == 65536 * 10
    with pytest.raises(ValueError, match="leaves nothing for activations"):
        activation_budget(0.0001, static_bytes([layer]))
    assert activation_budget(1.0, 2**29) == 2**29


# -- parallel layouts (torchrun, gloo) -------------------------------------------------------
@pytest.mark.parametrize("layout", [
    (), ("--ep", "2"), ("--tp", "2", "--sp"), ("--pp", "2", "--vpp", "2", "--budget-share", "0.8"),
], ids=["dp2", "ep2", "tp2-sp", "pp2-vpp2"])
def test_parallel_training_with_the_planner_equals_training_without(layout, tmp_path):
    out = tmp_path / "summary.json"
    proc = torchrun("parallel/recompute_worker.py", 2, "--out", str(out), *layout, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["worst"] == {"loss": 0.0, "grad": 0.0, "bias": 0.0}
    assert summary["order_ok"] and summary["peers_agree"]
    modes = summary["modes"]
    assert sum(v for k, v in modes.items() if k != "none") > 0, modes
    if "--pp" not in layout:  # variable lengths: short micro-batches recompute nothing
        assert modes.get("none", 0) > 0, modes
    assert min(summary["calibrations"]) >= 1


# -- the planner with the all-to-all overlap schedule (torchrun, gloo) ------------------------
OVERLAP_CASES = {
    # grouped experts: delayed expert wgrad, which calibration (plain schedule) must flush
    "ep2-delay-wgrad": (2, ["--ep", "2", "--delay-wgrad", "--budget-share", "0.1"]),
    # unfused attention: core_attn frees much; variable lengths mix recompute and none
    "ep2-sequential": (2, ["--ep", "2", "--backend", "sequential", "--budget-share", "0.5"]),
    "pp2-vpp2-ep2-delay-wgrad": (4, ["--pp", "2", "--vpp", "2", "--ep", "2", "--delay-wgrad",
                                     "--iters", "3", "--budget-share", "0.1"]),
}


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_planner_with_the_overlap_schedule_trains_like_the_plain_schedule(case, tmp_path):
    """--dots-recompute-budget-gb with --dots-a2a-overlap: calibration on the plain schedule,
    then plans of the overlap schedule's modes, applied by its layer nodes, in its order; the
    losses, gradients and router biases equal the plain schedule without recompute."""
    from launch import describe

    nproc, args = OVERLAP_CASES[case]
    out = tmp_path / "summary.json"
    proc = torchrun("parallel/recompute_overlap_worker.py", nproc, "--out", str(out), *args,
                    timeout=600)
    assert proc.returncode == 0, describe(proc)
    summary = json.loads(out.read_text())
    assert summary["failures"] == 0
    worst = summary["worst"]
    assert worst["plain_loss"] < 1e-6 and worst["plain_grad"] < 1e-6 and worst["plain_bias"] < 1e-7
    assert worst["overlap_loss"] < 1e-6 and worst["overlap_grad"] < 1e-6
    # The combined 1F1B ran the (micro-batch, chunk) plans in exactly the planner's order.
    assert summary["order_ok"]
    pp = 2 if "--pp" in args else 1
    assert sorted(summary["in_flight"]) == ([2, 2] if pp == 1 else [4, 4, 6, 6])

    counts, kinds = summary["counts"], summary["kinds"]
    calibrations = sum(r["calibration"] for r in summary["ranks"][0]["records"])
    iters = len(summary["ranks"][0]["records"])
    passes = nproc * 4 * (2 if pp > 1 else 1)  # (micro-batch, chunk) forwards per step
    assert calibrations >= 1 and iters > calibrations
    assert counts["plain_forward_steps"] == calibrations * passes  # calibration: plain schedule
    assert counts["overlap_forward_steps"] == (iters - calibrations) * passes
    if "--delay-wgrad" in args:
        assert counts["calibration_wgrad_flushes"] == summary["calibration_layer_passes"] > 0
    else:
        assert counts.get("calibration_wgrad_flushes", 0) == 0
    # Only modes the layer nodes honour, core attention recomputed somewhere (and the worker
    # checked that every core_attn mode applied ran a core-attention checkpoint).
    assert kinds.get("moe:core_attn", 0) > 0 and counts["core_attn_checkpoints"] > 0
    assert not {k for k in kinds if k.startswith("moe:") and k not in ("moe:none", "moe:core_attn")}
    assert "dense:full" not in kinds
    if pp == 1 and "sequential" in args:
        assert kinds.get("moe:none", 0) > 0  # short micro-batches recompute nothing
    for rank in summary["ranks"]:
        lo, hi = rank["budget"]
        for record in rank["records"]:
            assert record["overlap_schedule"]
            if record["calibration"]:
                continue
            # predicted (margin, buckets, transients, paired micro-batches whole) >= measured
            assert record["fits"] and record["predicted_peak"] <= lo + 0.5 * (hi - lo) + 1
            assert 0 < record["measured_peak"] <= record["predicted_peak"]
        line = rank["describe"]
        assert "(all-to-all overlap schedule)" in line and "on the plain schedule" in line
        assert f"{calibrations} calibrating" in line and "measured saved-tensor peak" in line
