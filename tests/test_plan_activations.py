"""`megatron_dots.plan.activations`: the analytic activation memory against what the saved-tensor
counter (`recompute.measure.SavedBytes`) measures on real models. The measured tests are marked
`heavy` (.ci/run runs them on megatron-core 0.16.1 and 0.19.2).

* Measured (torchrun, 2 CPU processes, one launch for every case): dots-tiny and a
  dots-mini-shaped model (64 experts, top-6) under DP 2, TP 2 + SP, EP 2 and PP 2 (x VPP 2),
  fp32 and bf16, several micro-batch shapes, every layer in each recompute mode; SDPA (flash)
  attention with grouped experts (the CPU default), and the local unfused attention. Per layer
  kind and recompute mode, per quantity, per (micro-batch, chunk) total and the pipeline peak
  in schedule order: predicted within 10% (in practice to the byte but for a few constant
  bytes). Routed-expert bytes depend on how many token copies the rank's experts received:
  per rank the prediction takes the measured imbalance; the mean over expert-parallel peers
  is predicted with `routing_imbalance=1.0`. With a budget, the recompute planner's plan on the
  analytic model is applied to the real model: it keeps what the plan says, under the budget.
* Planning (no processes): budgets, the recompute planner on the analytic model, the overlap
  schedule's restricted modes, dots.llm1 at its sbatch layout, bad input.
"""

import json
import time

import pytest

from launch import describe, torchrun
from megatron_dots.config import DotsConfig
from megatron_dots.plan.activations import (
    LAYER_KINDS, ActivationMemory, analytic_memory_model, dtype_bytes, layer_parts,
    layer_quantities, loss_transient_bytes, outside_quantities, rank_activation_memory,
    rope_table_bytes)
from megatron_dots.plan.layout import Layout
from megatron_dots.recompute.layer import MODES, NODE_PATH_MODES
from megatron_dots.recompute.memory_model import ActivationMemoryModel
from megatron_dots.recompute.schedule_order import schedule_events
from megatron_dots.recompute.shapes import MicroBatchShape

TOLERANCE = 0.10
MINI = dict(num_layers=4, hidden_size=192, num_attention_heads=6, num_query_groups=6,
            kv_channels=32, ffn_hidden_size=512, num_moe_experts=64, moe_ffn_hidden_size=64,
            moe_router_topk=6, vocab_size=1100, max_position_embeddings=256)
ALL_MODES = list(MODES)


def case(id, preset, layout, dtype, shapes, modes=ALL_MODES, micro_batches=1,
         backend="grouped"):
    return dict(id=id, preset=preset, overrides=MINI if preset == "dots-mini" else {},
                layout=layout, dtype=dtype, shapes=shapes, modes=modes,
                micro_batches=micro_batches, backend=backend)


CASES = [
    case("tiny-dp2-fp32", "dots-tiny", {}, "fp32", [[1, 64], [2, 32], [2, 96]]),
    case("tiny-dp2-bf16", "dots-tiny", {}, "bf16", [[2, 64]]),
    case("tiny-tp2-sp-fp32", "dots-tiny", {"tp": 2, "sp": True}, "fp32", [[1, 64], [2, 96]]),
    case("tiny-tp2-sp-bf16", "dots-tiny", {"tp": 2, "sp": True}, "bf16", [[2, 64]]),
    case("tiny-ep2-fp32", "dots-tiny", {"ep": 2}, "fp32", [[2, 64]]),
    case("tiny-ep2-bf16", "dots-tiny", {"ep": 2}, "bf16", [[1, 96]]),
    case("tiny-pp2-vpp2-fp32", "dots-tiny", {"pp": 2, "vpp": 2}, "fp32", [[2, 32]],
         modes=["none", "full"], micro_batches=4),
    case("mini-tp2-sp-bf16", "dots-mini", {"tp": 2, "sp": True}, "bf16", [[1, 64], [2, 32]]),
    case("mini-ep2-fp32", "dots-mini", {"ep": 2}, "fp32", [[2, 48]]),
    case("mini-pp2-bf16", "dots-mini", {"pp": 2}, "bf16", [[2, 32]], modes=["none", "mlp"],
         micro_batches=3),
    case("tiny-unfused-fp32", "dots-tiny", {}, "fp32", [[1, 64], [2, 48]],
         modes=["none", "core_attn"], backend="sequential"),
    case("tiny-unfused-bf16", "dots-tiny", {}, "bf16", [[2, 64]], modes=["none", "core_attn"],
         backend="sequential"),
]
CASE = {c["id"]: c for c in CASES}


