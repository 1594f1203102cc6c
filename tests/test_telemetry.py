"""Expert-load telemetry: statistics against hand computation, alarms, the CSV / TensorBoard log,
reading it back, and the PNG plots and `plot-experts` command."""

import math
import os

import numpy as np
import pytest
import torch

from megatron_dots.telemetry import (
    COLLAPSE_SHARE,
    DEAD_SHARE,
    ExpertLoadLogger,
    TelemetryError,
    alarms,
    heatmap_matrix,
    plot_expert_heatmap,
    plot_loss,
    plot_loss_csv,
    read_expert_load_csv,
    read_loss_csv,
    summarize,
)
from megatron_dots.telemetry import plots

E = 32  # 2/E = 6.25% < 10%: the absolute collapse threshold applies


def hand_counts():
    """Layer 3: 1000 slots with boundary cases; layer 7: skewed; layer 9: no tokens."""
    a = [28] * E
    a[0], a[1], a[2], a[3] = 4, 5, 101, 100  # 0.4% dead, 0.5% not, 10.1% collapsed, 10% not
    a[4] += 1000 - sum(a)  # the rest, to make exactly 1000
    b = [10] * E
    b[5] = 150
    c = [0] * E
    return [a, b, c]


def expected(row):
    total = float(sum(row))
    shares = [x / total for x in row] if total else [0.0] * len(row)
    return total, shares


def fake_bias(seed=0):
    return torch.randn(3, E, generator=torch.Generator().manual_seed(seed)) * 0.05


# --------------------------------------------------------------------------- summarize


def test_summarize_matches_hand_computation():
    counts, bias = hand_counts(), fake_bias()
    assert sum(counts[0]) == 1000 and counts[0][4] > 0
    loads = summarize(torch.tensor(counts, dtype=torch.float32), bias, [3, 7, 9])
    assert [l.layer for l in loads] == [3, 7, 9]
    for load, row, brow in zip(loads[:2], counts, bias.tolist()):
        total, shares = expected(row)
        assert load.tokens == total
        assert load.shares == pytest.approx(shares, rel=1e-12, abs=0)
        assert load.max_share == pytest.approx(max(shares), rel=1e-12)
        assert load.min_share == pytest.approx(min(shares), rel=1e-12)
        assert load.imbalance == pytest.approx(max(shares) * E, rel=1e-12)
        assert load.dead_experts == sum(s < 0.005 for s in shares)
        assert load.collapsed_experts == [e for e, s in enumerate(shares) if s > 0.10]
        assert load.bias_norm == pytest.approx(math.sqrt(sum(x * x for x in brow)), rel=1e-12)
    # The boundaries are strict: exactly 0.5% is alive, exactly 10% is no alarm.
    assert loads[0].dead_experts == 1 and loads[0].collapsed_experts == [2]
    assert loads[1].dead_experts == 0 and loads[1].collapsed_experts == [5]
    assert loads[1].max_share == pytest.approx(150 / 460)
    assert DEAD_SHARE == 0.005 and COLLAPSE_SHARE == 0.10


def test_all_zero_layer():
    load = summarize(torch.tensor(hand_counts()), fake_bias(), [3, 7, 9])[2]
    assert load.tokens == 0 and load.shares == [0.0] * E
    assert (load.max_share, load.min_share, load.imbalance) == (0.0, 0.0, 0.0)
    assert load.dead_experts == 0 and load.collapsed_experts == []
    text = alarms([load], 40)
    assert text == ["iteration 40: layer 9: no routed tokens since the last log"]


def test_summarize_accepts_numpy_and_lists_alike():
    counts, bias = hand_counts(), fake_bias()
    from_tensor = summarize(torch.tensor(counts, dtype=torch.bfloat16), bias.bfloat16(), [3, 7, 9])
    from_lists = summarize(counts, bias.bfloat16().float().tolist(), np.array([3, 7, 9]))
    assert from_tensor == from_lists


