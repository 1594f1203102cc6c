"""Tensor-level mapping between Hugging Face dots1 and Megatron-Core dots names and layouts.

Megatron keys here are *full* keys: unsharded tensors, global layer indices
(`decoder.layers.{i}`), global expert indices (`local_experts.{e}` / `weight{e}`). Hugging Face
keys are the on-disk (safetensors) names, one tensor per expert; transformers 5 fuses experts
in memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]):
`unfuse_hf_experts` / `fuse_hf_experts` convert between the two.

The mapping is one rule per Megatron key pattern, usable one tensor at a time
(`hf_sources`, `to_mcore`, `from_mcore`), so converters can stream.
Layouts: `linear_qkv` is [q_g, k_g, v_g] per query group; gated `linear_fc1` is [gate; up].
"""

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from ..config import DotsConfig

_L = r"decoder\.layers\.(?P<layer>\d+)\."
_HL = "model.layers.{layer}."


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern
    hf: tuple  # HF key templates, formatted with the match's groups
    kind: str  # copy | vocab | qkv | glu


def _rule(pattern: str, kind: str, *hf: str) -> _Rule:
    return _Rule(re.compile(pattern + r"$"), hf, kind)


_RULES: List[_Rule] = [
    _rule(r"embedding\.word_embeddings\.weight", "vocab", "model.embed_tokens.weight"),
    _rule(r"output_layer\.weight", "vocab", "lm_head.weight"),
    _rule(r"decoder\.final_layernorm\.weight", "copy", "model.norm.weight"),
    _rule(_L + r"(input_layernorm\.weight|self_attention\.linear_qkv\.layer_norm_weight)", "copy",
          _HL + "input_layernorm.weight"),
    _rule(_L + r"self_attention\.linear_qkv\.weight", "qkv",
          _HL + "self_attn.q_proj.weight", _HL + "self_attn.k_proj.weight",
          _HL + "self_attn.v_proj.weight"),
    _rule(_L + r"self_attention\.linear_qkv\.bias", "qkv",
          _HL + "self_attn.q_proj.bias", _HL + "self_attn.k_proj.bias",
          _HL + "self_attn.v_proj.bias"),
    _rule(_L + r"self_attention\.q_layernorm\.weight", "copy", _HL + "self_attn.q_norm.weight"),
    _rule(_L + r"self_attention\.k_layernorm\.weight", "copy", _HL + "self_attn.k_norm.weight"),
    _rule(_L + r"self_attention\.linear_proj\.weight", "copy", _HL + "self_attn.o_proj.weight"),
    _rule(_L + r"(pre_mlp_layernorm\.weight|mlp\.linear_fc1\.layer_norm_weight)", "copy",
          _HL + "post_attention_layernorm.weight"),
    _rule(_L + r"mlp\.linear_fc1\.weight", "glu",
          _HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"),
    _rule(_L + r"mlp\.linear_fc2\.weight", "copy", _HL + "mlp.down_proj.weight"),
    _rule(_L + r"mlp\.router\.weight", "copy", _HL + "mlp.gate.weight"),
    _rule(_L + r"mlp\.router\.expert_bias", "copy", _HL + "mlp.gate.e_score_correction_bias"),
    _rule(_L + r"mlp\.experts\.(local_experts\.(?P<e>\d+)\.linear_fc1\.weight"
          r"|linear_fc1\.weight(?P<e2>\d+))", "glu",
          _HL + "mlp.experts.{e}.gate_proj.weight", _HL + "mlp.experts.{e}.up_proj.weight"),
    _rule(_L + r"mlp\.experts\.(local_experts\.(?P<e>\d+)\.linear_fc2\.weight"
          r"|linear_fc2\.weight(?P<e2>\d+))", "copy", _HL + "mlp.experts.{e}.down_proj.weight"),
    _rule(_L + r"mlp\.shared_experts\.linear_fc1\.weight", "glu",
          _HL + "mlp.shared_experts.gate_proj.weight", _HL + "mlp.shared_experts.up_proj.weight"),
    _rule(_L + r"mlp\.shared_experts\.linear_fc2\.weight", "copy",
          _HL + "mlp.shared_experts.down_proj.weight"),
]


class MappingError(KeyError):
    """A key or tensor that does not fit the dots layout; the message names it."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _match(mcore_key: str):
    for rule in _RULES:
        m = rule.pattern.match(mcore_key)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            if "e2" in groups:
                groups["e"] = groups.pop("e2")
            return rule, groups
    raise MappingError(f"no Hugging Face counterpart known for Megatron key {mcore_key!r}")


def hf_sources(mcore_key: str) -> List[str]:
    """The HF keys whose tensors make up this Megatron tensor."""
    rule, groups = _match(mcore_key)
    return [t.format(**groups) for t in rule.hf]


def _qkv_groups(cfg: DotsConfig):
    heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
    return cfg.num_query_groups, heads_per_group * cfg.kv_channels, cfg.kv_channels


def to_mcore(
    mcore_key: str, tensors: List[torch.Tensor], cfg: DotsConfig, padded_vocab_size: int
) -> torch.Tensor:
    """Build the full Megatron tensor from its HF sources (in `hf_sources` order)."""
    rule, _ = _match(mcore_key)
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "glu":
        return torch.cat(tensors, dim=0)
    if rule.kind == "vocab":
        (weight,) = tensors
        if weight.shape[0] > padded_vocab_size:
            raise MappingError(
                f"{mcore_key}: {weight.shape[0]} vocab rows exceed the padded size "
                f"{padded_vocab_size}"
            )
        pad = weight.new_zeros(padded_vocab_size - weight.shape[0], *weight.shape[1:])
        return torch.cat([weight, pad], dim=0)
    # qkv: interleave per query group
    groups, q_rows, kv_rows = _qkv_groups(cfg)
    q, k, v = tensors
    rest = q.shape[1:]
    q = q.reshape(groups, q_rows, *rest)
    k = k.reshape(groups, kv_rows, *rest)
    v = v.reshape(groups, kv_rows, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def from_mcore(
    mcore_key: str, tensor: torch.Tensor, cfg: DotsConfig
) -> Dict[str, torch.Tensor]:
    """Split a full Megatron tensor into its HF tensors; vocab padding is removed."""
    rule, groups = _match(mcore_key)
    names = [t.format(**groups) for t in rule.hf]
    if rule.kind == "copy":
        return {names[0]: tensor}
    if rule.kind == "glu":
        return dict(zip(names, torch.chunk(tensor, 2, dim=0)))
    if rule.kind == "vocab":
        return {names[0]: tensor[: cfg.vocab_size]}
    n_groups, q_rows, kv_rows = _qkv_groups(cfg)
    rest = tensor.shape[1:]
    q, k, v = torch.split(tensor.reshape(n_groups, -1, *rest), [q_rows, kv_rows, kv_rows], dim=1)
    return {name: t.reshape(-1, *rest) for name, t in zip(names, (q, k, v))}


def mcore_keys(cfg: DotsConfig, backend: str = "sequential") -> List[str]:
    """All full Megatron keys of a dots model built with `backend` (`te` or `sequential`)."""
    te = backend == "te"
    keys = ["embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        keys.append(p + ("self_attention.linear_qkv.layer_norm_weight" if te
                         else "input_layernorm.weight"))
        keys.append(p + "self_attention.linear_qkv.weight")
        if cfg.attention_bias:
            keys.append(p + "self_attention.linear_qkv.bias")
        keys += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight",
                 p + "self_attention.linear_proj.weight"]
        if i < cfg.first_k_dense:
            keys.append(p + ("mlp.linear_fc1.layer_norm_weight" if te
                             else "pre_mlp_layernorm.weight"))
            keys += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
            continue
        keys += [p + "pre_mlp_layernorm.weight", p + "mlp.router.weight",
                 p + "mlp.router.expert_bias"]
        for e in range(cfg.num_moe_experts):
            if te:
                keys += [p + f"mlp.experts.linear_fc1.weight{e}",
                         p + f"mlp.experts.linear_fc2.weight{e}"]
            else:
                keys += [p + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                         p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
        if cfg.num_shared_experts:
            keys += [p + "mlp.shared_experts.linear_fc1.weight",
                     p + "mlp.shared_experts.linear_fc2.weight"]
    keys += ["decoder.final_layernorm.weight", "output_layer.weight"]
    return keys


def hf_to_mcore(
    hf_state: Mapping[str, torch.Tensor],
    cfg: DotsConfig,
    padded_vocab_size: Optional[int] = None,
    keys: Optional[Iterable[str]] = None,
    backend: str = "sequential",
) -> Dict[str, torch.Tensor]:
    """Full Megatron state dict from an HF (on-disk layout) state dict."""
    padded = padded_vocab_size or cfg.padded_vocab_size()
    out = {}
    for key in keys if keys is not None else mcore_keys(cfg, backend):
        sources = hf_sources(key)
        missing = [s for s in sources if s not in hf_state]
        if missing:
            raise MappingError(f"Hugging Face tensor {missing[0]!r} (for {key}) is missing")
        out[key] = to_mcore(key, [hf_state[s] for s in sources], cfg, padded)
    return out


def mcore_to_hf(mcore_state: Mapping[str, torch.Tensor], cfg: DotsConfig) -> Dict[str, torch.Tensor]:
    """HF (on-disk layout) state dict from a full Megatron state dict."""
    out = {}
    for key, tensor in mcore_state.items():
        out.update(from_mcore(key, tensor, cfg))
    return out


_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")


def unfuse_hf_experts(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers-5 in-memory layout -> on-disk layout (one tensor per expert)."""
    out = {}
    for key, tensor in state.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = tensor
            continue
        prefix, kind = m.groups()
        for e, t in enumerate(tensor):
            if kind == "down_proj":
                out[f"{prefix}{e}.down_proj.weight"] = t
            else:
                gate, up = torch.chunk(t, 2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
    return out


def fuse_hf_experts(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """On-disk layout -> transformers-5 in-memory layout (`gate_up_proj`, `down_proj`)."""
    out, experts = {}, {}
    for key, tensor in state.items():
        m = _PER_EXPERT.match(key)
        if m:
            prefix, e, kind = m.groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[kind] = tensor
        else:
            out[key] = tensor
    for prefix, by_expert in experts.items():
        order = sorted(by_expert)
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([by_expert[e]["gate"], by_expert[e]["up"]], dim=0) for e in order]
        )
        out[prefix + "down_proj"] = torch.stack([by_expert[e]["down"] for e in order])
    return out
