"""How a dots model lies in a Megatron-Core ``torch_dist`` checkpoint, without building the model.

Megatron-Core's distributed checkpoints store *global* tensors under *sharded keys*, independent
of the TP/PP/EP/VPP layout that saved them (``sharded_state_dict`` of GPTModel, with the default
metadata, i.e. ``singleton_local_shards=False``):

* every full Megatron key (see ``hf_mapping.mcore_keys``) is stored under its own name with its
  TP=1 shape, except routed experts: ``...mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``
  (SequentialMLP) / ``...mlp.experts.linear_fc{1,2}.weight{e}`` (TEGroupedMLP) are rows ``e`` of
  one stacked tensor ``...mlp.experts.experts.linear_fc{1,2}.weight`` of shape [E, ...];
* gated ``linear_fc1`` is globally ``[gate; up]`` (upstream's swiglu factory writes the halves as
  two chunks of one tensor);
* each local (non-TE) linear layer also stores a pickled ``_extra_state`` object (None) under
  ``{module}._extra_state/shard_{offset}_{count}``; count is E for routed experts, else 1.

Checkpoints written with ``singleton_local_shards=True`` keep one key per expert
(``...experts.experts.{e}.linear_fc1.weight``) and split gated fc1 into ``..._w`` / ``..._v``;
:func:`stored_sources` resolves both forms, so either can be read.

``tests/test_dist_layout.py`` checks this module against the sharded state dict of a real model
on every supported megatron-core release.
"""

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..config import DotsConfig
from .hf_mapping import from_mcore, mcore_keys

_EXPERT = re.compile(
    r"(?P<prefix>decoder\.layers\.\d+\.mlp\.experts\.)"
    r"(?:local_experts\.(?P<e>\d+)\.(?P<name>linear_fc[12])\.weight"
    r"|(?P<name2>linear_fc[12])\.weight(?P<e2>\d+))$"
)
_GLU_FC1 = re.compile(r"decoder\.layers\.\d+\.mlp\.(?:|shared_experts\.|experts\.experts\.)"
                      r"linear_fc1\.weight$")
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


@dataclass(frozen=True)
class Placement:
    """Where one full Megatron tensor lies in the checkpoint."""

    model_key: str
    stored_key: str
    expert: Optional[int]  # row of the stacked expert tensor, None if not an expert


def placement(model_key: str) -> Placement:
    """The stored key (and expert row) of a full Megatron key."""
    m = _EXPERT.match(model_key)
    if not m:
        return Placement(model_key, model_key, None)
    name = m.group("name") or m.group("name2")
    expert = int(m.group("e") if m.group("e") is not None else m.group("e2"))
    return Placement(model_key, f"{m.group('prefix')}experts.{name}.weight", expert)


def full_shape(model_key: str, cfg: DotsConfig, padded_vocab_size: int) -> Tuple[int, ...]:
    """Shape of a full (TP=1) Megatron tensor of this dots config."""
    h, d = cfg.hidden_size, cfg.kv_channels
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    suffix_shapes = [
        (r"(embedding\.word_embeddings|output_layer)\.weight", (padded_vocab_size, h)),
        (r"linear_qkv\.weight", (qkv_rows, h)),
        (r"linear_qkv\.bias", (qkv_rows,)),
        (r"[qk]_layernorm\.weight", (d,)),
        (r"linear_proj\.weight", (h, cfg.num_attention_heads * d)),
        (r"router\.weight", (cfg.num_moe_experts, h)),
        (r"router\.expert_bias", (cfg.num_moe_experts,)),
        (r"shared_experts\.linear_fc1\.weight", (2 * cfg.shared_expert_intermediate_size, h)),
        (r"shared_experts\.linear_fc2\.weight", (h, cfg.shared_expert_intermediate_size)),
        (r"experts\.(local_experts\.\d+\.)?linear_fc1\.weight\d*",
         (2 * cfg.moe_ffn_hidden_size, h)),
        (r"experts\.(local_experts\.\d+\.)?linear_fc2\.weight\d*", (h, cfg.moe_ffn_hidden_size)),
        (r"mlp\.linear_fc1\.weight", (2 * cfg.ffn_hidden_size, h)),
        (r"mlp\.linear_fc2\.weight", (h, cfg.ffn_hidden_size)),
        (r"((final|input|pre_mlp)_layernorm\.weight|layer_norm_weight)", (h,)),
    ]
    for suffix, shape in suffix_shapes:
        if re.search(r"(^|\.)" + suffix + "$", model_key):
            return shape
    raise KeyError(f"no shape rule for Megatron key {model_key!r}")


