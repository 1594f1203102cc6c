"""The `megatron-dots` console script: help, info, bad input, and the demo end to end."""

import json
import os
import subprocess
import sys

import pytest


def cli(*args, timeout=600):
    env = dict(os.environ, MEGATRON_DOTS_QUIET="1")
    return subprocess.run([sys.executable, "-m", "megatron_dots.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "info" in out.stdout


def test_unknown_command_is_an_error():
    out = cli("frobnicate")
    assert out.returncode == 2 and "frobnicate" in out.stderr


def test_info_prints_parameter_counts():
    out = cli("info", "dots.llm1")
    assert out.returncode == 0
    assert "142.8B" in out.stdout and "14.0B" in out.stdout


def test_info_rejects_bad_config_naming_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = cli("info", str(tmp_path))
    assert out.returncode == 2 and "model_type" in out.stderr and str(tmp_path) in out.stderr


def test_demo_flags_are_validated():
    out = cli("demo", "--steps", "0")
    assert out.returncode == 2 and "--steps" in out.stderr
    out = cli("demo", "--bias-update-rate", "-1")
    assert out.returncode == 2 and "--bias-update-rate" in out.stderr


def test_demo_trains_resumes_plots_and_matches_transformers(tmp_path):
    out = cli("demo", "--steps", "60", "--log-interval", "20", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
    assert summary["valid_loss"] < summary["uniform_loss"], summary
    assert summary["hf_max_abs_logit_diff"] <= 1e-4 and summary["hf_top1_agreement"] == 1.0
    assert summary["resumed_at"] == 30 and "resumed from" in out.stdout
    assert summary["generation"].startswith("Return a new") and len(summary["generation"]) > 20
    # The loss CSV spans both runs; the tokenizer travelled with the export.
    rows = (tmp_path / "ckpt" / "losses.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 61)]
    for name in ("hf/config.json", "hf/tokenizer.json", "expert_load.png", "loss.png",
                 "expert_balance.png", "ckpt/expert_load.csv", "ckpt/iter_0000030",
                 "ckpt/iter_0000060"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "expert_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The demo's bias update rate reaches pretrain; the end-of-run report is in the summary.
    assert "--moe-router-bias-update-rate 0.01" in out.stdout and "demo setting" in out.stdout
    assert summary["bias_update_rate"] == 0.01
    assert sorted(summary["final_max_share"]) == ["2", "3", "4"]
    assert "expert load at iteration 60: max share layer 2" in out.stdout

    # The SFT example on the demo's model: fine-tune, export, chat through transformers.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sft = subprocess.run([sys.executable, os.path.join(root, "examples", "sft_demo_model.py"),
                          str(tmp_path), "--steps", "12"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, MEGATRON_DOTS_QUIET="1",
                                               PYTHONPATH=os.pathsep.join(
                                                   [root, os.environ.get("PYTHONPATH", "")])))
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert sft.stdout.count("  Assistant: ") == 4, sft.stdout[-2000:]
    rows = (tmp_path / "sft" / "ckpt" / "losses.csv").read_text().splitlines()[1:]
    sft_losses = [float(r.split(",")[1]) for r in rows]
    assert len(sft_losses) == 12 and sum(sft_losses[-3:]) < sum(sft_losses[:3]), sft_losses
    assert (tmp_path / "sft" / "hf" / "chat_template.jinja").exists()


def test_import_prints_one_informative_line():
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_DOTS_QUIET", "RANK")}
    out = subprocess.run([sys.executable, "-c", "import megatron_dots"], capture_output=True,
                         text=True, timeout=300, env=env)
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0
    assert len(lines) == 1 and lines[0].startswith("megatron-dots: megatron-core"), lines


def test_ci_runs_the_readme_test_command():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:]]
    assert blocks[:2] == ["pip install -e . && megatron-dots demo",
                          "pip install -e '.[test]' && python -m pytest"]
    ci_lines = [line.strip() for line in open(os.path.join(root, ".ci", "run"))]
    assert blocks[1] in ci_lines, "the README's test command must be a line of .ci/run verbatim"