def test_few_experts_balanced_is_not_a_collapse():
    # dots-tiny: 8 experts, balanced share 12.5% > 10%; the alarm needs 2x balanced (25%).
    balanced = summarize([[10] * 8], [[0.0] * 8], [2])[0]
    assert balanced.collapsed_experts == [] and alarms([balanced], 1) == []
    skewed = summarize([[30, 10, 10, 10, 10, 10, 10, 10]], [[0.0] * 8], [2])[0]
    assert skewed.collapsed_experts == [0]
    assert "collapse alarm > 25%" in alarms([skewed], 1)[0]


@pytest.mark.parametrize("counts, bias, layers, needle", [
    ([[1.0] * 4] * 2, [[0.0] * 4] * 3, [1, 2], "bias has shape [3, 4]"),
    ([[1.0] * 4] * 2, [[0.0] * 4] * 2, [1], "layers lists 1 layer numbers, counts has 2"),
    ([1.0] * 4, [0.0] * 4, [1], "counts must have shape [layers, experts]"),
    ([[1.0, -1.0], [1.0, 1.0]], [[0.0] * 2] * 2, [4, 5], "layer(s) [4]"),
    ([[1.0, float("nan")]], [[0.0] * 2], [4], "finite"),
    ([[1.0, 1.0]], [[0.0] * 2], [0], "1-based"),
    ([[1.0, 1.0]] * 2, [[0.0] * 2] * 2, [3, 3], "repeated"),
])
def test_summarize_rejects_bad_input(counts, bias, layers, needle):
    with pytest.raises(TelemetryError) as err:
        summarize(counts, bias, layers)
    assert needle in str(err.value)


# --------------------------------------------------------------------------- alarms


def test_alarm_texts_name_iteration_layer_expert_and_percent():
    counts = [[100.0] * 128]
    for e in (10, 11, 12, 13, 14):
        counts[0][e] = 1.0
    others = sum(counts[0]) - counts[0][3]
    counts[0][3] = 0.142 * others / 0.858  # expert 3 gets 14.2% of the layer's slots
    load = summarize(counts, [[0.0] * 128], [7])[0]
    text = alarms([load], 120)
    assert text[0] == ("iteration 120: layer 7 expert 3 receives 14.2% of routed tokens "
                       "(collapse alarm > 10%)")
    assert text[1] == ("iteration 120: layer 7: 5 of 128 experts under 0.5% of routed tokens "
                       "(dead: 10, 11, 12, 13, 14)")
    assert len(text) == 2
    healthy = summarize([[100.0] * 128], [[0.0] * 128], [8])
    assert alarms(healthy, 120) == []


def test_alarm_for_non_finite_bias():
    load = summarize([[1.0, 1.0]], [[0.0, float("inf")]], [4])[0]
    assert alarms([load], 5) == ["iteration 5: layer 4: expert bias has non-finite values "
                                 "(bias norm inf)"]


# --------------------------------------------------------------------------- logger


class FakeTB:
    def __init__(self):
        self.scalars, self.histograms = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def add_histogram(self, tag, values, step):
        self.histograms[(tag, step)] = np.asarray(values)


def loads_for(seed):
    counts = torch.tensor(hand_counts(), dtype=torch.float32)
    counts[:2] += torch.randint(0, 50, (2, E), generator=torch.Generator().manual_seed(seed))
    return summarize(counts, fake_bias(seed), [3, 7, 9])


def assert_rows_equal(records, start, iteration, loads):
    for k, load in enumerate(loads):
        row = records.rows[start + k]
        assert (row["iteration"], row["layer"]) == (iteration, load.layer)
        assert row["tokens"] == load.tokens and row["dead_experts"] == load.dead_experts
        assert row["collapsed_experts"] == load.collapsed_experts
        for name in ("max_share", "min_share", "imbalance", "bias_norm"):
            assert row[name] == pytest.approx(getattr(load, name), rel=1e-5, abs=1e-12)
        np.testing.assert_allclose(records.shares[start + k], load.shares, rtol=1e-5, atol=0)


