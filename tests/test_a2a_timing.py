"""--dots-a2a-timing: the probes on the MoE layer stages (fake clock, exact sums), the
overlap schedule's stream-wait probes (fake plan, stream and events), the CSV, the flags, and
torchrun runs (gloo, EP=2) with and without --dots-a2a-overlap that log one CSV row per MoE
layer per interval and train exactly the losses of the same run untimed. No assertion is about
how long anything took."""

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_dots.telemetry.a2a_report import (
    CSV_COLUMNS,
    A2ATimingLogger,
    LayerA2ATime,
    describe,
    gather_layer_times,
    mean_over_layers,
)
from megatron_dots.telemetry.a2a_timing import A2ATiming, WallClock
from launch import describe as describe_proc
from launch import torchrun
from megatron_dots.telemetry.expert_load import TelemetryError
from pretrain_runs import CONSTANT_LR, flags, losses, read_csv, run

MOE_LAYERS = [2, 3, 4]  # dots-tiny: a dense first layer, then 3 MoE layers
STAGES_PER_FORWARD = 7  # shared experts, route, preprocess, dispatch, experts, combine, post


class TickClock(WallClock):
    """Every mark is 1 ms after the previous one: a span with no mark inside lasts 1 ms."""

    def __init__(self):
        self.ticks = 0
        super().__init__(now=self._tick)
        self.streams = []

    def _tick(self):
        self.ticks += 1
        return self.ticks * 1e-3

    def mark(self, stream=None):
        self.streams.append(stream)
        return super().mark(stream)


@pytest.fixture
def tiny_chunks(seeded):
    from megatron_dots.model import build_dots_model_chunks
    from megatron_dots.training import wrap_with_ddp
    from reference import tiny_config

    cfg = tiny_config()
    config = cfg.to_transformer_config()
    return cfg, config, wrap_with_ddp(build_dots_model_chunks(cfg, config), config)


def test_stage_probes_sum_per_layer_and_skip_evaluation(tiny_chunks):
    from megatron_dots.training.step import forward_backward

    cfg, config, chunks = tiny_chunks
    clock = TickClock()
    timing = A2ATiming(chunks, clock=clock, probe_waits=False)
    assert timing.layer_numbers == MOE_LAYERS
    batch = torch.randint(0, cfg.vocab_size, (2, 2, 17), generator=torch.Generator().manual_seed(0))
    forward_backward(chunks, list(batch), 16, 2)

    times = gather_layer_times(timing, MOE_LAYERS, iterations=1)  # one process: no peers
    assert [t.layer for t in times] == MOE_LAYERS
    # TickClock advances exactly 1 "ms" per mark, so the sums below count timed stages (no
    # wall clock is read): 2 micro-batches x (1 dispatch, 1 combine, 7 stages).
    for t in times:
        assert t.forwards == 2
        assert (t.dispatch_ms, t.combine_ms) == pytest.approx((2.0, 2.0))
        assert t.moe_ms == pytest.approx(2.0 * STAGES_PER_FORWARD)
        assert t.exposed_ms == pytest.approx(4.0)  # CPU: the all-to-all itself
        assert t.a2a_share == pytest.approx(4 / 14) and t.exposed_share == t.a2a_share

    for chunk in chunks:  # evaluation is not timed
        chunk.eval()
    with torch.no_grad():
        chunks[0](batch[0][:, :-1], torch.arange(16).expand(2, 16), None)
    assert gather_layer_times(timing, MOE_LAYERS, iterations=1)[0].forwards == 0

    timing.remove()
    moe = timing.layers[0]
    assert "dispatch" not in vars(moe) and moe.dispatch.__func__ is type(moe).dispatch
    ticks = clock.ticks
    for chunk in chunks:
        chunk.train()
    chunks[0](batch[0][:, :-1], torch.arange(16).expand(2, 16), None)
    assert clock.ticks == ticks  # removed: nothing timed


class _Node:
    def __init__(self, name, stream, event, calls):
        self.name, self.stream, self.event, self.calls = name, stream, event, calls

    def forward(self, inputs=()):
        self.calls.append(self.name)
        return inputs


class _Event:
    def __init__(self, calls):
        self.calls = calls

    def wait(self, stream=None):
        self.calls.append(f"wait on {stream}")


