"""Hooks that let a Megatron-LM checkout's `pretrain_gpt.py` build dots models.

`patches/megatron-lm-core_v0.16.1-pretrain_gpt.patch` makes pretrain_gpt.py call two of them:

* `add_dots_args(parser)`, its `extra_args_provider`: adds the `--dots-*` flags and, when
  `--dots-model PRESET` is on the command line, makes the preset the *default* of Megatron-LM's
  own model flags (`--num-layers`, `--hidden-size`, `--num-experts`, `--moe-layer-freq`,
  `--swiglu`, `--normalization`, `--untie-embeddings-and-output-weights`, ...). Megatron-LM's
  `validate_args`, vocabulary padding, FLOPs count, MoE logging and checkpoint argument checks
  therefore all see the dots model. A model flag given explicitly overrides that preset field,
  as with `megatron-dots pretrain`.
* `dots_model_provider(args, pre_process, post_process, vp_stage=None, config=None,
  pg_collection=None)`, used instead of `gpt_builder` when `--dots-model` is set: reads the
  `DotsConfig` from the parsed flags (`dots_config_from_args`), rejects flags a dots model
  cannot have (`validate_dots_args`), checks the `TransformerConfig` against the DotsConfig
  (`check_transformer_config`) and returns `build_dots_model(...)`. The patch passes
  Megatron-LM's `core_transformer_config_from_args(args)`, so every Megatron-LM feature flag
  (recompute, TE, fp8, overlap, ...) reaches the model; with `config=None` (Megatron-Core
  without Megatron-LM) the DotsConfig's TransformerConfig with the parallel, precision and
  recompute fields of `args` is used.

Errors are `DotsArgumentError`s naming the Megatron-LM flags to change.
"""

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F

from ..config import DotsConfig, DotsConfigError
from ..model.builder import build_dots_model
from ..training import arguments as _trainer_args

MEGATRON_LM_TAG = "core_v0.16.1"

__all__ = [
    "MEGATRON_LM_TAG", "DotsArgumentError", "add_dots_args", "dots_config_from_args",
    "validate_dots_args", "check_transformer_config", "dots_model_provider",
]


class DotsArgumentError(ValueError):
    """Megatron-LM flags that do not describe a dots model; the message names the flags."""


# DotsConfig field -> (Megatron-LM args attribute, flag). Megatron-LM spells the
# normalisation epsilon --norm-epsilon but stores it as args.layernorm_epsilon.
_MODEL_ARGS = (
    ("num_layers", "num_layers", "--num-layers"),
    ("hidden_size", "hidden_size", "--hidden-size"),
    ("num_attention_heads", "num_attention_heads", "--num-attention-heads"),
    ("kv_channels", "kv_channels", "--kv-channels"),
    ("ffn_hidden_size", "ffn_hidden_size", "--ffn-hidden-size"),
    ("num_moe_experts", "num_experts", "--num-experts"),
    ("moe_ffn_hidden_size", "moe_ffn_hidden_size", "--moe-ffn-hidden-size"),
    ("moe_router_topk", "moe_router_topk", "--moe-router-topk"),
    ("routed_scaling_factor", "moe_router_topk_scaling_factor",
     "--moe-router-topk-scaling-factor"),
    ("max_position_embeddings", "max_position_embeddings", "--max-position-embeddings"),
    ("rotary_base", "rotary_base", "--rotary-base"),
    ("norm_epsilon", "layernorm_epsilon", "--norm-epsilon"),
    ("init_method_std", "init_method_std", "--init-method-std"),
    ("attention_bias", "add_qkv_bias", "--add-qkv-bias"),
    ("bias_update_rate", "moe_router_bias_update_rate", "--moe-router-bias-update-rate"),
    ("make_vocab_size_divisible_by", "make_vocab_size_divisible_by",
     "--make-vocab-size-divisible-by"),
)
# Set by the preset defaults; absent, the dots extra_args_provider did not run.
_REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "num_experts")
# Flags that take part in the DotsConfig but map to it less directly.
_DERIVED_ARGS = ("num_query_groups", "group_query_attention", "moe_layer_freq",
                 "moe_shared_expert_intermediate_size", "moe_aux_loss_coeff",
                 "moe_router_load_balancing_type", "dots_model", "dots_first_k_dense",
                 "dots_shared_experts")

