"""patches/megatron-lm-*-pretrain_gpt.patch and the hooks it calls (megatron_dots.megatron_lm).

The patch is applied (`git apply --check`) to MEGATRON_LM_DIR, else to the core_v0.16.1 source
archive of ../shared/megatron-lm/ (megatron_lm_sources.py). The hooks are
tested here with a parser that has Megatron-LM's flag names and defaults for the flags they
touch.
"""

import argparse
import glob
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_dots.compat.versions import HAVE_TE

from megatron_dots import DotsConfig
from megatron_dots import megatron_lm
from megatron_dots.megatron_lm import (
    DotsArgumentError, add_dots_args, check_transformer_config, dots_config_from_args,
    dots_model_provider, validate_dots_args,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = sorted(glob.glob(os.path.join(REPO, "patches", "megatron-lm-*-pretrain_gpt.patch")))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A Megatron-LM tree at the patch's tag: MEGATRON_LM_DIR, else the source archive."""
    from megatron_lm_sources import unpack

    return os.environ.get("MEGATRON_LM_DIR") or unpack(megatron_lm.MEGATRON_LM_TAG,
                                                       str(tmp_path_factory.mktemp("mlm")))


# ------------------------------------------------------------------------ the patch file
def test_one_patch_for_the_targeted_tag():
    assert [os.path.basename(p) for p in PATCHES] == [
        f"megatron-lm-{megatron_lm.MEGATRON_LM_TAG}-pretrain_gpt.patch"]


def parse_unified_diff(text):
    """[(old_start, old_len, new_start, new_len, lines)] of a one-file unified diff; asserts
    the headers name pretrain_gpt.py and every hunk's line counts match its header."""
    lines = text.splitlines()
    headers = [(i, line) for i, line in enumerate(lines) if line.startswith(("--- ", "+++ "))]
    assert [h for _, h in headers] == ["--- a/pretrain_gpt.py", "+++ b/pretrain_gpt.py"]
    hunks, i = [], headers[-1][0] + 1
    while i < len(lines):
        match = re.fullmatch(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@.*", lines[i])
        assert match, f"line {i + 1}: expected a hunk header, got {lines[i]!r}"
        old_start, old_len, new_start, new_len = map(int, match.groups())
        body, old, new, i = [], 0, 0, i + 1
        while i < len(lines) and (old < old_len or new < new_len):
            line = lines[i]
            assert line[:1] in (" ", "-", "+") or line == "", f"line {i + 1}: {line!r}"
            old += line[:1] in (" ", "-", "")
            new += line[:1] in (" ", "+", "")
            body.append(line)
            i += 1
        assert (old, new) == (old_len, new_len), f"hunk at -{old_start}: counts do not match"
        hunks.append((old_start, old_len, new_start, new_len, body))
    return hunks


@pytest.mark.parametrize("path", PATCHES, ids=os.path.basename)
def test_patch_is_a_well_formed_diff_of_pretrain_gpt(path):
    with open(path) as handle:
        hunks = parse_unified_diff(handle.read())
    assert hunks
    shift = 0
    for old_start, old_len, new_start, new_len, _ in hunks:
        assert new_start == old_start + shift
        shift += new_len - old_len


@pytest.mark.parametrize("path", PATCHES, ids=os.path.basename)
def test_patch_uses_only_hooks_that_exist(path):
    with open(path) as handle:
        added = "\n".join(line[1:] for _, _, _, _, body in parse_unified_diff(handle.read())
                          for line in body if line.startswith("+"))
    imported = re.findall(r"from megatron_dots\.megatron_lm import ([\w, ]+)", added)
    names = [n.strip() for group in imported for n in group.split(",")]
    assert names == ["add_dots_args", "dots_model_provider"]
    for name in names:
        assert name in megatron_lm.__all__ and callable(getattr(megatron_lm, name))
    # The calls the patch makes bind to the hooks' signatures.
    inspect.signature(dots_model_provider).bind(
        "args", True, False, None, config=None, pg_collection=None)
    inspect.signature(add_dots_args).bind(argparse.ArgumentParser())
    assert re.search(r"dots_model_provider\(\s*args, pre_process, post_process, vp_stage, "
                     r"config=config, pg_collection=pg_collection\s*\)", added)
    assert "parser = add_dots_args(parser)" in added


@pytest.mark.parametrize("path", PATCHES, ids=os.path.basename)
def test_patch_applies_to_the_checkout(path, checkout):
    result = subprocess.run(["git", "apply", "--check", "-v", path], cwd=checkout,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------- the hooks, Megatron-LM style
def _freq(text):
    """Megatron-LM's moe_freq_type: an int, or a Python list expression."""
    return eval(text, {"__builtins__": {}}) if "[" in text else int(text)  # noqa: S307


def megatron_lm_parser():
    """The flags the hooks touch, with Megatron-LM core_v0.16.1's names and defaults."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag, kind, default in (
        ("--num-layers", int, None), ("--hidden-size", int, None),
        ("--ffn-hidden-size", int, None), ("--num-attention-heads", int, None),
        ("--kv-channels", int, None), ("--num-query-groups", int, 1),
        ("--max-position-embeddings", int, None), ("--position-embedding-type", str,
                                                   "learned_absolute"),
        ("--rotary-base", int, 10000), ("--rotary-percent", float, 1.0),
        ("--normalization", str, "LayerNorm"), ("--init-method-std", float, 0.02),
        ("--hidden-dropout", float, 0.1), ("--attention-dropout", float, 0.1),
        ("--num-experts", int, None), ("--moe-ffn-hidden-size", int, None),
        ("--moe-router-topk", int, 2), ("--moe-shared-expert-intermediate-size", int, None),
        ("--moe-layer-freq", _freq, 1), ("--moe-router-score-function", str, "softmax"),
        ("--moe-router-topk-scaling-factor", float, None), ("--moe-router-dtype", str, None),
        ("--moe-router-bias-update-rate", float, 1e-3),
        ("--moe-token-dispatcher-type", str, "allgather"),
        ("--make-vocab-size-divisible-by", int, 128),
        ("--tensor-model-parallel-size", int, 1), ("--pipeline-model-parallel-size", int, 1),
        ("--expert-model-parallel-size", int, 1), ("--transformer-impl", str,
                                                   "transformer_engine"),
    ):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--norm-epsilon", type=float, default=1e-5, dest="layernorm_epsilon")
    p.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    p.add_argument("--moe-router-load-balancing-type", nargs="+", default="aux_loss")
    p.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0)
    for flag in ("--group-query-attention", "--swiglu", "--untie-embeddings-and-output-weights",
                 "--add-qkv-bias", "--qk-layernorm", "--moe-router-enable-expert-bias", "--bf16"):
        p.add_argument(flag, action="store_true")
    return p


def megatron_lm_args(*argv):
    """Parse like Megatron-LM's parse_args(extra_args_provider=add_dots_args), then the
    validate_args normalisations the hooks rely on."""
    parser = add_dots_args(megatron_lm_parser(), argv=list(argv))
    args = parser.parse_args(list(argv))
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(args, name)
        if isinstance(value, list) and len(value) == 1:
            setattr(args, name, value[0])
    args.virtual_pipeline_model_parallel_size = None
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float32
    args.padded_vocab_size = None
    return args


TINY = ("--dots-model", "dots-tiny", "--transformer-impl", "local")


def test_the_preset_becomes_the_default_of_megatron_lm_model_flags():
    args = megatron_lm_args(*TINY)
    tiny = DotsConfig.preset("dots-tiny")
    assert (args.num_layers, args.hidden_size, args.num_experts, args.moe_router_topk) == (
        tiny.num_layers, tiny.hidden_size, tiny.num_moe_experts, tiny.moe_router_topk)
    assert args.moe_layer_freq == [0, 1, 1, 1]
    assert args.moe_shared_expert_intermediate_size == 2 * tiny.moe_ffn_hidden_size
    assert (args.normalization, args.position_embedding_type, args.swiglu,
            args.untie_embeddings_and_output_weights, args.add_bias_linear,
            args.qk_layernorm) == ("RMSNorm", "rope", True, True, False, True)
    assert (args.moe_router_score_function, args.moe_router_enable_expert_bias,
            args.moe_router_dtype, args.moe_router_load_balancing_type) == (
        "sigmoid", True, "fp32", "seq_aux_loss")
    assert dots_config_from_args(args) == tiny
    # Without --dots-model nothing changes.
    plain = megatron_lm_args("--num-layers", "2")
    assert (plain.normalization, plain.num_experts, plain.dots_model) == ("LayerNorm", None, None)


def test_explicit_megatron_lm_flags_override_the_preset():
    args = megatron_lm_args(*TINY, "--num-layers", "6", "--moe-router-topk", "3")
    cfg = dots_config_from_args(args)
    assert (cfg.num_layers, cfg.moe_router_topk, cfg.first_k_dense) == (6, 3, 1)
    assert args.moe_layer_freq == [0, 1, 1, 1, 1, 1]
    args = megatron_lm_args(*TINY, "--moe-layer-freq", "([0]*2+[1]*2)")
    assert dots_config_from_args(args).first_k_dense == 2


def test_conflicting_flags_are_a_parse_error_naming_them(capsys):
    with pytest.raises(SystemExit):
        megatron_lm_args(*TINY, "--moe-layer-freq", "([0]*2+[1]*2)", "--dots-first-k-dense", "1")
    err = capsys.readouterr().err
    assert "--moe-layer-freq" in err and "--dots-first-k-dense is 1" in err
    with pytest.raises(SystemExit):
        megatron_lm_args(*TINY, "--moe-shared-expert-intermediate-size", "48")
    assert "--moe-shared-expert-intermediate-size 48 must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        megatron_lm_args(*TINY, "--moe-router-topk", "9")
    assert "moe_router_topk=9 exceeds" in capsys.readouterr().err


def test_provider_builds_the_dots_model(seeded):
    """The model Megatron-LM's pretrain_gpt.py gets: parameter count of the DotsConfig plus
    the vocabulary padding of --make-vocab-size-divisible-by; the forward pass runs."""
    args = megatron_lm_args(*TINY, "--make-vocab-size-divisible-by", "96")
    cfg = dots_config_from_args(args)
    model = dots_model_provider(args, pre_process=True, post_process=True)
    padded = cfg.padded_vocab_size(1)
    assert padded == 576 > cfg.vocab_size
    expected = cfg.num_parameters()[0] + 2 * (padded - cfg.vocab_size) * cfg.hidden_size
    assert sum(p.numel() for p in model.parameters()) == expected
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    loss = model(tokens, positions, None, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    logits = model(tokens, positions, None)
    assert logits.shape == (2, 16, padded)


@pytest.mark.parametrize("extra,experts", [
    ((), "TorchGroupedExperts" if not HAVE_TE else "TEGroupedMLP"),
    (("--transformer-impl", "local"), "TorchGroupedExperts"),
    (("--transformer-impl", "local", "--dots-expert-backend", "sequential"), "SequentialMLP"),
])
def test_provider_backend_follows_the_flags(seeded, extra, experts):
    model = dots_model_provider(megatron_lm_args(*TINY, *extra))
    assert type(model.decoder.layers[-1].mlp.experts).__name__ == experts


def test_provider_rejects_flags_a_dots_model_cannot_have(single_process_world):
    cases = (
        (("--normalization", "LayerNorm"), "--normalization RMSNorm"),
        (("--position-embedding-type", "learned_absolute"), "--position-embedding-type rope"),
        (("--moe-router-score-function", "softmax"), "--moe-router-score-function sigmoid"),
        (("--expert-model-parallel-size", "3"), "--expert-model-parallel-size 3 does not divide"),
        (("--dots-batch-stages", "0:1M"), "--dots-batch-stages is a `megatron-dots pretrain`"),
        (("--dots-a2a-overlap",), "use Megatron-LM's --overlap-moe-expert-parallel-comm"),
    )
    for extra, message in cases:
        args = megatron_lm_args(*TINY, *extra)
        with pytest.raises(DotsArgumentError, match=re.escape(message)):
            dots_model_provider(args)
    args = megatron_lm_args(*TINY)
    args.padded_vocab_size = 1024  # a tokenizer larger than the preset's vocabulary
    with pytest.raises(DotsArgumentError, match="padded vocabulary"):
        validate_dots_args(args)
    # Megatron-LM args without the preset defaults (only half the patch applied).
    bare = argparse.Namespace(dots_model="dots-tiny", num_layers=4, hidden_size=64,
                              num_attention_heads=4, num_experts=None)
    with pytest.raises(DotsArgumentError, match="extra_args_provider"):
        dots_config_from_args(bare)


def test_a_transformer_config_that_disagrees_names_the_flags(single_process_world):
    cfg = DotsConfig.preset("dots-tiny")
    check_transformer_config(cfg.to_transformer_config(), cfg)
    other = cfg.replace(num_layers=6).to_transformer_config(normalization="LayerNorm")
    with pytest.raises(DotsArgumentError) as err:
        check_transformer_config(other, cfg)
    assert "--num-layers" in str(err.value) and "--normalization" in str(err.value)


def test_megatron_lm_parser_validate_args_and_config_accept_the_preset(single_process_world,
                                                                       monkeypatch, checkout):
    """Megatron-LM's own parse_args / validate_args / core_transformer_config_from_args with
    the hook as extra_args_provider (needs megatron.training importable from the checkout)."""
    # `megatron` is a namespace package: megatron.core stays the installed one (same
    # release as the tag), megatron.training comes from the checkout.
    from megatron_dots.compat.versions import MCORE_016

    if not MCORE_016:  # .ci/run deselects it on the other megatron-core passes
        pytest.skip("the patch's Megatron-LM (core_v0.16.1) runs with megatron-core 0.16")
    monkeypatch.setattr(sys, "path", sys.path + [checkout])
    try:
        from megatron.training import arguments as mlm
    except Exception as err:  # e.g. triton / transformer_engine missing on this machine
        pytest.fail(f"megatron.training from {checkout} is not importable here: {err!r}")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", [
        "pretrain_gpt.py", *TINY, "--micro-batch-size", "1", "--global-batch-size", "4",
        "--seq-length", "32", "--train-iters", "2", "--lr", "1e-4", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
        # CPU without Transformer Engine / apex:
        "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion", "--no-persist-layer-norm", "--no-bias-dropout-fusion",
        "--use-cpu-initialization"])
    args = mlm.parse_args(extra_args_provider=add_dots_args)
    mlm.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    cfg = validate_dots_args(args)
    assert cfg == DotsConfig.preset("dots-tiny")
    check_transformer_config(mlm.core_transformer_config_from_args(args), cfg)
