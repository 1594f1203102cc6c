"""`DotsConfig`: the shape and routing hyper-parameters of a dots.llm1-style MoE model.

Owns the presets (`dots.llm1`, `dots-mini`, `dots-tiny`), the mapping to Megatron-Core's
`TransformerConfig`, the mapping to and from a Hugging Face dots1 `config.json`, and the
analytic parameter count. Nothing here builds modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F


# transformers' Dots1Attention gives o_proj a bias too when attention_bias is set.
_ATTENTION_BIAS_UNSUPPORTED = (
    "attention_bias=true in transformers' Dots1 also gives o_proj a bias, which Megatron-Core's "
    "linear_proj holds only with add_bias_linear (a bias on every linear layer); dots.llm1 has "
    "no attention bias")


class DotsConfigError(ValueError):
    """A configuration that cannot describe a dots model; the message names the field."""


@dataclass
class DotsConfig:
    """Architecture of a dots.llm1-style model.

    Names follow Megatron-Core where one exists. Layers are counted from 0; the first
    `first_k_dense` layers use a dense SwiGLU MLP, every later layer the dots MoE block.
    """

    num_layers: int = 62
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_query_groups: int = 32
    kv_channels: int = 128
    ffn_hidden_size: int = 10944
    first_k_dense: int = 1
    num_moe_experts: int = 128
    moe_ffn_hidden_size: int = 1408
    moe_router_topk: int = 6
    num_shared_experts: int = 2
    routed_scaling_factor: float = 2.5
    vocab_size: int = 152064
    max_position_embeddings: int = 32768
    rotary_base: float = 1e7
    norm_epsilon: float = 1e-5
    attention_bias: bool = False
    init_method_std: float = 0.006
    # Not published in the paper: documented defaults (see README).
    seq_aux_loss_coeff: float = 1e-4
    bias_update_rate: float = 1e-3
    make_vocab_size_divisible_by: int = 128
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = 151643
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        positive = (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "ffn_hidden_size", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
            "vocab_size", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DotsConfigError(f"DotsConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise DotsConfigError(
                f"DotsConfig.first_k_dense={self.first_k_dense} must lie in [0, num_layers="
                f"{self.num_layers}]"
            )
        if self.num_shared_experts < 0:
            raise DotsConfigError(
                f"DotsConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise DotsConfigError(
                f"DotsConfig.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.moe_router_topk > self.num_moe_experts:
            raise DotsConfigError(
                f"DotsConfig.moe_router_topk={self.moe_router_topk} exceeds num_moe_experts="
                f"{self.num_moe_experts}"
            )
        if self.num_moe_experts < 2:
            # The HF gate takes the top-2 scores per expert group.
            raise DotsConfigError("DotsConfig.num_moe_experts must be >= 2")
        if self.kv_channels % 2:
            raise DotsConfigError(f"DotsConfig.kv_channels={self.kv_channels} must be even (RoPE)")
        for name in ("routed_scaling_factor", "rotary_base", "norm_epsilon", "init_method_std"):
            if not getattr(self, name) > 0:
                raise DotsConfigError(f"DotsConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("seq_aux_loss_coeff", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise DotsConfigError(f"DotsConfig.{name} must be >= 0, got {getattr(self, name)}")

    # ----------------------------------------------------------------- derived
    @property
    def shared_expert_intermediate_size(self) -> Optional[int]:
        """Width of the shared-expert SwiGLU (all shared experts fused into one MLP)."""
        if self.num_shared_experts == 0:
            return None
        return self.num_shared_experts * self.moe_ffn_hidden_size

    @property
    def moe_layer_pattern(self) -> list:
        """Megatron-Core `moe_layer_freq` as a list: 0 = dense layer, 1 = MoE layer."""
        return [0] * self.first_k_dense + [1] * (self.num_layers - self.first_k_dense)

    @property
    def moe_layer_numbers(self) -> list:
        """1-based numbers (Megatron's `layer_number`) of the MoE layers."""
        return [n for n in range(1, self.num_layers + 1) if n > self.first_k_dense]

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocab size padded like Megatron-LM's `--make-vocab-size-divisible-by` under TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_parallel_layout(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        expert_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: Optional[int] = None,
        flags: Optional[Dict[str, str]] = None,
    ) -> None:
        """Raise DotsConfigError (naming the flags) if the model cannot be split this way.

        flags: how the caller's command line spells tp/pp/ep/vpp (default: Megatron-LM's
        --tensor-model-parallel-size ...).
        """
        names = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
                 "ep": "--expert-model-parallel-size",
                 "vpp": "--virtual-pipeline-model-parallel-size", **(flags or {})}
        tp, pp, ep = (tensor_model_parallel_size, pipeline_model_parallel_size,
                      expert_model_parallel_size)
        vpp = virtual_pipeline_model_parallel_size or 1
        for key, value in (("tp", tp), ("pp", pp), ("ep", ep), ("vpp", vpp)):
            if value < 1:
                raise DotsConfigError(f"{names[key]} {value}: must be at least 1")
        problems = []
        for field in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                      "moe_ffn_hidden_size"):
            if getattr(self, field) % tp:
                problems.append(f"{names['tp']} {tp} does not divide {field} "
                                f"{getattr(self, field)}")
        if self.num_moe_experts % ep:
            problems.append(f"{names['ep']} {ep} does not divide num_moe_experts "
                            f"{self.num_moe_experts}")
        if self.num_layers % (pp * vpp):
            what = f"{names['pp']} {pp}" + (f" x {names['vpp']} {vpp}" if vpp > 1 else "")
            problems.append(f"{what} does not divide num_layers {self.num_layers}")
        if vpp > 1 and pp == 1:
            problems.append(f"{names['vpp']} {vpp} needs {names['pp']} > 1")
        if problems:
            raise DotsConfigError("; ".join(problems))

    def architecture(self) -> Dict[str, Any]:
        """The fields that fix the model's tensors and math (not training hyper-parameters such
        as the bias update rate); two configs with equal architectures share checkpoints."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

    def num_parameters(self) -> Tuple[int, int]:
        """(total, active-per-token) parameter counts, excluding vocab padding."""
        h, d = self.hidden_size, self.kv_channels
        q = self.num_attention_heads * d
        kv = self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + 2 * d + (q + 2 * kv if self.attention_bias else 0)
        norms = 2 * h
        dense_mlp = 3 * h * self.ffn_hidden_size
        expert = 3 * h * self.moe_ffn_hidden_size
        shared = 3 * h * (self.shared_expert_intermediate_size or 0)
        router = self.num_moe_experts * h
        n_moe = self.num_layers - self.first_k_dense
        embeddings = 2 * self.vocab_size * h + h  # untied embedding + lm head + final norm
        common = self.num_layers * (attn + norms) + self.first_k_dense * dense_mlp + embeddings
        total = common + n_moe * (self.num_moe_experts * expert + shared + router)
        active = common + n_moe * (self.moe_router_topk * expert + shared + router)
        return total, active

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "DotsConfig":
        """A named preset, optionally with fields overridden."""
        if name not in PRESETS:
            raise DotsConfigError(
                f"unknown dots preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
            )
        fields = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DotsConfigError(f"unknown DotsConfig field(s): {', '.join(sorted(unknown))}")
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes) -> "DotsConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------- Megatron-Core side
    def to_transformer_config(self, **overrides):
        """A Megatron-Core `TransformerConfig` for this model.

        `overrides` are `TransformerConfig` fields: parallel sizes, precision, recompute,
        dispatcher, etc. Model-shape fields cannot be overridden here; change the DotsConfig.
        """
        from megatron.core.transformer.transformer_config import TransformerConfig

        from .compat.mcore_api import whole_layer_cuda_graph_kwargs

        shape = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size,
            num_moe_experts=self.num_moe_experts,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_router_topk=self.moe_router_topk,
            moe_shared_expert_intermediate_size=self.shared_expert_intermediate_size,
            moe_layer_freq=self.moe_layer_pattern,
            moe_router_topk_scaling_factor=self.routed_scaling_factor,
            layernorm_epsilon=self.norm_epsilon,
            add_qkv_bias=self.attention_bias,
        )
        clash = set(shape) & set(overrides)
        if clash:
            raise DotsConfigError(
                f"{', '.join(sorted(clash))} are model-shape fields; set them on DotsConfig"
            )
        kwargs = dict(
            shape,
            normalization="RMSNorm",
            qk_layernorm=True,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=self.bias_update_rate,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="seq_aux_loss" if self.seq_aux_loss_coeff else "none",
            moe_aux_loss_coeff=self.seq_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_shared_expert_overlap=False,
            moe_grouped_gemm=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            bias_dropout_fusion=False,
            **whole_layer_cuda_graph_kwargs(),  # upstream's default, without its deprecation warning
        )
        if not torch.cuda.is_available():
            kwargs.update(use_cpu_initialization=True)
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    # ---------------------------------------------------------- Hugging Face side
    def to_hf_config(self) -> Dict[str, Any]:
        """The dots1 `config.json` dictionary (transformers' Dots1Config field names)."""
        if self.attention_bias:
            raise DotsConfigError(_ATTENTION_BIAS_UNSUPPORTED)
        return {
            "architectures": ["Dots1ForCausalLM"],
            "model_type": "dots1",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "moe_intermediate_size": self.moe_ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.kv_channels,
            "n_shared_experts": self.num_shared_experts,
            "n_routed_experts": self.num_moe_experts,
            "num_experts_per_tok": self.moe_router_topk,
            "first_k_dense_replace": self.first_k_dense,
            "norm_topk_prob": True,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": self.routed_scaling_factor,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_epsilon,
            "rope_theta": self.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rotary_base},
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "initializer_range": self.init_method_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    @classmethod
    def from_hf_config(
        cls, source: Union[str, os.PathLike, Dict[str, Any]], **overrides
    ) -> "DotsConfig":
        """Read a dots1 `config.json` (path, directory or dict); strict about what it accepts."""
        where, hf = _read_hf_config(source)

        def fail(key, why):
            raise DotsConfigError(f"{where}: field {key!r} {why}")

        if hf.get("model_type") != "dots1":
            fail("model_type", f"is {hf.get('model_type')!r}; expected 'dots1'")
        unknown = set(hf) - _HF_MAPPED - _HF_CHECKED - _HF_IGNORED
        if unknown:
            fail(sorted(unknown)[0], f"is not a dots1 field we understand (all unknown: "
                 f"{sorted(unknown)}); refusing to guess its meaning")
        for key in _HF_REQUIRED:
            if key not in hf:
                fail(key, "is missing")

        for key, kinds, what in _HF_TYPES:
            value = hf.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                fail(key, f"is {value!r}; expected {what}")

        def check(key, ok, expected):
            if key in hf and hf[key] is not None and not ok(hf[key]):
                fail(key, f"is {hf[key]!r}; only {expected} is supported")

        check("hidden_act", lambda v: v == "silu", "'silu'")
        check("norm_topk_prob", lambda v: v is True, "true (dots normalises top-k weights)")
        check("n_group", lambda v: v == 1, "1")
        check("topk_group", lambda v: v == 1, "1")
        check("tie_word_embeddings", lambda v: v is False, "false (dots has an untied lm_head)")
        check("attention_dropout", lambda v: v == 0, "0")
        check("moe_layer_freq", lambda v: v == 1, "1")
        check("scoring_func", lambda v: v in ("sigmoid", "noaux_tc"), "sigmoid / 'noaux_tc'")
        check("use_sliding_window", lambda v: v is False, "false")
        check("topk_method", lambda v: v == "noaux_tc", "'noaux_tc'")
        check("attention_bias", lambda v: v is False,
              f"false ({_ATTENTION_BIAS_UNSUPPORTED})")
        check("rope_scaling", lambda v: v.get("rope_type", v.get("type")) == "default",
              "null or {'rope_type': 'default'}")
        num_layers = hf["num_hidden_layers"]
        # transformers derives layer_types from these two alone (use_sliding_window is ignored).
        if hf.get("sliding_window") is not None and "layer_types" not in hf:
            max_window = hf.get("max_window_layers", num_layers)
            if max_window is None or max_window < num_layers:
                fail("sliding_window", f"= {hf['sliding_window']} with max_window_layers="
                     f"{max_window} makes layers use sliding-window attention, which dots "
                     "does not use")
        layer_types = hf.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            fail("layer_types", "contains a non-'full_attention' layer")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            fail("rope_parameters", f"has rope_type {rope.get('rope_type')!r}; only 'default'")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta"))
        if rope_theta is None:
            fail("rope_theta", "is missing (neither rope_theta nor rope_parameters.rope_theta)")
        if "rope_theta" in hf and "rope_theta" in rope and hf["rope_theta"] != rope["rope_theta"]:
            fail("rope_theta", f"= {hf['rope_theta']} disagrees with rope_parameters.rope_theta "
                 f"= {rope['rope_theta']}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        n_experts = hf["n_routed_experts"]
        if n_experts is None:
            fail("n_routed_experts", "is null; dots1 checkpoints are MoE")
        kv = hf.get("num_key_value_heads") or heads
        fields = dict(
            num_layers=num_layers,
            hidden_size=hf["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=kv,
            kv_channels=head_dim,
            ffn_hidden_size=hf["intermediate_size"],
            first_k_dense=hf.get("first_k_dense_replace") or 0,
            num_moe_experts=n_experts,
            moe_ffn_hidden_size=hf["moe_intermediate_size"],
            moe_router_topk=hf["num_experts_per_tok"],
            num_shared_experts=hf.get("n_shared_experts") or 0,
            routed_scaling_factor=float(_or(hf.get("routed_scaling_factor"), 1.0)),
            vocab_size=hf["vocab_size"],
            max_position_embeddings=_or(hf.get("max_position_embeddings"), 2048),
            rotary_base=float(rope_theta),
            norm_epsilon=float(_or(hf.get("rms_norm_eps"), 1e-6)),
            attention_bias=bool(hf.get("attention_bias", False)),
            init_method_std=float(_or(hf.get("initializer_range"), 0.006)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_first_token_id(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(overrides)
        try:
            return cls(**fields)
        except DotsConfigError as err:
            raise DotsConfigError(f"{where}: {err}") from None


def _or(value, default):
    """`value`, or `default` where config.json has the key as null (or not at all)."""
    return default if value is None else value


def _first_token_id(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _read_hf_config(source) -> Tuple[str, Dict[str, Any]]:
    if isinstance(source, dict):
        return "config", dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise DotsConfigError(f"{path}: no such file (expected a dots1 config.json)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, ValueError) as err:
        raise DotsConfigError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise DotsConfigError(f"{path}: unreadable ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise DotsConfigError(f"{path}: expected a JSON object")
    return path, data


_INT = "an integer"
_NUMBER = "a number"
# The JSON type of each HF key we read (null allowed where the key is optional).
_HF_TYPES = tuple(
    [(k, int, _INT) for k in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "first_k_dense_replace", "n_routed_experts",
        "moe_intermediate_size", "num_experts_per_tok", "n_shared_experts", "vocab_size",
        "max_position_embeddings", "n_group", "topk_group", "moe_layer_freq",
        "max_window_layers", "sliding_window", "bos_token_id", "pad_token_id")]
    + [(k, (int, float), _NUMBER) for k in (
        "routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range",
        "attention_dropout")]
    + [(k, dict, "an object") for k in ("rope_scaling", "rope_parameters")]
    + [(k, list, "a list") for k in ("layer_types",)]
    + [(k, str, "a string") for k in ("model_type", "hidden_act", "scoring_func", "topk_method")]
    + [(k, (int, list), "an integer or a list of integers") for k in ("eos_token_id",)])

# HF keys that become DotsConfig fields.
_HF_MAPPED = {
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "first_k_dense_replace", "n_routed_experts", "moe_intermediate_size",
    "num_experts_per_tok", "n_shared_experts", "routed_scaling_factor", "vocab_size",
    "max_position_embeddings", "rope_theta", "rope_parameters", "rms_norm_eps", "attention_bias",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
}
_HF_REQUIRED = {
    "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
    "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "vocab_size",
}
# HF keys whose value must be the one dots uses (checked above).
_HF_CHECKED = {
    "model_type", "hidden_act", "norm_topk_prob", "n_group", "topk_group", "tie_word_embeddings",
    "attention_dropout", "moe_layer_freq", "scoring_func", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "rope_scaling", "topk_method",
}
# HF keys with no effect on the model's math.
_HF_IGNORED = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "output_router_logits", "_name_or_path", "_attn_implementation_autoset", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
    "keys_to_ignore_at_inference", "aux_loss_alpha", "seq_aux", "router_aux_loss_coef",
}


ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "ffn_hidden_size", "first_k_dense", "num_moe_experts", "moe_ffn_hidden_size",
    "moe_router_topk", "num_shared_experts", "routed_scaling_factor", "vocab_size",
    "rotary_base", "norm_epsilon", "attention_bias",
)


PRESETS: Dict[str, Dict[str, Any]] = {
    # The released 142B-total / 14B-active model.
    "dots.llm1": dict(),
    # Same structure, sized to train on one 80 GB GPU (benchmarks, end-to-end checks).
    "dots-mini": dict(
        num_layers=12, hidden_size=1536, num_attention_heads=12, num_query_groups=12,
        kv_channels=128, ffn_hidden_size=4096, num_moe_experts=64, moe_ffn_hidden_size=512,
        moe_router_topk=6, num_shared_experts=2, max_position_embeddings=8192,
    ),
    # CPU tests and the demo.
    "dots-tiny": dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=4, kv_channels=16,
        ffn_hidden_size=128, num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2,
        num_shared_experts=2, vocab_size=512, max_position_embeddings=256, rotary_base=1e4,
        init_method_std=0.02, make_vocab_size_divisible_by=64, eos_token_id=0,
    ),
}