def hf_shapes(model_key: str, cfg: DotsConfig,
              padded_vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """HF name -> shape of the HF tensors one full Megatron tensor becomes (padding stripped)."""
    meta = torch.empty(full_shape(model_key, cfg, padded_vocab_size), device="meta")
    return {name: tuple(t.shape) for name, t in from_mcore(model_key, meta, cfg).items()}


@dataclass(frozen=True)
class StoredTensor:
    """One global tensor of the checkpoint and the full Megatron tensors it is made of."""

    key: str
    shape: Tuple[int, ...]
    members: Tuple[Placement, ...]  # one, or E expert rows in order

    @property
    def layer(self) -> Optional[int]:
        m = re.match(r"decoder\.layers\.(\d+)\.", self.key)
        return int(m.group(1)) if m else None


def stored_tensors(
    cfg: DotsConfig, padded_vocab_size: int, backend: str = "sequential"
) -> List[StoredTensor]:
    """Every stored tensor of a dots model, in model order (experts stacked)."""
    stacked: Dict[str, List[Placement]] = {}
    order: List[str] = []
    shapes: Dict[str, Tuple[int, ...]] = {}
    for key in mcore_keys(cfg, backend):
        place = placement(key)
        if place.stored_key not in stacked:
            order.append(place.stored_key)
            stacked[place.stored_key] = []
            shape = full_shape(key, cfg, padded_vocab_size)
            shapes[place.stored_key] = ((cfg.num_moe_experts,) + shape
                                        if place.expert is not None else shape)
        stacked[place.stored_key].append(place)
    return [StoredTensor(k, shapes[k], tuple(stacked[k])) for k in order]


def extra_state_keys(cfg: DotsConfig) -> List[str]:
    """Keys of the `_extra_state` objects the local (non-TE) spec stores (value None)."""
    keys = []
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        keys += [p + "self_attention.linear_qkv._extra_state/shard_0_1",
                 p + "self_attention.linear_proj._extra_state/shard_0_1"]
        if i < cfg.first_k_dense:
            keys += [p + f"mlp.linear_fc{j}._extra_state/shard_0_1" for j in (1, 2)]
            continue
        for e in range(cfg.num_moe_experts):
            keys += [p + f"mlp.experts.experts.linear_fc{j}._extra_state/shard_{e}_"
                     f"{cfg.num_moe_experts}" for j in (1, 2)]
        if cfg.num_shared_experts:
            keys += [p + f"mlp.shared_experts.linear_fc{j}._extra_state/shard_0_1"
                     for j in (1, 2)]
    return keys


def is_glu_fc1(stored_key: str) -> bool:
    """Whether this stored tensor is a gated fc1 ([gate; up])."""
    return bool(_GLU_FC1.match(stored_key))


@dataclass(frozen=True)
class Source:
    """How to read one stored tensor from a checkpoint's keys (either sharding format)."""

    keys: Tuple[str, ...]  # stored keys to read
    shapes: Tuple[Tuple[int, ...], ...]
    singleton: bool  # True: one key per expert (and `_w`/`_v` halves for fc1)


def stored_sources(tensor: StoredTensor, available: Mapping[str, Sequence[int]]) -> Source:
    """Find `tensor` among a checkpoint's stored keys (`available`: key -> global shape).

    Raises KeyError naming the first missing key if neither sharding format is complete.
    """
    if tensor.key in available:
        return Source((tensor.key,), (tuple(available[tensor.key]),), False)
    glu = is_glu_fc1(tensor.key)
    base = tensor.key
    if tensor.members[0].expert is not None:
        prefix, name = base.rsplit(".experts.", 1)[0], base.rsplit(".", 2)[-2]
        bases = [f"{prefix}.experts.{p.expert}.{name}.weight" for p in tensor.members]
    else:
        bases = [base]
    keys = [b + s for b in bases for s in (("_w", "_v") if glu else ("",))]
    missing = [k for k in keys if k not in available]
    if missing:
        raise KeyError(tensor.key)
    return Source(tuple(keys), tuple(tuple(available[k]) for k in keys), True)


def model_prefixed(keys: Sequence[str]) -> Iterator[str]:
    """The keys that belong to the model (not optimizer, RNG, scheduler ... state)."""
    return (k for k in keys if k.startswith(MODEL_PREFIXES))