# Megatron-LM args a dots model needs at fixed values (not DotsConfig fields): the preset
# makes them the defaults, validate_dots_args rejects other values. attr -> (value, flag).
FIXED_ARGS = {
    "position_embedding_type": ("rope", "--position-embedding-type rope"),
    "normalization": ("RMSNorm", "--normalization RMSNorm"),
    "swiglu": (True, "--swiglu"),
    "untie_embeddings_and_output_weights": (True, "--untie-embeddings-and-output-weights"),
    "add_bias_linear": (False, "--disable-bias-linear"),
    "qk_layernorm": (True, "--qk-layernorm"),
    "moe_router_score_function": ("sigmoid", "--moe-router-score-function sigmoid"),
    "moe_router_enable_expert_bias": (True, "--moe-router-enable-expert-bias"),
    "moe_router_dtype": ("fp32", "--moe-router-dtype fp32"),
}
# Megatron-LM's defaults that a dots model also needs; only checked.
UNSUPPORTED_ARGS = {
    "rotary_percent": (1.0, "--rotary-percent 1.0"),
    "rotary_interleaved": (False, "no --rotary-interleaved"),
    "use_rope_scaling": (False, "no --use-rope-scaling"),
    "multi_latent_attention": (False, "no --multi-latent-attention"),
    "moe_router_pre_softmax": (False, "no --moe-router-pre-softmax"),
    "moe_router_num_groups": (None, "no --moe-router-num-groups"),
    "moe_shared_expert_gate": (False, "no --moe-shared-expert-gate"),
    "moe_latent_size": (None, "no --moe-latent-size"),
    "mtp_num_layers": (None, "no --mtp-num-layers"),
    "use_legacy_models": (False, "no --use-legacy-models"),
    "spec": (None, "no --spec"),
    "yaml_cfg": (None, "no --yaml-cfg"),
    "heterogeneous_layers_config_path": (None, "no --heterogeneous-layers-config-path"),
    "experimental_attention_variant": (None, "no --experimental-attention-variant"),
}

# `megatron-dots pretrain` flags that Megatron-LM's training loop does not implement.
_TRAINER_ONLY = {
    "dots_batch_stages": ("--dots-batch-stages", "Megatron-LM's --global-batch-size (change it "
                          "between resumed runs) or --rampup-batch-size"),
    "dots_expert_load_csv": ("--dots-expert-load-csv", "Megatron-LM's MoE logging "
                             "(--moe-per-layer-logging)"),
    "dots_loss_csv": ("--dots-loss-csv", "Megatron-LM's --tensorboard-dir / --wandb-project"),
    "dots_a2a_overlap": ("--dots-a2a-overlap", "Megatron-LM's --overlap-moe-expert-parallel-comm "
                         "[--delay-wgrad-compute]: the dots model then computes its shared "
                         "experts during the dispatch all-to-all as well"),
}

# TransformerConfig field -> the Megatron-LM flag that sets it (for check_transformer_config).
CONFIG_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups (with --group-query-attention)",
    "kv_channels": "--kv-channels",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_moe_experts": "--num-experts",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_router_topk": "--moe-router-topk",
    "moe_shared_expert_intermediate_size": "--moe-shared-expert-intermediate-size",
    "moe_layer_freq": "--moe-layer-freq",
    "moe_router_topk_scaling_factor": "--moe-router-topk-scaling-factor",
    "layernorm_epsilon": "--norm-epsilon",
    "add_qkv_bias": "--add-qkv-bias",
    "normalization": "--normalization",
    "qk_layernorm": "--qk-layernorm",
    "gated_linear_unit": "--swiglu",
    "add_bias_linear": "--disable-bias-linear",
    "moe_router_score_function": "--moe-router-score-function",
    "moe_router_enable_expert_bias": "--moe-router-enable-expert-bias",
    "moe_router_dtype": "--moe-router-dtype",
}