def config_of(c) -> DotsConfig:
    return DotsConfig.preset(c["preset"], **c["overrides"])


def layout_of(c, b, s) -> Layout:
    lay = c["layout"]
    tp, pp, ep, vpp = lay.get("tp", 1), lay.get("pp", 1), lay.get("ep", 1), lay.get("vpp", 1)
    dp = 2 // (tp * pp)
    return Layout(gpus=2, tp=tp, pp=pp, vpp=vpp, ep=ep, micro_batch_size=b,
                  global_batch_size=b * dp * c["micro_batches"], seq_length=s,
                  sequence_parallel=lay.get("sp"), precision=c["dtype"])


def planned(base, share):
    """`base` run with the plan the analytic model gives each pipeline rank for a budget of
    `share` of the way from the least its plans keep (every layer ``full``) to its peak
    without recompute."""
    c = dict(base, id=base["id"] + "-planned", modes=["planned"], chunk_modes={}, budgets={})
    cfg, layout = config_of(c), layout_of(c, *c["shapes"][0])
    for r in range(layout.pp):
        free = rank_activation_memory(cfg, layout, r).saved_peak_bytes
        least = rank_activation_memory(cfg, layout, r, activation_budget_bytes=1.0)
        budget = least.saved_peak_bytes * 1.05 + share * (free - least.saved_peak_bytes)
        c["budgets"][str(r)] = budget
        c["chunk_modes"][str(r)] = rank_activation_memory(
            cfg, layout, r, activation_budget_bytes=budget).chunk_modes
    return c


CASES += [planned(CASE["tiny-pp2-vpp2-fp32"], 0.4), planned(CASE["mini-pp2-bf16"], 0.5)]
CASE = {c["id"]: c for c in CASES}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every rank's records of every case (see the worker), from one torchrun launch."""
    root = tmp_path_factory.mktemp("plan_activations")
    (root / "cases.json").write_text(json.dumps(CASES))
    start = time.time()
    proc = torchrun("parallel/plan_activation_worker.py", 2, "--cases", str(root / "cases.json"),
                    "--out", str(root / "out.json"), timeout=600)
    assert proc.returncode == 0, describe(proc)
    records = json.loads((root / "out.json").read_text())
    print(f"plan_activation_worker: {len(records)} records in {time.time() - start:.0f} s")
    return records


def attention_of(c) -> str:
    return "unfused" if c["backend"] == "sequential" else "flash"


def mode_bytes(cfg, layout, kind, mode, shape, d, attention, imbalance) -> float:
    """What a `kind` layer keeps in `mode`, via the planner's own memory model class."""
    model = ActivationMemoryModel(attention)
    q = layer_quantities(cfg, layout, kind, shape, d, attention=attention,
                         routing_imbalance=imbalance)
    model.add(kind, shape, {k: round(v) for k, v in q.items()})
    return model.layer_bytes(kind, mode, shape)[0]


def imbalance_of(cfg, record, layer, shape) -> float:
    received = record["received"].get(layer)
    if received is None:
        return 1.0
    return received / (shape.tokens * cfg.moe_router_topk)


def kept(regions) -> int:
    """A layer's saved bytes (the recorded module inputs `core_in` / `mlp_in` are not)."""
    return sum(v for k, v in regions.items() if k in ("rest", "attn_core", "mlp", "input"))


def rel(predicted, measured) -> float:
    return abs(predicted - measured) / max(measured, 1)


