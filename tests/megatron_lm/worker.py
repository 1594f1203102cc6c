"""Megatron-LM's own code with megatron-dots, one release per process (also under torchrun).

Run with a Megatron-LM source tree first on PYTHONPATH (its `megatron/core` is the
megatron-core in use). Every rank:
  1. (rank 0, --round-trip) parses `megatron-lm-args PRESET` for every preset with Megatron-LM's
     own parser and validate_args and reads Megatron-LM's model config back into a DotsConfig;
  2. builds dots-tiny the way Megatron-LM builds models: through `--spec` and Megatron-LM's
     GPTModelBuilder (core_v0.19+), and through the launcher's builder (DotsGPTModelBuilder on
     core_v0.19+, Megatron-LM's model_provider on core_v0.16);
  3. loads --ckpt (a `convert hf-to-mcore` output) into each model and computes the loss (and,
     in one process, logits) of fixed tokens;
  4. (rank 0, --bad-flags) feeds flag sets a dots model cannot have to both paths.
Rank 0 writes what it saw to --out (JSON); the test compares it with transformers.
"""

import argparse
import json
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)

import megatron_dots  # noqa: E402,F401
from megatron_dots.compat import megatron_lm_api as api  # noqa: E402  (before megatron.training)
from megatron.core import parallel_state  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tensor_parallel import (  # noqa: E402
    gather_from_tensor_model_parallel_region, model_parallel_cuda_manual_seed,
)
from megatron.training import arguments as mlm_arguments, global_vars  # noqa: E402

from megatron_dots import DotsConfig, build_dots_model  # noqa: E402
from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.config import PRESETS  # noqa: E402
from megatron_dots.megatron_lm import launch  # noqa: E402
from megatron_dots.megatron_lm.arguments import DotsArgumentError, add_dots_args  # noqa: E402
from megatron_dots.megatron_lm.guard import check_dots_modules  # noqa: E402
from megatron_dots.megatron_lm.model_config import dots_config_from_model_config  # noqa: E402
from megatron_dots.megatron_lm.native_flags import megatron_lm_flags  # noqa: E402
from megatron_dots.training.checkpointing import load_checkpoint  # noqa: E402

SPEC = ["--spec", "megatron_dots.megatron_lm.spec", "dots_spec"]
# What any Megatron-LM run needs besides the model, on CPU without TE / apex.
RUN = ["--micro-batch-size", "1", "--global-batch-size", "8", "--seq-length", "16",
       "--train-iters", "2", "--lr", "1e-4", "--mock-data", "--tokenizer-type", "NullTokenizer",
       "--vocab-size", "500", "--transformer-impl", "local", "--use-cpu-initialization",
       "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--no-masked-softmax-fusion",
       "--no-bias-swiglu-fusion", "--no-persist-layer-norm", "--no-bias-dropout-fusion"]
def _replace(words, flag, value):
    """`words` with the value of `flag` replaced (or the flag removed when value is None)."""
    i = words.index(flag)
    takes_value = i + 1 < len(words) and not words[i + 1].startswith("--")
    rest = words[i + 1 + takes_value:]
    return words[:i] + ([] if value is None else [flag, value]) + rest


# flag sets a dots model cannot have -> the flag the error must name
BAD = {
    "softmax router": (lambda w: _replace(_replace(w, "--moe-router-enable-expert-bias", None),
                                          "--moe-router-score-function", "softmax"),
                       "--moe-router-score-function sigmoid"),
    "no expert bias": (lambda w: _replace(w, "--moe-router-enable-expert-bias", None),
                       "--moe-router-enable-expert-bias"),
    "tied embeddings": (lambda w: _replace(w, "--untie-embeddings-and-output-weights", None),
                        "--untie-embeddings-and-output-weights"),
    "not dots' layer pattern": (lambda w: _replace(w, "--moe-layer-freq", "([1]*1+[0]*3)"),
                                "--moe-layer-freq"),
    "aux loss": (lambda w: _replace(w, "--moe-router-load-balancing-type", "aux_loss"),
                 "--moe-router-load-balancing-type seq_aux_loss"),
    "LayerNorm": (lambda w: _replace(w, "--normalization", "LayerNorm"),
                  "--normalization RMSNorm"),
    "no QK norm": (lambda w: _replace(w, "--qk-layernorm", None), "--qk-layernorm"),
}


if hasattr(mlm_arguments, "get_device_arch_version") and not torch.cuda.is_available():
    # validate_args asks the GPU's architecture when TP > 1 (for CUDA_DEVICE_MAX_CONNECTIONS
    # advice only); answer as a Hopper GPU would on this CPU machine.
    mlm_arguments.get_device_arch_version = lambda: 9


def parse(argv, extra_args_provider=None, parallel=()):
    """Megatron-LM's parse_args + validate_args on `argv` (as its pretrain_gpt.py would)."""
    sys.argv = ["pretrain_gpt.py", *argv, *parallel]
    args = mlm_arguments.parse_args(extra_args_provider=extra_args_provider)
    mlm_arguments.validate_args(args, dict(api.ARGS_DEFAULTS))
    return args


