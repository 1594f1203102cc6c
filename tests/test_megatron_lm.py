"""megatron-dots inside the real Megatron-LM: core_v0.16.1, core_v0.19.0 and main, each with
its own megatron-core (sources: ../shared/megatron-lm/, see megatron_lm_sources.py).

Per release, one process (tests/megatron_lm/worker.py) runs Megatron-LM's own parse_args /
validate_args / config builders on `megatron-dots megatron-lm-args` output and on
`--dots-model`, builds dots-tiny through `--spec` + Megatron-LM's GPTModelBuilder (core_v0.19+)
and through the launcher's builder, loads a `convert hf-to-mcore` checkpoint into each and
reports losses and logits, which are compared here with transformers' Dots1ForCausalLM.
"""

import json
import os
import re
import sys
import textwrap

import pytest
import torch

from launch import describe
from megatron_lm_sources import RELEASES, run, unpack
from reference import make_hf_model, tiny_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_lm", "worker.py")
CONFIG_CONTAINER = {"core_v0.16.1": False, "core_v0.19.0": True, "main": True}


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    return str(tmp_path_factory.mktemp("megatron-lm"))


@pytest.fixture(scope="module")
def hf_and_ckpt(tmp_path_factory):
    """A random tiny transformers Dots1 model and its `convert hf-to-mcore` checkpoint."""
    from megatron_dots.convert.hf_to_mcore import convert_hf_to_mcore

    cfg = tiny_config()
    model = make_hf_model(cfg, seed=5, bias_scale=0.3)
    base = tmp_path_factory.mktemp("mlm-ckpt")
    model.save_pretrained(str(base / "hf"))
    convert_hf_to_mcore(str(base / "hf"), str(base / "ckpt"), progress=False)
    return model, str(base / "ckpt")


def _worker(root, ckpt, out, *flags, nproc=1):
    proc = run(root, [WORKER, "--ckpt", ckpt, "--out", out, *flags], nproc=nproc)
    assert proc.returncode == 0, describe(proc)
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=sorted(RELEASES))
def release(request, sources, hf_and_ckpt, tmp_path_factory):
    """(name, what the worker saw) for one Megatron-LM release, in one process."""
    root = unpack(request.param, sources)
    out = str(tmp_path_factory.mktemp("mlm") / "result.json")
    return request.param, _worker(root, hf_and_ckpt[1], out, "--round-trip", "--bad-flags")


def assert_builds_match_transformers(result, model):
    """Every build's logits (<= 1e-4) and loss (<= 1e-5) on the worker's tokens equal
    transformers'."""
    tokens = torch.tensor(result["tokens"])
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1)).item()
    for name, build in result["builds"].items():
        ours = torch.tensor(build["logits"])[..., :logits.shape[-1]]
        assert (ours - logits).abs().max().item() <= 1e-4, name
        assert abs(build["loss"] - loss) <= 1e-5, name

def test_the_release_runs_its_own_megatron_core(release):
    name, result = release
    assert result["megatron_core"] == RELEASES[name][1]
    assert result["config_container_api"] == CONFIG_CONTAINER[name]


def test_megatron_lm_args_round_trip_through_megatron_lm(release):
    """Megatron-LM's parser + config builder turn `megatron-lm-args PRESET` back into PRESET."""
    _, result = release
    assert set(result["round_trip"]) == {"dots.llm1", "dots-mini", "dots-tiny"}
    for preset, seen in result["round_trip"].items():
        assert seen["equal"], (preset, seen["back"])


def test_models_megatron_lm_builds_hold_our_modules_and_shapes(release):
    name, result = release
    builds = result["builds"]
    expected = {"launcher", "spec"} if CONFIG_CONTAINER[name] else {"launcher"}
    assert set(builds) == expected
    assert builds["launcher"]["class"] == "DotsGPTModel"  # the overlap layer plan
    if "spec" in builds:
        assert builds["spec"]["class"] == "GPTModel"  # Megatron-LM's fixed model class
    for build in builds.values():
        assert build["moe_layers"] == tiny_config().num_layers - tiny_config().first_k_dense
        assert build["experts"] == "TorchGroupedExperts"  # --transformer-impl local
        assert build["same_parameters_as_build_dots_model"], build["parameter_diff"]


def test_converted_checkpoint_in_megatron_lm_model_gives_transformers_logits(release,
                                                                            hf_and_ckpt):
    assert_builds_match_transformers(release[1], hf_and_ckpt[0])


def test_flags_a_dots_model_cannot_have_are_errors_naming_the_flag(release):
    _, result = release
    assert len(result["bad_flags"]) == 7
    for case, seen in result["bad_flags"].items():
        assert seen["error"] and seen["flag"] in seen["error"], (case, seen)


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--ep", "2")], ids=["TP2+SP", "EP2"])
def test_tensor_and_expert_parallel_under_torchrun(layout, sources, hf_and_ckpt, tmp_path):
    """core_v0.19.0 under torchrun: both build paths load the converted checkpoint and give
    transformers' loss."""
    root = unpack("core_v0.19.0", sources)
    result = _worker(root, hf_and_ckpt[1], str(tmp_path / "r.json"), *layout, nproc=2)
    assert set(result["builds"]) == {"launcher", "spec"}
    for build in result["builds"].values():
        assert build["same_parameters_as_build_dots_model"], build["parameter_diff"]
    assert_builds_match_transformers(result, hf_and_ckpt[0])