def test_csv_round_trip_and_resume_appends(tmp_path):
    path = str(tmp_path / "sub" / "expert_load.csv")
    first, second, third = loads_for(1), loads_for(2), loads_for(3)
    logger = ExpertLoadLogger(path)
    logger.log(10, first)
    logger.log(20, second)
    # A resumed run: a new logger on the same file appends under the same header.
    returned = ExpertLoadLogger(path).log(30, third)
    assert returned == alarms(third, 30) and returned
    lines = open(path).read().splitlines()
    assert len(lines) == 1 + 9 and lines[0].startswith("iteration,layer,tokens,max_share,")
    assert lines[0].endswith(f",share_{E - 1}")
    assert sum(line.startswith("iteration") for line in lines) == 1  # header written once
    records = read_expert_load_csv(path)
    assert records.iterations.tolist() == [10] * 3 + [20] * 3 + [30] * 3
    assert records.layers.tolist() == [3, 7, 9] * 3 and records.shares.shape == (9, E)
    for start, it, loads in ((0, 10, first), (3, 20, second), (6, 30, third)):
        assert_rows_equal(records, start, it, loads)


def test_resume_from_an_earlier_checkpoint_supersedes_rows(tmp_path):
    path = str(tmp_path / "el.csv")
    old = ExpertLoadLogger(path)
    for it in (10, 20, 30):
        old.log(it, loads_for(it))
    new = ExpertLoadLogger(path)  # resumed from the checkpoint at 10: logs 20 and 30 again
    new.log(20, loads_for(99))
    records = read_expert_load_csv(path)
    assert records.iterations.tolist() == [10] * 3 + [20] * 3
    assert_rows_equal(records, 3, 20, loads_for(99))
    assert len(read_expert_load_csv(path, keep_superseded=True).rows) == 12
    ExpertLoadLogger(path).log(20, loads_for(98))  # resumed again at the same iteration
    records = read_expert_load_csv(path)
    assert records.iterations.tolist() == [10] * 3 + [20] * 3
    assert_rows_equal(records, 3, 20, loads_for(98))


def test_csv_rejects_a_different_header(tmp_path):
    path = str(tmp_path / "el.csv")
    ExpertLoadLogger(path).log(10, loads_for(1))
    other = summarize([[1.0] * 16], [[0.0] * 16], [3])
    with pytest.raises(TelemetryError) as err:
        ExpertLoadLogger(path).log(20, other)
    assert path in str(err.value) and "16" in str(err.value) and str(E) in str(err.value)
    (tmp_path / "other.csv").write_text("step,loss\n1,2.0\n")
    with pytest.raises(TelemetryError, match="other.csv"):
        ExpertLoadLogger(str(tmp_path / "other.csv")).log(1, loads_for(1))


def test_torn_last_line_is_cut_before_appending(tmp_path):
    path = str(tmp_path / "el.csv")
    ExpertLoadLogger(path).log(10, loads_for(1))
    with open(path, "a") as f:
        f.write("20,3,1000,0.1")  # a crash mid-row
    assert read_expert_load_csv(path).iterations.tolist() == [10] * 3  # reader skips it
    ExpertLoadLogger(path).log(20, loads_for(2))
    records = read_expert_load_csv(path)
    assert records.iterations.tolist() == [10] * 3 + [20] * 3
    assert_rows_equal(records, 3, 20, loads_for(2))