def round_trips():
    out = {}
    for preset in sorted(PRESETS):
        cfg = DotsConfig.preset(preset)
        args = parse(megatron_lm_flags(cfg) + (SPEC if api.HAS_CONFIG_CONTAINER else []) + RUN)
        back = dots_config_from_model_config(api.model_config_from_args(args), base=cfg)
        out[preset] = {"equal": back == cfg, "back": back.to_dict()}
    return out


def spec_build(args, pg):
    """--spec: Megatron-LM's own GPTModelBuilder with the spec Megatron-LM imported."""
    from megatron.training.models.gpt import GPTModelBuilder

    model_cfg = api.model_config_from_args(args)
    assert callable(model_cfg.transformer_layer_spec), model_cfg.transformer_layer_spec
    return GPTModelBuilder(model_cfg).build_model(pg), model_cfg.transformer


def launcher_build(args, pg):
    """The launcher's model: DotsGPTModelBuilder (core_v0.19+) or Megatron-LM's own
    model_provider around launch.build_stage (core_v0.16)."""
    launch.check_args(args)
    if api.HAS_CONFIG_CONTAINER:
        from megatron.training.argument_utils import gpt_config_from_args

        api.DotsGPTModelBuilder.build_stage = staticmethod(launch.build_stage)
        model_cfg = gpt_config_from_args(args, model_config_cls=api.DotsGPTModelConfig)
        return api.DotsGPTModelBuilder(model_cfg).build_model(pg), model_cfg.transformer
    from model_provider import model_provider

    config = mlm_arguments.core_transformer_config_from_args(args)
    return model_provider(launch.build_stage, True, True, None, config=config,
                          pg_collection=pg), config


def evaluate(model, transformer_config, cfg, ckpt, tokens):
    reference = build_dots_model(cfg, transformer_config, backend="grouped")
    ours = {k: tuple(v.shape) for k, v in reference.state_dict().items() if "_extra_state" not in k}
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if "_extra_state" not in k}
    load_checkpoint([model], ckpt, load_rng=False)
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        losses = model(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:])
        logits = gather_from_tensor_model_parallel_region(
            model(tokens[:, :-1], positions[:, :-1], None))
    return {"class": type(model).__name__, "moe_layers": check_dots_modules(model),
            "same_parameters_as_build_dots_model": ours == theirs,
            "parameter_diff": sorted(set(ours.items()) ^ set(theirs.items()))[:6],
            "experts": type(model.decoder.layers[-1].mlp.experts).__name__,
            "loss": losses.float().mean().item(), "logits": logits.tolist()}


def bad_flags(cfg):
    return {name: {"flag": flag, **_error_of(edit(megatron_lm_flags(cfg)))}
            for name, (edit, flag) in BAD.items()}


def _error_of(words):
    try:
        args = parse(words + (SPEC if api.HAS_CONFIG_CONTAINER else []) + RUN)
        model_cfg = api.model_config_from_args(args)
        spec = getattr(model_cfg, "transformer_layer_spec", None)
        if callable(spec):
            spec(model_cfg, vp_stage=None)  # what Megatron-LM's builder calls
        else:
            dots_config_from_model_config(model_cfg)
    except DotsArgumentError as err:
        return {"error": str(err)}
    return {"error": None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--round-trip", action="store_true")
    p.add_argument("--bad-flags", action="store_true")
    opts = p.parse_args()

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    init_distributed()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=opts.tp,
                                             expert_model_parallel_size=opts.ep)
    model_parallel_cuda_manual_seed(1)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    rank0 = torch.distributed.get_rank() == 0
    result = {"megatron_core": __import__("megatron.core").core.__version__,
              "config_container_api": api.HAS_CONFIG_CONTAINER}
    if opts.round_trip and rank0:
        result["round_trip"] = round_trips()
    cfg = DotsConfig.preset("dots-tiny")
    parallel = ["--tensor-model-parallel-size", str(opts.tp),
                "--expert-model-parallel-size", str(opts.ep)]
    if opts.tp > 1:
        parallel.append("--sequence-parallel")
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    builds = {}
    if api.HAS_CONFIG_CONTAINER:
        args = parse(megatron_lm_flags(cfg, opts.tp) + SPEC + RUN, parallel=parallel)
        global_vars.set_args(args)
        builds["spec"] = spec_build(args, pg)
    args = parse(["--dots-model", "dots-tiny"] + RUN, extra_args_provider=add_dots_args,
                 parallel=parallel)
    global_vars.set_args(args)
    builds["launcher"] = launcher_build(args, pg)
    result["builds"] = {name: evaluate(model, tc, cfg, opts.ckpt, tokens)
                        for name, (model, tc) in builds.items()}
    result["tokens"] = tokens.tolist()
    if opts.bad_flags and rank0:
        result["bad_flags"] = bad_flags(cfg)
    if rank0:
        with open(opts.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