# ------------------------------------------------------------- no silent stock model
GUARD = textwrap.dedent("""
    import json, sys, typing, typing_extensions
    typing.override = getattr(typing, "override", typing_extensions.override)  # Python 3.11
    import megatron.core
    megatron.core.__version__ = "0.15.0"  # a release megatron-dots does not support
    from megatron.training import arguments
    from megatron.training.argument_utils import gpt_config_from_args
    sys.argv = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "8",
                "--num-attention-heads", "2", "--max-position-embeddings", "16",
                "--seq-length", "16", "--micro-batch-size", "1", "--vocab-size", "64",
                "--spec", sys.argv[1], "dots_spec"]
    args = arguments.parse_args()
    arguments.validate_args(args, {})
    try:
        spec = gpt_config_from_args(args).transformer_layer_spec
        print("RESULT" + json.dumps({"spec": repr(spec)}))
    except Exception as err:
        print("RESULT" + json.dumps({"error": type(err).__name__, "message": str(err)}))
""")


@pytest.mark.parametrize("name", ["core_v0.19.0", "main"])
def test_a_broken_megatron_dots_import_is_never_a_silent_stock_model(name, sources):
    """Megatron-LM core_v0.19.0 turns an ImportError of the --spec module into its stock spec
    (main raises it); megatron-dots raises a RuntimeError instead, which stops both."""
    root = unpack(name, sources)

    def spec_of(module):
        proc = run(root, ["-c", GUARD, module])
        assert proc.returncode == 0, describe(proc)
        return json.loads(proc.stdout.split("RESULT")[-1])

    # The upstream behaviour the guard exists for.
    missing = spec_of("megatron_dots_no_such_module")
    if name == "core_v0.19.0":
        assert missing == {"spec": "None"}  # silently the stock spec
    else:
        assert missing["error"] == "ImportError"
    ours = spec_of("megatron_dots.megatron_lm.spec")
    assert ours["error"] == "MegatronDotsImportError"
    assert "0.15.0" in ours["message"] and "megatron-core" in ours["message"]


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_launcher_rejects_bad_flags_before_megatron_lm_starts(name, sources):
    root = unpack(name, sources)
    cases = (
        (["--dots-model", "dots-tiny", "--moe-router-score-function", "softmax"],
         "--moe-router-score-function sigmoid"),
        (["--dots-model", "dots-tiny", "--dots-batch-stages", "0:1M"],
         "--dots-batch-stages is a `megatron-dots pretrain` flag"),
        (["--num-layers", "2"], "needs --dots-model PRESET"),
    )
    common = ["--micro-batch-size", "1", "--global-batch-size", "8", "--seq-length", "16",
              "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--tokenizer-type",
              "NullTokenizer", "--vocab-size", "500", "--transformer-impl", "local"]
    for flags, message in cases:
        proc = run(root, ["-m", "megatron_dots.megatron_lm.launch", *flags, *common],
                   timeout=300)
        assert proc.returncode == 2, describe(proc)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("megatron-dots launch: error:") and message in last, last
        assert "initialize_megatron" not in proc.stderr and "Traceback" not in proc.stderr


def test_launcher_refuses_a_megatron_lm_with_another_megatron_core(sources):
    """This process imported the installed megatron-core; a checkout of another release is an
    error naming both versions."""
    import megatron.core

    from megatron_dots.megatron_lm.launch import LaunchError, check_pairing, checkout_core_version

    root = unpack("main", sources)
    assert checkout_core_version(root) == "0.20.0"
    with pytest.raises(LaunchError) as err:
        check_pairing(root)
    assert "megatron-core 0.20.0" in str(err.value)
    assert f"megatron-core {megatron.core.__version__}" in str(err.value)


def test_launcher_without_a_checkout_names_the_variable(tmp_path):
    from megatron_dots.megatron_lm.launch import LaunchError, locate_megatron_lm

    with pytest.raises(LaunchError, match="has no pretrain_gpt.py"):
        locate_megatron_lm({"MEGATRON_LM_DIR": str(tmp_path)})


def test_megatron_lm_args_command(capsys):
    from megatron_dots.cli import main

    assert main(["megatron-lm-args", "dots.llm1"]) == 0
    words = capsys.readouterr().out.split()
    assert all(not re.search(r"[\s'\"]", w) for w in words)
    flags = dict(zip(words, words[1:]))
    assert flags["--moe-layer-freq"] == "([0]*1+[1]*61)"
    assert flags["--padded-vocab-size"] == "152064"
    assert flags["--moe-router-topk-scaling-factor"] == "2.5"
    assert main(["megatron-lm-args", "dots.llm1", "--tensor-model-parallel-size", "8",
                 "--lines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index("--padded-vocab-size") + 1] == "152576"  # 128 x 8 multiple
    assert main(["megatron-lm-args", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_gpu_suite_step_lists_every_release_and_path(tmp_path):
    """bench/megatron_lm_gpu.sh (Megatron-LM's pretrain() needs a GPU) in its dry run."""
    import subprocess

    from launch import REPO_ROOT

    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "bench", "megatron_lm_gpu.sh"),
                           str(tmp_path)], env=dict(os.environ, GPU_SUITE_DRY_RUN="1",
                                                    MEGATRON_DOTS_QUIET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    commands = [line for line in proc.stdout.splitlines() if line.startswith("MEGATRON_LM_DIR=")]
    launcher = [c for c in commands if "megatron_dots.megatron_lm.launch" in c]
    spec = [c for c in commands if "--spec megatron_dots.megatron_lm.spec dots_spec" in c]
    assert len(launcher) == 3 and len(spec) == 2, proc.stdout
    assert all("--bf16 --use-distributed-optimizer" in c for c in commands)
    assert all("--moe-router-score-function sigmoid" in c for c in spec)