def _fake_plan(moe_layers, calls):
    """A model-chunk schedule plan: a dense layer, then MoE layers (their `mlp` modules)."""
    event = _Event(calls)
    layer_plans = [SimpleNamespace(layer=SimpleNamespace(mlp=object()),
                                   attn=_Node("attn 1", "compute", event, calls),
                                   mlp=_Node("mlp 1", "compute", event, calls),
                                   moe_dispatch=SimpleNamespace(), moe_combine=SimpleNamespace())]
    for i, moe in enumerate(moe_layers, start=2):
        layer_plans.append(SimpleNamespace(
            layer=SimpleNamespace(mlp=moe),
            attn=_Node(f"attn {i}", "compute", event, calls),
            moe_dispatch=_Node(f"dispatch {i}", "comm", event, calls),
            mlp=_Node(f"experts {i}", "compute", event, calls),
            moe_combine=_Node(f"combine {i}", "comm", event, calls)))
    return SimpleNamespace(num_layers=lambda: len(layer_plans), get_layer=layer_plans.__getitem__,
                           post_process=_Node("post", "compute", event, calls), event=event,
                           wait_current_stream=lambda: None, layer_plans=layer_plans)


def test_overlap_probes_time_the_compute_stream_waits(tiny_chunks):
    """With the overlap on a GPU each compute node after a dispatch / combine waits for it
    between two marks on the compute stream; that wait is the layer's exposed time."""
    _, _, chunks = tiny_chunks
    clock = TickClock()
    timing = A2ATiming(chunks, clock=clock, probe_waits=True)
    calls = []
    plan = _fake_plan(timing.layers, calls)
    timing.probe_plan(plan)
    for layer_plan in plan.layer_plans:  # one micro-batch's forward, in the schedule's order
        for node in ("attn", "moe_dispatch", "mlp", "moe_combine"):
            if hasattr(getattr(layer_plan, node), "forward"):
                getattr(layer_plan, node).forward()
    plan.post_process.forward()

    waits = [i for i, call in enumerate(calls) if call.startswith("wait")]
    assert [calls[i + 1] for i in waits] == ["experts 2", "attn 3", "experts 3", "attn 4",
                                             "experts 4", "post"]
    assert all(calls[i - 1].startswith(("dispatch", "combine")) for i in waits)
    assert set(calls[i] for i in waits) == {"wait on compute"}
    assert set(clock.streams) == {"compute"}  # marks on the waiting (compute) stream
    ms, _ = timing.take()
    # every wait between two consecutive marks: 1 ms each for the dispatch and the combine
    assert {layer: row[3] for layer, row in ms.items()} == {2: 2.0, 3: 2.0, 4: 2.0}
    assert all(row[:3] == [0.0, 0.0, 0.0] for row in ms.values())  # no stage ran here
    timing.remove()


def test_probes_on_the_real_schedules(tmp_path):
    """tests/parallel/a2a_timing_worker.py, EP=2: with a 1 ms-per-mark clock each stage and
    each probed wait counts 1 ms, so the sums show what ran. Plain: 7 stages per forward and
    exposed = dispatch + combine. Overlap (combined 1F1B, the stream-wait probes forced on):
    the deferred shared experts add a stage, and every dispatch and combine is waited for
    exactly once by the micro-batch's next compute node."""
    proc = torchrun("parallel/a2a_timing_worker.py", 2, "--micro-batches", "4",
                    "--out", str(tmp_path / "sums"), timeout=300)
    assert proc.returncode == 0, describe_proc(proc)
    for rank in range(2):
        result = json.loads((tmp_path / f"sums.rank{rank}.json").read_text())
        for schedule, stages in (("plain", STAGES_PER_FORWARD), ("overlap", 8)):
            assert sorted(map(int, result[schedule])) == MOE_LAYERS
            for layer in result[schedule].values():
                assert layer["forwards"] == 4
                assert layer["ms"] == pytest.approx([4.0, 4.0, 4.0 * stages, 8.0]), schedule


def test_mean_over_layers_and_the_log_line():
    times = [LayerA2ATime(2, 1.0, 2.0, 10.0, 0.5, forwards=4, iterations=2),
             LayerA2ATime(3, 3.0, 2.0, 20.0, 1.5, forwards=4, iterations=2)]
    mean = mean_over_layers(times)  # arithmetic on the records above, no clock involved
    assert (mean.dispatch_ms, mean.combine_ms, mean.moe_ms, mean.exposed_ms) == (2, 2, 15, 1)
    assert mean.a2a_share == pytest.approx(4 / 15) and mean.exposed_share == pytest.approx(1 / 15)
    line = describe(times, probe_waits=True)
    assert "a2a share 26.7%" in line and "exposed share 6.7%" in line
    assert "compute-stream waits" in line and "mean of 2 layers" in line
    assert LayerA2ATime(2, 0.0, 0.0, 0.0, 0.0).a2a_share == 0.0  # a layer that never ran