def test_reader_errors_name_file_and_line(tmp_path):
    path = str(tmp_path / "el.csv")
    ExpertLoadLogger(path).log(10, loads_for(1))
    lines = open(path).read().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[3], "abc", 1)
    (tmp_path / "el.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(TelemetryError, match=r"el\.csv:3: column 'max_share': cannot parse 'abc'"):
        read_expert_load_csv(path)


def test_tensorboard_tags_and_values(tmp_path):
    tb = FakeTB()
    loads = loads_for(4)
    ExpertLoadLogger(None, tb_writer=tb, histograms=True).log(50, loads)
    for load in loads:
        tag = f"layer_{load.layer:02d}"
        assert tb.scalars[(f"expert_load/max_share/{tag}", 50)] == load.max_share
        assert tb.scalars[(f"expert_load/min_share/{tag}", 50)] == load.min_share
        assert tb.scalars[(f"expert_load/imbalance/{tag}", 50)] == load.imbalance
        assert tb.scalars[(f"expert_load/dead_experts/{tag}", 50)] == load.dead_experts
        assert tb.scalars[(f"expert_load/bias_norm/{tag}", 50)] == load.bias_norm
        np.testing.assert_array_equal(tb.histograms[(f"expert_load/shares/{tag}", 50)],
                                      load.shares)
    assert ("expert_load/max_share/layer_07", 50) in tb.scalars
    assert tb.scalars[("expert_load/max_share", 50)] == max(l.max_share for l in loads)
    assert tb.scalars[("expert_load/dead_experts", 50)] == sum(l.dead_experts for l in loads)
    assert tb.scalars[("expert_load/collapsed_experts", 50)] == \
        sum(len(l.collapsed_experts) for l in loads)
    assert len(tb.scalars) == 5 * 3 + 4 and not list(tmp_path.iterdir())


def test_real_tensorboard_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    loads = loads_for(5)
    ExpertLoadLogger(None, tb_writer=writer, histograms=True).log(7, loads)
    writer.close()
    events = EventAccumulator(str(tmp_path)).Reload()
    got = events.Scalars("expert_load/max_share/layer_07")
    assert [(e.step, e.value) for e in got] == [(7, pytest.approx(loads[1].max_share))]
    assert "expert_load/shares/layer_03" in events.Tags()["histograms"]


# --------------------------------------------------------------------------- plots


def write_csv(path, per_iteration):
    logger = ExpertLoadLogger(str(path))
    for it, counts in per_iteration:
        logger.log(it, summarize(counts, [[0.0] * len(counts[0])] * len(counts),
                                 range(2, 2 + len(counts))))
    return str(path)


def read_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def centre_pixels(image):
    """[n, 3] RGB pixels of the middle of the figure (inside the heatmap axes)."""
    h, w = image.shape[:2]
    return image[int(0.35 * h):int(0.65 * h), int(0.3 * w):int(0.6 * w), :3].reshape(-1, 3)


def test_heatmap_png_shows_the_skew(tmp_path):
    uniform = [[100.0] * 16 for _ in range(6)]
    skewed = [[float(10 + 60 * ((7 * e + 3 * l) % 5)) for e in range(16)] for l in range(6)]
    skewed[5] = [0.0] * 16  # a layer without tokens: drawn black
    u_png = plot_expert_heatmap(write_csv(tmp_path / "u.csv", [(10, uniform)]),
                                str(tmp_path / "u.png"))
    s_png = plot_expert_heatmap(write_csv(tmp_path / "s.csv", [(10, skewed)]),
                                str(tmp_path / "out" / "s.png"))
    assert s_png == str(tmp_path / "out" / "s.png")
    u_img, s_img = read_png(u_png), read_png(s_png)
    assert u_img.shape[0] > 200 and u_img.shape[1] > 400
    # A balanced layer is one flat colour (white); the skewed one varies and is not white.
    u_px, s_px = centre_pixels(u_img), centre_pixels(s_img)
    assert len(np.unique(u_px, axis=0)) == 1 and u_px.min() > 0.9
    assert s_px.std(axis=0).max() > 0.05 and len(np.unique(s_px, axis=0)) >= 5
    black = [np.mean(np.all(img[..., :3] == 0, axis=-1)) for img in (u_img, s_img)]
    assert black[0] < 0.01 and black[1] > 0.05
    assert sorted(os.listdir(tmp_path)) == ["out", "s.csv", "u.csv", "u.png"]  # no temp files
    assert os.listdir(tmp_path / "out") == ["s.png"]


def test_heatmap_window_is_token_weighted_and_bad_iteration_names_the_file(tmp_path):
    a = [[30.0, 10.0, 10.0, 10.0]]  # 60 tokens
    b = [[0.0, 60.0, 30.0, 30.0]]  # 120 tokens
    path = write_csv(tmp_path / "el.csv", [(10, a), (20, b), (30, a)])
    records = read_expert_load_csv(path)
    layers, matrix, used = heatmap_matrix(records, iteration=20, window=2)
    assert layers == [2] and used == [10, 20]
    np.testing.assert_allclose(matrix[0], [30 / 180, 70 / 180, 40 / 180, 40 / 180], rtol=1e-5)
    _, last, used = heatmap_matrix(records)
    assert used == [30]
    np.testing.assert_allclose(last[0], [0.5, 1 / 6, 1 / 6, 1 / 6], rtol=1e-5)
    assert heatmap_matrix(records, window=10)[2] == [10, 20, 30]
    with pytest.raises(TelemetryError) as err:
        plot_expert_heatmap(path, str(tmp_path / "x.png"), iteration=25)
    assert path in str(err.value) and "iteration 25" in str(err.value)
    assert not (tmp_path / "x.png").exists()


def test_plot_loss_and_loss_csv(tmp_path):
    records = [(i, 10.0 / (1 + i) ** 0.3) for i in range(0, 200, 5)]
    png = plot_loss(records, str(tmp_path / "loss.png"), logy=True,
                    second=[(i, v * 0.9) for i, v in records[::4]])
    assert read_png(png).shape[1] > 400
    with pytest.raises(TelemetryError):
        plot_loss([], str(tmp_path / "empty.png"))
    with pytest.raises(TelemetryError, match=r"records\[1\]"):
        plot_loss([(1, 2.0), ("x", 1.0)], str(tmp_path / "bad.png"))
    path = tmp_path / "losses.csv"
    path.write_text("iteration,loss,lr,grad_norm\n1,9.5,1e-4,2.0\n2,9.1,1e-4,\n3,,1e-4,1.0\n"
                    "4,8.7,1e-4,1.2\n3,8.8,1e-4,1.1\n")  # resumed at 2: row 3 and 4 superseded
    assert read_loss_csv(str(path)) == [(1, 9.5), (2, 9.1), (3, 8.8)]
    assert read_loss_csv(str(path), "grad_norm") == [(1, 2.0), (3, 1.1)]
    assert read_png(plot_loss_csv(str(path), str(tmp_path / "l.png"))).shape[0] > 200
    with pytest.raises(TelemetryError, match=r"losses\.csv:1: no 'val_loss' column"):
        plot_loss_csv(str(path), str(tmp_path / "v.png"), second_column="val_loss")
    path.write_text("iteration,loss\n1,9.5\n2,oops\n")
    with pytest.raises(TelemetryError, match=r"losses\.csv:3: column 'loss'"):
        read_loss_csv(str(path))


def test_plot_module_import_is_lazy():
    import subprocess
    import sys

    # Load the subpackage alone (as package `t`), without megatron_dots' heavy __init__.
    code = ("import sys, types; pkg = types.ModuleType('t'); pkg.__path__ = "
            f"[{os.path.dirname(plots.__file__)!r}]; sys.modules['t'] = pkg\n"
            "import t.plots\nprint('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- command


def test_main_exit_codes(tmp_path, capsys):
    path = write_csv(tmp_path / "el.csv", [(10, [[5.0, 1.0, 1.0, 1.0]]), (20, [[1.0] * 4])])
    out = str(tmp_path / "h.png")
    assert plots.main(["--csv", path, "--out", out, "--iteration", "10"]) == 0
    assert capsys.readouterr().out.strip() == out and read_png(out).size
    assert plots.main(["--csv", path, "--out", out, "--window", "2"]) == 0
    capsys.readouterr()
    for argv, needle in [
        (["--csv", path, "--out", out, "--iteration", "15"], "iteration 15"),
        (["--csv", path, "--out", out, "--window", "0"], "--window"),
        (["--csv", str(tmp_path / "missing.csv"), "--out", out], "missing.csv"),
        (["--out", out], "--csv"),
    ]:
        assert plots.main(argv) == 2
        err = capsys.readouterr().err
        assert "error:" in err and needle in err
    assert plots.main(["--help"]) == 0
    assert "--window" in capsys.readouterr().out