def comparisons(records):
    """(case, rank, shape, mode, layer or chunk, kind, measured, predicted) for every layer
    and every (micro-batch, chunk) of every record."""
    rows = []
    for r in records:
        c = CASE[r["case"]]
        cfg, (b, s) = config_of(c), r["shape"]
        layout, shape = layout_of(c, b, s), MicroBatchShape(b, s)
        d, attention = dtype_bytes(c["dtype"]), attention_of(c)
        total, rope = 0.0, rope_table_bytes(cfg, shape)
        layers = sorted(r["layers"].items(), key=lambda x: int(x[0]))
        modes = (c["chunk_modes"][str(r["pp_rank"])][r["chunk"]] if r["mode"] == "planned"
                 else [r["mode"]] * len(layers))
        for (number, regions), mode in zip(layers, modes):
            kind = regions["kind"]
            p = mode_bytes(cfg, layout, kind, mode, shape, d, attention,
                           imbalance_of(cfg, r, number, shape))
            if mode == "full":  # the chunk's first whole-layer checkpoint keeps the RoPE table
                p, rope = p + rope, 0.0
            total += p
            if attention == "unfused" and kind == "moe":
                continue  # SequentialMLP experts keep other tensors (only totals of dense)
            rows.append((r["case"], r["rank"], (b, s), mode, f"layer {number}", kind,
                         kept(regions), p))
        if attention == "unfused" and any(g["kind"] == "moe" for g in r["layers"].values()):
            continue
        role = "+".join(n for n, on in (("pre", r["pre"]), ("post", r["post"])) if on) or "mid"
        total += outside_quantities(cfg, layout, f"chunk:{role}", shape, d)
        rows.append((r["case"], r["rank"], (b, s), r["mode"],
                     f"mb {r['mb']} chunk {r['chunk']}", "total", r["total"], total))
    return rows


@pytest.mark.heavy
def test_every_case_and_mode_was_measured(measured):
    seen = {(r["case"], r["mode"]) for r in measured}
    assert seen == {(c["id"], m) for c in CASES for m in c["modes"]}
    ranks = {(r["case"], r["rank"]) for r in measured}
    assert len(ranks) == 2 * len(CASES)


@pytest.mark.heavy
def test_layer_and_chunk_bytes_match_the_counter_in_every_recompute_mode(measured):
    rows = comparisons(measured)
    assert len(rows) > 300
    bad = [row for row in rows if rel(row[7], row[6]) > TOLERANCE]
    assert not bad, "\n".join(map(str, bad[:20]))
    # Per kind and mode the worst error, for the log.
    worst = {}
    for case_id, _, _, mode, _, kind, m, p in rows:
        key = (kind, mode)
        worst[key] = max(worst.get(key, 0.0), rel(p, m))
    print({f"{k}/{m}": f"{100 * e:.2f}%" for (k, m), e in sorted(worst.items())})
    for kind in ("dense", "moe", "total"):
        for mode in ("none", "core_attn", "mlp", "full"):
            assert (kind, mode) in worst, (kind, mode)


@pytest.mark.heavy
def test_each_quantity_matches_the_counter(measured):
    """Without recompute, per layer: rest, attention core, MLP block and the MLP's input."""
    checked = 0
    for r in measured:
        if r["mode"] != "none":
            continue
        c = CASE[r["case"]]
        cfg, (b, s) = config_of(c), r["shape"]
        layout, shape = layout_of(c, b, s), MicroBatchShape(b, s)
        for number, regions in r["layers"].items():
            if attention_of(c) == "unfused" and regions["kind"] == "moe":
                continue
            q = layer_quantities(cfg, layout, regions["kind"], shape, dtype_bytes(c["dtype"]),
                                 attention=attention_of(c),
                                 routing_imbalance=imbalance_of(cfg, r, number, shape))
            for name in ("rest", "attn_core", "mlp", "mlp_in"):
                assert rel(q[name], regions[name]) <= TOLERANCE, (r["case"], number, name,
                                                                   q[name], regions[name])
                checked += 1
    assert checked > 100


