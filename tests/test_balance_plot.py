"""Expert balance over time (`plot-experts --over-time`): the plotted numbers against hand
computation, the PNG, bad input naming the file, and the demo's end-of-run balance report."""

import math
import os

import numpy as np
import pytest

from megatron_dots.demo import expert_balance_report
from megatron_dots.telemetry import (
    ExpertLoadLogger,
    TelemetryError,
    balance_series,
    plot_expert_balance,
    read_expert_load_csv,
    summarize,
)
from megatron_dots.telemetry import plots


def log_rows(path, per_iteration):
    """Write an expert-load CSV: per_iteration is [(iteration, {layer: counts})]."""
    logger = ExpertLoadLogger(str(path))
    for iteration, by_layer in per_iteration:
        layers = sorted(by_layer)
        counts = [by_layer[layer] for layer in layers]
        logger.log(iteration, summarize(counts, np.zeros((len(counts), len(counts[0]))), layers))
    return str(path)


def hand_csv(path):
    # E = 4. Layer 2: skewed, then balanced, then mildly skewed; layer 3: no tokens at 10,
    # all on one expert at 20, not logged at 30.
    return log_rows(path, [
        (10, {2: [30.0, 10.0, 10.0, 10.0], 3: [0.0, 0.0, 0.0, 0.0]}),
        (20, {2: [10.0, 10.0, 10.0, 10.0], 3: [40.0, 0.0, 0.0, 0.0]}),
        (30, {2: [20.0, 10.0, 5.0, 5.0]}),
    ])


def cv(counts):
    """std / mean of the shares, by hand (population variance)."""
    total = sum(counts)
    shares = [c / total for c in counts]
    mean = sum(shares) / len(shares)
    return math.sqrt(sum((s - mean) ** 2 for s in shares) / len(shares)) / mean


def test_balance_series_matches_hand_computation(tmp_path):
    series = balance_series(read_expert_load_csv(hand_csv(tmp_path / "el.csv")))
    nan = math.nan
    assert series.layers == [2, 3] and series.iterations.tolist() == [10, 20, 30]
    assert series.num_experts == 4 and series.uniform == 0.25
    assert series.collapse_threshold == 0.5  # 2/E beats the absolute 10% for 4 experts
    expected_max = [[0.5, 0.25, 0.5], [nan, 1.0, nan]]
    expected_min = [[1 / 6, 0.25, 0.125], [nan, 0.0, nan]]
    np.testing.assert_allclose(series.max_share, expected_max, rtol=1e-5)
    np.testing.assert_allclose(series.min_share, expected_min, rtol=1e-5)
    np.testing.assert_allclose(series.imbalance, 4 * np.array(expected_max), rtol=1e-5)
    # 30/10/10/10: 1/sqrt(3); balanced: 0; one expert takes all: sqrt(E - 1).
    assert cv([30, 10, 10, 10]) == pytest.approx(1 / math.sqrt(3))
    expected_cv = [[1 / math.sqrt(3), 0.0, cv([20, 10, 5, 5])], [nan, math.sqrt(3), nan]]
    np.testing.assert_allclose(series.cv, expected_cv, rtol=1e-5, atol=1e-12)
    # The imbalance equals the CSV's own column where the layer saw tokens.
    records = read_expert_load_csv(str(tmp_path / "el.csv"))
    for row in records.rows:
        if row["tokens"]:
            i = series.layers.index(row["layer"])
            j = series.iterations.tolist().index(row["iteration"])
            assert series.imbalance[i, j] == pytest.approx(row["imbalance"], rel=1e-5)
    # last(): each layer's last logged max share with tokens.
    assert series.last() == pytest.approx({2: 0.5, 3: 1.0}, rel=1e-5)


def test_balance_series_follows_a_resumed_run(tmp_path):
    path = log_rows(tmp_path / "el.csv", [(10, {2: [30.0, 10.0, 10.0, 10.0]}),
                                          (20, {2: [40.0, 0.0, 0.0, 0.0]})])
    log_rows(path, [(20, {2: [10.0, 10.0, 10.0, 10.0]})])  # resumed at 10: supersedes 20
    series = balance_series(read_expert_load_csv(path))
    assert series.iterations.tolist() == [10, 20]
    np.testing.assert_allclose(series.max_share, [[0.5, 0.25]], rtol=1e-5)


def test_plot_expert_balance_writes_a_png(tmp_path):
    png = plot_expert_balance(hand_csv(tmp_path / "el.csv"), str(tmp_path / "out" / "b.png"))
    assert png == str(tmp_path / "out" / "b.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 20  # lines, not a blank
    assert os.listdir(tmp_path / "out") == ["b.png"]  # no temp files
    # Many layers: coloured by depth with a colour bar instead of a legend.
    rng = np.random.default_rng(0)
    many = log_rows(tmp_path / "many.csv", [
        (it, {layer: rng.integers(1, 50, size=16).astype(float).tolist()
              for layer in range(2, 26)}) for it in range(10, 510, 10)])
    assert os.path.getsize(plot_expert_balance(many, str(tmp_path / "many.png"))) > 10_000


def test_bad_csv_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("iteration,layer,oops\n1,2,3\n")
    empty = tmp_path / "empty.csv"
    log_rows(tmp_path / "seed.csv", [(10, {2: [1.0, 1.0]})])
    empty.write_text((tmp_path / "seed.csv").read_text().splitlines()[0] + "\n")  # header only
    for path in (bad, empty):
        with pytest.raises(TelemetryError, match=str(path)):
            plot_expert_balance(str(path), str(tmp_path / "x.png"))
        assert plots.main(["--csv", str(path), "--out", str(tmp_path / "x.png"),
                           "--over-time"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_plot_experts_over_time_command(tmp_path, capsys):
    path = hand_csv(tmp_path / "el.csv")
    out = str(tmp_path / "b.png")
    assert plots.main(["--csv", path, "--out", out, "--over-time"]) == 0
    assert capsys.readouterr().out.strip() == out and os.path.getsize(out) > 0
    assert plots.main(["--csv", path, "--out", out, "--over-time", "--iteration", "10"]) == 2
    assert "--over-time" in capsys.readouterr().err
    assert plots.main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--over-time" in help_text and "coefficient of variation" in help_text
    assert "max / mean load" in help_text


def test_demo_balance_report(tmp_path):
    skew, flat = [70.0, 10.0, 10.0, 10.0], [25.0] * 4
    path = log_rows(tmp_path / "el.csv", [(10, {2: skew, 3: flat}), (20, {2: flat, 3: flat}),
                                          (30, {2: flat, 3: [30.0, 25.0, 25.0, 20.0]})])
    report = expert_balance_report(path)
    assert report["alarm_iterations"] == [10]
    assert report["final_max_share"] == pytest.approx({"2": 0.25, "3": 0.3})
    assert "layer 2 25.0%, layer 3 30.0%" in report["text"]
    assert "none in the last 2" in report["text"]
    path = log_rows(tmp_path / "calm.csv", [(10, {2: flat})])
    assert "no collapse or dead-expert alarm" in expert_balance_report(path)["text"]
    path = log_rows(tmp_path / "bad.csv", [(10, {2: flat}), (20, {2: skew})])
    report = expert_balance_report(path)
    assert report["alarm_iterations"] == [20] and "still at the last log" in report["text"]