# --------------------------------------------------------------------------- flags
def add_dots_args(parser: argparse.ArgumentParser,
                  argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: the --dots-* flags, and the preset named by
    `--dots-model` (in `argv`, default `sys.argv[1:]`) as the default of Megatron-LM's model
    flags. Returns the parser."""
    _trainer_args.add_dots_args(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return parser
    given = _explicit_values(parser, argv)
    if not given.get("dots_model"):
        return parser
    try:
        cfg = _config_from_values(given["dots_model"], given)
    except DotsArgumentError as err:
        parser.error(str(err))
    known = {action.dest for action in parser._actions}
    parser.set_defaults(**{k: v for k, v in megatron_lm_defaults(cfg).items() if k in known})
    return parser


def megatron_lm_defaults(cfg: DotsConfig) -> Dict[str, object]:
    """Megatron-LM args (attribute -> value) that describe `cfg`."""
    defaults = {dest: getattr(cfg, field) for field, dest, _ in _MODEL_ARGS}
    defaults.update(
        rotary_base=int(cfg.rotary_base),  # Megatron-LM's --rotary-base is an int
        group_query_attention=True,
        num_query_groups=cfg.num_query_groups,
        moe_layer_freq=cfg.moe_layer_pattern,
        moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        moe_router_load_balancing_type="seq_aux_loss" if cfg.seq_aux_loss_coeff else "none",
        moe_aux_loss_coeff=cfg.seq_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    defaults.update({attr: value for attr, (value, _) in FIXED_ARGS.items()})
    return defaults


def _explicit_values(parser: argparse.ArgumentParser, argv: List[str]) -> Dict[str, object]:
    """The model-related values given on the command line (absent: not given)."""
    dests = {dest for _, dest, _ in _MODEL_ARGS} | set(_DERIVED_ARGS)
    actions = [a for a in parser._actions if a.dest in dests]
    unset = object()
    saved = {a.dest: a.default for a in actions}
    parser.set_defaults(**{a.dest: unset for a in actions})
    try:
        values, _ = parser.parse_known_args(argv)
    finally:
        parser.set_defaults(**saved)
    return {dest: getattr(values, dest) for dest in saved if getattr(values, dest) is not unset}


# ------------------------------------------------------------------- DotsConfig
def dots_config_from_args(args) -> DotsConfig:
    """The DotsConfig that Megatron-LM's parsed `args` describe (`--dots-model` preset with
    every model flag in args applied)."""
    preset = getattr(args, "dots_model", None)
    if not preset:
        raise DotsArgumentError("--dots-model is not set")
    missing = [flag for _, dest, flag in _MODEL_ARGS
               if dest in _REQUIRED_ARGS and getattr(args, dest, None) is None]
    if missing:
        raise DotsArgumentError(
            f"--dots-model {preset}: {', '.join(missing)} not set; the preset fills them in "
            "only when megatron_dots.megatron_lm.add_dots_args is the extra_args_provider "
            "(apply the whole patch)")
    values = {dest: getattr(args, dest) for _, dest, _ in _MODEL_ARGS
              if getattr(args, dest, None) is not None}
    values.update({name: getattr(args, name) for name in _DERIVED_ARGS
                   if getattr(args, name, None) is not None})
    return _config_from_values(preset, values)


def _config_from_values(preset: str, values: Dict[str, object]) -> DotsConfig:
    fields = {field: values[dest] for field, dest, _ in _MODEL_ARGS if dest in values}
    if "rotary_base" in fields:
        fields["rotary_base"] = float(fields["rotary_base"])
    if "attention_bias" in fields:
        fields["attention_bias"] = bool(fields["attention_bias"])
    if values.get("group_query_attention", True) and "num_query_groups" in values:
        fields["num_query_groups"] = values["num_query_groups"]
    elif values.get("group_query_attention") is False:
        fields["num_query_groups"] = fields.get(
            "num_attention_heads", DotsConfig.preset(preset).num_attention_heads)

    if "moe_layer_freq" in values:
        freq = values["moe_layer_freq"]
        num_layers = fields.get("num_layers", DotsConfig.preset(preset).num_layers)
        if isinstance(freq, (list, tuple)) and len(freq) != num_layers:
            raise DotsArgumentError(f"--moe-layer-freq has {len(freq)} entries but the model has "
                                    f"--num-layers {num_layers}")
        first_k = first_k_dense(freq)
        given = values.get("dots_first_k_dense")
        if given is not None and given != first_k:
            raise DotsArgumentError(
                f"--moe-layer-freq {values['moe_layer_freq']!r} makes {first_k} leading dense "
                f"layer(s) but --dots-first-k-dense is {given}")
        fields["first_k_dense"] = first_k
    elif values.get("dots_first_k_dense") is not None:
        fields["first_k_dense"] = values["dots_first_k_dense"]

    shared_size = values.get("moe_shared_expert_intermediate_size")
    width = fields.get("moe_ffn_hidden_size", DotsConfig.preset(preset).moe_ffn_hidden_size)
    if shared_size is not None:
        count, rest = divmod(shared_size, width)
        given = values.get("dots_shared_experts")
        if rest or (given is not None and given != count):
            raise DotsArgumentError(
                f"--moe-shared-expert-intermediate-size {shared_size} must be --dots-shared-"
                f"experts ({given if given is not None else 'an integer'}) x "
                f"--moe-ffn-hidden-size {width}")
        fields["num_shared_experts"] = count
    elif values.get("dots_shared_experts") is not None:
        fields["num_shared_experts"] = values["dots_shared_experts"]

    balancing = _single(values.get("moe_router_load_balancing_type", "seq_aux_loss"))
    coeff = _single(values.get("moe_aux_loss_coeff"))
    if balancing not in ("seq_aux_loss", "none"):
        raise DotsArgumentError(
            f"--moe-router-load-balancing-type {balancing}: dots models use 'seq_aux_loss' "
            "(or 'none')")
    if balancing == "none":
        fields["seq_aux_loss_coeff"] = 0.0
    elif coeff is not None:
        fields["seq_aux_loss_coeff"] = float(coeff)

    try:
        return DotsConfig.preset(preset, **fields)
    except DotsConfigError as err:
        raise DotsArgumentError(f"--dots-model {preset}: {with_flags(err)}") from None


def with_flags(err: DotsConfigError) -> str:
    """The message of a DotsConfigError with the Megatron-LM flag of each field it names."""
    message = str(err)
    for field, _, flag in _MODEL_ARGS:
        message = message.replace(f"DotsConfig.{field} ", f"{flag} (DotsConfig.{field}) ")
    return message


def first_k_dense(freq) -> int:
    """Leading dense layers of a dots --moe-layer-freq (an int 1 or a 0...0 1...1 list)."""
    if freq == 1:
        return 0
    pattern = list(freq) if isinstance(freq, (list, tuple)) else None
    if pattern is not None:
        k = next((i for i, flag in enumerate(pattern) if flag), len(pattern))
        if all(flag == 1 for flag in pattern[k:]) and all(f == 0 for f in pattern[:k]):
            return k
    raise DotsArgumentError(
        f"--moe-layer-freq {freq!r}: dots models are k dense layers followed by MoE layers "
        "only, e.g. '([0]*1+[1]*61)'")


def _single(value):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise DotsArgumentError(f"expected one value, got {list(value)} "
                                    "(--moe-router-load-balancing-type / --moe-aux-loss-coeff)")
        return value[0]
    return value


# ------------------------------------------------------------------- validation
def validate_dots_args(args, cfg: Optional[DotsConfig] = None) -> DotsConfig:
    """Reject Megatron-LM flags that contradict the dots architecture or layout; returns the
    DotsConfig."""
    cfg = cfg or dots_config_from_args(args)
    for attr, (value, flag) in {**FIXED_ARGS, **UNSUPPORTED_ARGS}.items():
        actual = getattr(args, attr, value)
        if actual != value:
            raise DotsArgumentError(
                f"--dots-model {args.dots_model}: args.{attr} is {actual!r}; dots models need "
                f"{flag}")
    for attr, (flag, instead) in _TRAINER_ONLY.items():
        if getattr(args, attr, None) is not None:
            raise DotsArgumentError(
                f"{flag} is a `megatron-dots pretrain` flag; Megatron-LM's pretrain_gpt.py does "
                f"not implement it (use {instead})")
    tp = getattr(args, "tensor_model_parallel_size", 1)
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    uneven = any(getattr(args, name, None) is not None for name in (
        "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
        "pipeline_model_parallel_layout"))
    try:
        # Uneven stages: Megatron-LM validates them and megatron-core places the layers.
        cfg.check_parallel_layout(
            tp,
            1 if uneven else getattr(args, "pipeline_model_parallel_size", 1),
            getattr(args, "expert_model_parallel_size", 1),
            None if uneven else getattr(args, "virtual_pipeline_model_parallel_size", None),
            flags={"vpp": "--num-layers-per-virtual-pipeline-stage / "
                          "--num-virtual-stages-per-pipeline-rank"},
        )
        if cfg.moe_ffn_hidden_size % etp:
            raise DotsConfigError(f"--expert-tensor-parallel-size {etp} does not divide "
                                  f"moe_ffn_hidden_size {cfg.moe_ffn_hidden_size}")
    except DotsConfigError as err:
        raise DotsArgumentError(f"--dots-model {args.dots_model}: {err}") from None
    ours = cfg.padded_vocab_size(tp)
    theirs = getattr(args, "padded_vocab_size", None)
    if theirs is not None and theirs > ours:
        raise DotsArgumentError(
            f"--dots-model {args.dots_model}: the tokenizer's padded vocabulary ({theirs}) is "
            f"larger than the model's ({ours}; vocab_size {cfg.vocab_size} padded to "
            f"--make-vocab-size-divisible-by {cfg.make_vocab_size_divisible_by} x TP {tp})")
    return cfg


def check_transformer_config(config, cfg: DotsConfig) -> None:
    """Raise DotsArgumentError naming the Megatron-LM flag of every TransformerConfig field
    that disagrees with the dots model `cfg`."""
    reference = cfg.to_transformer_config()
    problems = []
    for field, flag in CONFIG_FLAGS.items():
        want, got = getattr(reference, field), getattr(config, field, None)
        if got != want:
            problems.append(f"{field} is {got!r}, the dots model needs {want!r} ({flag})")
    if config.activation_func is not F.silu:
        problems.append(f"activation_func is {config.activation_func!r}, the dots model needs "
                        "SiLU (--swiglu)")
    if problems:
        raise DotsArgumentError("TransformerConfig does not describe the dots model: "
                                + "; ".join(problems))


# ------------------------------------------------------------------------ model
def dots_model_provider(args, pre_process: bool = True, post_process: bool = True,
                        vp_stage: Optional[int] = None, config=None, pg_collection=None):
    """Megatron-LM model builder (gpt_builder's signature) for `--dots-model`: this rank's
    (virtual) pipeline stage of the dots model the flags describe."""
    cfg = validate_dots_args(args)
    if config is None:
        config = _transformer_config(args, cfg)
    check_transformer_config(config, cfg)
    backend = getattr(args, "dots_expert_backend", "auto")
    if backend == "auto" and getattr(args, "transformer_impl", None) == "local":
        backend = "grouped"  # no Transformer Engine modules: our TE-free fast path
    return build_dots_model(cfg, config, backend=backend, pre_process=pre_process,
                            post_process=post_process, vp_stage=vp_stage,
                            pg_collection=pg_collection)


def _transformer_config(args, cfg: DotsConfig):
    """The DotsConfig's TransformerConfig with the parallel / precision / recompute fields of
    `args` (the patched pretrain_gpt.py passes Megatron-LM's own config instead)."""
    import torch

    params_dtype = getattr(args, "params_dtype", None) or (
        torch.bfloat16 if getattr(args, "bf16", False) else torch.float32)
    overrides = dict(
        tensor_model_parallel_size=getattr(args, "tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=getattr(args, "pipeline_model_parallel_size", 1),
        virtual_pipeline_model_parallel_size=getattr(
            args, "virtual_pipeline_model_parallel_size", None),
        expert_model_parallel_size=getattr(args, "expert_model_parallel_size", 1),
        expert_tensor_parallel_size=getattr(args, "expert_tensor_parallel_size", None),
        sequence_parallel=getattr(args, "sequence_parallel", False),
        bf16=getattr(args, "bf16", False),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        recompute_granularity=getattr(args, "recompute_granularity", None),
        recompute_method=getattr(args, "recompute_method", None),
        recompute_num_layers=getattr(args, "recompute_num_layers", None),
        moe_token_dispatcher_type=getattr(args, "moe_token_dispatcher_type", "alltoall"),
    )
    return cfg.to_transformer_config(**overrides)