@pytest.mark.heavy
def test_balanced_routing_predicts_the_mean_over_expert_parallel_peers(measured):
    """Token copies are conserved: the peers' mean is t x top-k exactly, so the prediction with
    routing_imbalance=1.0 matches the mean of their MoE bytes, though single ranks differ (to
    the byte but for the counter's own noise: it tells storages apart by address and size, so
    a freed tensor's address reused by one of the same size, a few KB, is not counted)."""
    groups = {}
    for r in measured:
        if CASE[r["case"]]["layout"].get("ep", 1) > 1 and r["mode"] == "none":
            for number, regions in r["layers"].items():
                if regions["kind"] == "moe":
                    groups.setdefault((r["case"], tuple(r["shape"]), number), []).append(
                        (regions["mlp"], r["received"][number]))
    assert groups
    spread = 0.0
    for (case_id, (b, s), number), values in groups.items():
        c = CASE[case_id]
        cfg = config_of(c)
        assert len(values) == 2
        assert sum(v[1] for v in values) == 2 * b * s * cfg.moe_router_topk
        predicted = layer_quantities(cfg, layout_of(c, b, s), "moe", MicroBatchShape(b, s),
                                     dtype_bytes(c["dtype"]))["mlp"]
        mean = sum(v[0] for v in values) / 2
        assert rel(predicted, mean) < 0.01, (case_id, number, predicted, mean)
        spread = max(spread, max(rel(predicted, v[0]) for v in values))
    assert spread > 0.01  # the ranks themselves were not balanced


@pytest.mark.heavy
def test_pipeline_peak_in_schedule_order(measured):
    """The rank's saved-tensor peak over Megatron-Core's (interleaved) 1F1B order, from the
    per-(micro-batch, chunk) totals the counter measured, against `rank_activation_memory`."""
    checked = 0
    for case_id in ("tiny-pp2-vpp2-fp32", "mini-pp2-bf16"):
        c = CASE[case_id]
        cfg = config_of(c)
        for rank in (0, 1):
            rows = [r for r in measured if r["case"] == case_id and r["rank"] == rank
                    and r["mode"] == "none"]
            (b, s), = {tuple(r["shape"]) for r in rows}
            layout = layout_of(c, b, s)
            pp_rank = rows[0]["pp_rank"]
            events = schedule_events(c["micro_batches"], layout.pp, pp_rank,
                                     layout.vpp if layout.vpp > 1 else None)
            totals = {(r["mb"], r["chunk"]): r["total"] for r in rows}
            live = peak = 0
            for kind, mb, chunk in events:
                live += totals[(mb, chunk)] if kind == "F" else -totals[(mb, chunk)]
                peak = max(peak, live)
            predicted = rank_activation_memory(cfg, layout, pp_rank)
            assert rel(predicted.saved_peak_bytes, peak) <= TOLERANCE, (case_id, rank, peak,
                                                                        predicted)
            assert predicted.peak_bytes + predicted.logits_and_loss_bytes == pytest.approx(
                predicted.saved_peak_bytes + loss_transient_bytes(
                    cfg, layout, MicroBatchShape(b, s), dtype_bytes(c["dtype"]))
                * (pp_rank == layout.pp - 1))
            checked += 1
    assert checked == 4


def schedule_peak(events, bytes_of) -> float:
    live = peak = 0.0
    for kind, mb, chunk in events:
        live += bytes_of(mb, chunk) if kind == "F" else -bytes_of(mb, chunk)
        peak = max(peak, live)
    return peak