def test_csv_appends_and_refuses_another_header(tmp_path):
    path = tmp_path / "sub" / "a2a.csv"
    times = [LayerA2ATime(2, 1.0, 2.0, 10.0, 3.0, forwards=4, iterations=2)]
    A2ATimingLogger(str(path)).log(2, times)
    A2ATimingLogger(str(path)).log(4, times)  # a resumed run appends
    rows = read_csv(path)
    assert list(rows[0]) == list(CSV_COLUMNS) and [r["iteration"] for r in rows] == ["2", "4"]
    assert float(rows[0]["a2a_share"]) == pytest.approx(0.3)
    other = tmp_path / "other.csv"
    other.write_text("iteration,loss\n1,2.0\n")
    with pytest.raises(TelemetryError, match="existing header differs"):
        A2ATimingLogger(str(other))


def test_flags():
    from megatron_dots.training.arguments import ArgumentError, parse_args

    base = ["--dots-model", "dots-tiny", "--micro-batch-size", "2", "--seq-length", "64",
            "--train-iters", "4", "--lr", "1e-3", "--mock-data", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "500"]
    assert parse_args(base + ["--dots-a2a-timing"]).dots_a2a_timing_csv is None
    args = parse_args(base + ["--dots-a2a-timing", "--save", "/tmp/ckpt"])
    assert args.dots_a2a_timing_csv == "/tmp/ckpt/a2a_timing.csv"
    assert parse_args(base + ["--save", "/tmp/ckpt"]).dots_a2a_timing_csv is None
    with pytest.raises(ArgumentError, match="--dots-a2a-timing-csv needs --dots-a2a-timing"):
        parse_args(base + ["--dots-a2a-timing-csv", "x.csv"])
    with pytest.raises(ArgumentError, match="--dots-a2a-timing: the model has no MoE layer"):
        parse_args(base + ["--dots-a2a-timing", "--num-layers", "1"])  # dense layer 1 only


@pytest.mark.parametrize("schedule", [[], ["--dots-a2a-overlap"]], ids=["plain", "overlap"])
def test_timed_runs_log_every_moe_layer_and_train_the_same(schedule, data, tmp_path):
    common = dict(train_iters=4, micro_batch_size=2, global_batch_size=8, log_interval=2,
                  eval_iters=0, expert_model_parallel_size=2, **CONSTANT_LR)
    timed = run(flags(data, tmp_path / "timed", dots_a2a_timing=True,
                      dots_a2a_timing_csv=tmp_path / "a2a.csv", tensorboard_dir=tmp_path / "tb",
                      dots_loss_csv=tmp_path / "timed.csv", **common) + schedule, nproc=2)
    run(flags(data, tmp_path / "plain", dots_loss_csv=tmp_path / "untimed.csv", **common)
        + schedule, nproc=2)
    assert losses(tmp_path / "timed.csv") == losses(tmp_path / "untimed.csv")

    rows = read_csv(tmp_path / "a2a.csv")
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(int(r["iteration"]), int(r["layer"])) for r in rows] == [
        (iteration, layer) for iteration in (2, 4) for layer in MOE_LAYERS]
    for r in rows:
        v = {k: float(r[k]) for k in CSV_COLUMNS}
        assert v["iterations"] == 2 and v["forwards"] == 4  # 2 micro-batches per rank and step
        # structure only (a real clock runs here): no negative span, the layer was timed
        assert min(v.values()) >= 0 and v["moe_ms"] > 0
        assert v["dispatch_ms"] + v["combine_ms"] <= v["moe_ms"] * (1 + 1e-6), r
        assert v["a2a_share"] == pytest.approx(
            (v["dispatch_ms"] + v["combine_ms"]) / v["moe_ms"], rel=1e-6)
        # CPU (gloo blocks): exposed is the all-to-all itself, with or without the overlap
        assert v["exposed_ms"] == pytest.approx(v["dispatch_ms"] + v["combine_ms"], rel=1e-6)
    lines = [l for l in timed.stdout.splitlines() if "all-to-all timing" in l]
    assert len(lines) == 2 and all("a2a share" in l and "exposed share" in l for l in lines)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    share = events.Scalars("a2a_timing/a2a_share")  # the mean over layers
    assert [e.step for e in share] == [2, 4]
    mean = mean_over_layers([LayerA2ATime(0, *(float(r[k]) for k in CSV_COLUMNS[4:8]))
                             for r in rows if r["iteration"] == "4"])
    assert share[-1].value == pytest.approx(mean.a2a_share, rel=1e-5)
    assert {"a2a_timing/exposed_share", "a2a_timing/dispatch_ms/layer_02",
            "a2a_timing/exposed_share/layer_04"} <= set(events.Tags()["scalars"])
