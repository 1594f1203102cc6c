"""bench/layer_bench.py runs end to end on CPU (dots-tiny) and its ours-vs-mcore check holds.

Only that the benchmark works and compares the right things; its timings are for the GPU.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layer_bench_smoke(tmp_path):
    out = tmp_path / "layer_bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "layer_bench.py"), "--model", "dots-tiny",
           "--batch", "2", "--seq", "32", "--iters", "1", "--warmup", "0",
           "--cases", "ours-layer,ours-moe,mcore-layer,mcore-moe,hf-moe,experts-balanced",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ours-layer", "ours-moe", "mcore-layer", "mcore-moe",
                                      "hf-moe", "experts-balanced"}
    for case, result in report["results"].items():
        assert result["ms"] > 0 and result["tflops"] > 0 and result["tokens_per_s"] > 0, case
    check = report["ours_vs_mcore"]
    assert check["routing_identical"] is True
    assert check["layer"] < 1e-5 and check["moe"] < 1e-5
    assert check["reference_abs_max"] > 0.1  # not a comparison of near-zero outputs
    assert "routing identical: True" in proc.stdout