@pytest.mark.heavy
def test_planned_recompute_keeps_what_the_plan_predicts(measured):
    """Budgets between the least memory and the peak without recompute: the recompute planner,
    run on the analytic model, mixes modes; applied to the real model (the worker), each
    (micro-batch, chunk) keeps what the plan predicts, and the rank's measured peak in schedule
    order stays under the budget."""
    seen = set()
    for c in (c for c in CASES if "chunk_modes" in c):
        cfg = config_of(c)
        for rank in (0, 1):
            rows = [r for r in measured if r["case"] == c["id"] and r["rank"] == rank]
            (b, s), = {tuple(r["shape"]) for r in rows}
            layout, pp_rank = layout_of(c, b, s), rows[0]["pp_rank"]
            budget = c["budgets"][str(pp_rank)]
            plan = rank_activation_memory(cfg, layout, pp_rank, activation_budget_bytes=budget)
            assert plan.fits_budget and plan.chunk_modes == c["chunk_modes"][str(pp_rank)]
            for r in rows:
                assert rel(plan.chunk_live_bytes[r["chunk"]], r["total"]) <= TOLERANCE
            events = schedule_events(c["micro_batches"], layout.pp, pp_rank,
                                     layout.vpp if layout.vpp > 1 else None)
            totals = {(r["mb"], r["chunk"]): r["total"] for r in rows}
            peak = schedule_peak(events, lambda mb, chunk: totals[(mb, chunk)])
            predicted = schedule_peak(events, lambda mb, chunk: plan.chunk_live_bytes[chunk])
            assert rel(predicted, peak) <= TOLERANCE, (c["id"], rank, predicted, peak)
            # + the recompute backward's extra, + the planner's 5% margin
            assert peak <= plan.saved_peak_bytes <= budget
            seen.update(m for modes in plan.chunk_modes for m in modes)
    assert len(seen - {"none"}) >= 2, seen


# -- planning, no processes -----------------------------------------------------------------
DOTS = DotsConfig.preset("dots.llm1")
SBATCH = Layout(gpus=256, tp=8, pp=2, ep=8, micro_batch_size=1, global_batch_size=512,
                seq_length=8192, precision="bf16")


def test_dots_llm1_layer_bytes():
    """TP 8 + SP, seq 8192, bf16: a MoE layer keeps 0.60 GiB, the dense layer 0.27 GiB. The
    expert-TP all-gather gives every TP rank all t x top-k routed copies of the full hidden
    input, which TP does not divide: at TP 1 a MoE layer keeps 2.28 GB (the sbatch comment's
    ~2.4 GB) and at TP 8 the first stage ~39 GB (its ~40 GB)."""
    shape = MicroBatchShape(1, 8192)
    moe = layer_quantities(DOTS, SBATCH, "moe", shape, 2)
    dense = layer_quantities(DOTS, SBATCH, "dense", shape, 2)
    none = lambda q: q["rest"] + q["attn_core"] + q["mlp"]  # noqa: E731
    assert 0.55 < none(moe) / 2**30 < 0.65 and 0.24 < none(dense) / 2**30 < 0.3
    tp1 = layer_quantities(DOTS, SBATCH.replace(tp=1, gpus=32), "moe", shape, 2)
    assert 2.1 < none(tp1) / 1e9 < 2.5
    parts = layer_parts(DOTS, SBATCH, "moe", shape, 2)["mlp"]
    assert max(parts, key=parts.get) == "routed_experts"
    memory = [rank_activation_memory(DOTS, SBATCH, r) for r in range(2)]
    assert [m.in_flight for m in memory] == [2, 1]
    for m in memory:
        assert m.fits_budget and m.recompute_flops == 0
        assert m.recompute == {"none": 31 * SBATCH.num_micro_batches}
        assert m.a2a_buffer_bytes > 0
        json.dumps(m.to_dict())
    assert memory[0].logits_and_loss_bytes == 0 < memory[1].logits_and_loss_bytes
    # 31 layers x 2 in flight on the first stage, x 1 on the last (+ logits there)
    assert memory[0].peak_bytes == pytest.approx(2 * memory[0].per_micro_batch_bytes[0])
    assert 35e9 < memory[0].peak_bytes < 45e9


def test_budget_plans_fit_and_cost_more_as_the_budget_shrinks():
    layout = SBATCH.replace(pp=4, vpp=2, gpus=512, global_batch_size=1024)
    free = rank_activation_memory(DOTS, layout, 0)
    flops, fits_all = [], []
    for share in (0.9, 0.6, 0.3):
        budget = share * free.saved_peak_bytes
        m = rank_activation_memory(DOTS, layout, 0, activation_budget_bytes=budget)
        assert m.fits_budget and m.saved_peak_bytes <= budget
        assert sum(m.recompute.values()) == sum(free.recompute.values())
        flops.append(m.recompute_flops)
        fits_all.append(m)
    assert 0 < flops[0] < flops[1] < flops[2]
    tiny = rank_activation_memory(DOTS, layout, 0, activation_budget_bytes=2**20)
    assert not tiny.fits_budget and set(tiny.recompute) == {"full"}
    assert not rank_activation_memory(DOTS, layout, 0, activation_budget_bytes=-1.0).fits_budget


def test_overlap_schedule_restricts_modes_and_holds_one_more_micro_batch():
    layout = SBATCH.replace(pp=4, vpp=2, gpus=512, global_batch_size=1024, a2a_overlap=True)
    plain = rank_activation_memory(DOTS, layout.replace(a2a_overlap=False), 0)
    overlap = rank_activation_memory(DOTS, layout, 0)
    assert overlap.in_flight == plain.in_flight + 1
    assert overlap.a2a_buffer_bytes == 2 * plain.a2a_buffer_bytes
    tight = rank_activation_memory(DOTS, layout, 0, activation_budget_bytes=1.0)
    assert not tight.fits_budget
    assert set(tight.recompute) <= set(NODE_PATH_MODES["moe"]) | set(NODE_PATH_MODES["dense"])
    assert "full" not in tight.recompute and tight.recompute["core_attn"] > 0


def test_analytic_model_feeds_the_planner_and_scales_with_the_layout():
    model = analytic_memory_model(DOTS, SBATCH)
    shape = MicroBatchShape(1, 8192)
    exact = layer_quantities(DOTS, SBATCH, "moe", shape, 2)
    for quantity in exact:
        assert model.predict("moe", quantity, shape) == pytest.approx(exact[quantity], rel=1e-3)
    live = {mode: model.layer_bytes("moe", mode, shape)[0] for mode in MODES}
    assert live["none"] > live["mlp"] > live["full"] and live["none"] > live["core_attn"]
    half = analytic_memory_model(DOTS, SBATCH.replace(seq_length=4096))
    assert half.layer_bytes("moe", "none", MicroBatchShape(1, 4096))[0] == pytest.approx(
        live["none"] / 2, rel=0.01)
    unfused = analytic_memory_model(DOTS, SBATCH, attention="unfused")
    core = model.predict("moe", "attn_core", shape)
    assert unfused.predict("moe", "attn_core", shape) > 10 * core
    # more imbalance, more routed-expert bytes
    skewed = layer_quantities(DOTS, SBATCH, "moe", shape, 2, routing_imbalance=1.5)
    routed = layer_parts(DOTS, SBATCH, "moe", shape, 2)["mlp"]["routed_experts"]
    assert skewed["mlp"] - exact["mlp"] == pytest.approx(0.5 * routed, rel=1e-3)
    assert outside_quantities(DOTS, SBATCH, "logits", shape, 2) > outside_quantities(
        DOTS, SBATCH.replace(tp=1, gpus=32), "logits", shape, 2) / 9


def test_bad_input_is_refused():
    shape = MicroBatchShape(1, 64)
    layout = Layout(gpus=1, seq_length=64)
    with pytest.raises(ValueError, match="layer kind"):
        layer_quantities(DOTS, layout, "mamba", shape, 2)
    with pytest.raises(ValueError, match="routing_imbalance"):
        layer_quantities(DOTS, layout, "moe", shape, 2, routing_imbalance=0.0)
    with pytest.raises(ValueError, match="attention kind"):
        layer_quantities(DOTS, layout, "moe", shape, 2, attention="paged")
    with pytest.raises(ValueError, match="dtype_bytes"):
        layer_quantities(DOTS, layout, "moe", shape, 1)
    with pytest.raises(ValueError, match="unknown role"):
        outside_quantities(DOTS, layout, "lm_head", shape, 2)
    with pytest.raises(ValueError, match="pp_rank"):
        rank_activation_memory(DOTS, SBATCH, 2)
    with pytest.raises(ValueError, match="precision"):
        dtype_bytes("fp8")
    assert set(LAYER_KINDS) == {"dense", "moe"} and ActivationMemory.__dataclass_fields__
