"""Exact static memory of one rank for `megatron-dots plan`: parameters, Megatron DDP's fp32
gradient buffers and Adam's state, computed from the config and the layout without building a
model (dots.llm1's 142B in milliseconds).

Owns: the table of a dots model's parameters in the built model's module order, per expert
backend (`PARAMETER_TABLE`: global shapes and how TP / EP split them, data, not code); the
parameters a rank holds (`rank_parameters`); Megatron-Core DDP's buffers of those parameters
with their padding and buckets (`rank_grad_buffers`, `buffer_layout`); the distributed
optimizer's shard of each data-parallel rank (`GradBuffer.shard_numel`); and their sum
(`rank_static_memory`). Other static memory is left out: the router's fp32 buffers
(`expert_bias`, the load counters: 12 bytes per expert per MoE layer), RoPE's `inv_freq`, and
Adam's scalar `step` per optimizer tensor.

How Megatron-Core (0.16.1 to 0.20, `distributed/param_and_grad_buffer.py`,
`optimizer/distrib_optimizer.py`; the rules are the same in those releases) lays out
gradients, which this module follows:

* each model chunk gets its own DDP with one buffer per (parameter dtype, expert-parallel)
  group: routed-expert weights go to the expert-parallel buffer (reduced over expert-DP) only
  when EP > 1, otherwise they share the dense buffer (reduced over DP);
* parameters are placed in reverse module order (the order of the backward); a bucket closes
  once it holds `bucket_size` elements. `bucket_size` is None (one bucket) without
  `--overlap-grad-reduce`, for model chunks after the first and on pipeline ranks > 0;
  otherwise `--ddp-bucket-size` or max(40M, 1M x DP);
* with the distributed optimizer every parameter starts at a multiple of 64 elements and every
  bucket ends at a multiple of lcm(its DP size, 128), and the parameters themselves move into
  a (padded) parameter buffer of the same length; without it there is no padding;
* the distributed optimizer gives data-parallel rank r the r-th of DP equal slices of every
  bucket; it keeps fp32 main weights (half precision only) and Adam's two fp32 moments for the
  parameter elements inside that slice (padding gets none).
"""

from dataclasses import asdict, dataclass
from math import lcm
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import DotsConfig
from .layout import Layout

GRAD_BYTES = 4  # our trainer reduces gradients in fp32 (grad_reduce_in_fp32=True)
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_WEIGHT_BYTES = 4  # fp32 main parameters of bf16 / fp16 models
PARAM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PARAM_START_ALIGNMENT = 64  # elements (distributed optimizer)
BUCKET_END_ALIGNMENT = 128  # elements, combined with the DP size (distributed optimizer)
DEFAULT_BUCKET_ELEMENTS = 40_000_000
DEFAULT_BUCKET_ELEMENTS_PER_DP_RANK = 1_000_000
BACKENDS = ("te", "grouped", "sequential")


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    """One parameter: its name under the part's prefix, its global shape as named sizes
    (`size/tp`: split over tensor parallelism, expert-TP for experts; `experts/ep`: the local
    experts), and the DotsConfig field that must be truthy for it to exist."""

    name: str
    shape: str
    when: Optional[str] = None


@dataclass(frozen=True)
class Block:
    """Rows in module order; `per_local_expert`: the rows repeat for each local expert `{e}`;
    `expert`: routed-expert weights (expert-parallel, split over EP and expert-TP)."""

    rows: Tuple[Row, ...]
    per_local_expert: bool = False
    expert: bool = False


def _rows(*rows) -> Tuple[Row, ...]:
    return tuple(Row(*row) for row in rows)


_EMBEDDING = (Block(_rows(("embedding.word_embeddings.weight", "vocab/tp hidden"))),)
_FINAL = (Block(_rows(("decoder.final_layernorm.weight", "hidden"),
                      ("output_layer.weight", "vocab/tp hidden"))),)
_QK_NORMS = (("self_attention.q_layernorm.weight", "head_dim"),
             ("self_attention.k_layernorm.weight", "head_dim"))
_SHARED = Block(_rows(("mlp.shared_experts.linear_fc1.weight", "shared_glu/tp hidden",
                       "num_shared_experts"),
                      ("mlp.shared_experts.linear_fc2.weight", "hidden shared_ffn/tp",
                       "num_shared_experts")))
_ROUTER = Block(_rows(("mlp.router.weight", "experts hidden")))
_EXPERT_FC1 = "expert_glu/tp hidden"
_EXPERT_FC2 = "hidden expert_ffn/tp"

# Megatron-Core's local modules with DotsRMSNorm ("sequential" and "grouped" backends).
_LOCAL_ATTENTION = Block(_rows(
    ("input_layernorm.weight", "hidden"),
    ("self_attention.linear_proj.weight", "hidden q/tp"),
    ("self_attention.linear_qkv.weight", "qkv/tp hidden"),
    ("self_attention.linear_qkv.bias", "qkv/tp", "attention_bias"),
    *_QK_NORMS,
    ("pre_mlp_layernorm.weight", "hidden")))
_LOCAL_DENSE_MLP = Block(_rows(("mlp.linear_fc1.weight", "ffn_glu/tp hidden"),
                               ("mlp.linear_fc2.weight", "hidden ffn/tp")))

# Transformer Engine: the pre-attention norm lives in linear_qkv, the dense layer's pre-MLP
# norm in linear_fc1 (TE registers layer_norm_weight before weight); experts are TEGroupedMLP.
_TE_ATTENTION = Block(_rows(
    ("self_attention.linear_proj.weight", "hidden q/tp"),
    ("self_attention.linear_qkv.layer_norm_weight", "hidden"),
    ("self_attention.linear_qkv.weight", "qkv/tp hidden"),
    ("self_attention.linear_qkv.bias", "qkv/tp", "attention_bias"),
    *_QK_NORMS))
_TE_DENSE_MLP = Block(_rows(("mlp.linear_fc1.layer_norm_weight", "hidden"),
                            ("mlp.linear_fc1.weight", "ffn_glu/tp hidden"),
                            ("mlp.linear_fc2.weight", "hidden ffn/tp")))
_TE_PRE_MLP_NORM = Block(_rows(("pre_mlp_layernorm.weight", "hidden")))

PARAMETER_TABLE: Dict[str, Dict[str, Tuple[Block, ...]]] = {
    "sequential": {  # SequentialMLP: fc1, fc2 of each local expert in turn
        "embedding": _EMBEDDING,
        "dense_layer": (_LOCAL_ATTENTION, _LOCAL_DENSE_MLP),
        "moe_layer": (_LOCAL_ATTENTION, _ROUTER,
                      Block(_rows(("mlp.experts.local_experts.{e}.linear_fc1.weight", _EXPERT_FC1),
                                  ("mlp.experts.local_experts.{e}.linear_fc2.weight", _EXPERT_FC2)),
                            per_local_expert=True, expert=True),
                      _SHARED),
        "final": _FINAL,
    },
    "grouped": {  # TorchGroupedExperts: all local experts stacked in two tensors
        "embedding": _EMBEDDING,
        "dense_layer": (_LOCAL_ATTENTION, _LOCAL_DENSE_MLP),
        "moe_layer": (_LOCAL_ATTENTION, _ROUTER,
                      Block(_rows(("mlp.experts.weight1", "experts/ep " + _EXPERT_FC1),
                                  ("mlp.experts.weight2", "experts/ep " + _EXPERT_FC2)),
                            expert=True),
                      _SHARED),
        "final": _FINAL,
    },
    "te": {  # TEGroupedMLP: fc1's weight{e} for every local expert, then fc2's
        "embedding": _EMBEDDING,
        "dense_layer": (_TE_ATTENTION, _TE_DENSE_MLP),
        "moe_layer": (_TE_ATTENTION, _TE_PRE_MLP_NORM, _ROUTER,
                      Block(_rows(("mlp.experts.linear_fc1.weight{e}", _EXPERT_FC1)),
                            per_local_expert=True, expert=True),
                      Block(_rows(("mlp.experts.linear_fc2.weight{e}", _EXPERT_FC2)),
                            per_local_expert=True, expert=True),
                      _SHARED),
        "final": _FINAL,
    },
}


def named_sizes(cfg: DotsConfig, tp: int, ep: int) -> Dict[str, int]:
    """The sizes the table's shapes name (vocab padded as the model is built under `tp`)."""
    shared = cfg.shared_expert_intermediate_size or 0
    return {
        "hidden": cfg.hidden_size, "vocab": cfg.padded_vocab_size(tp),
        "head_dim": cfg.kv_channels, "q": cfg.num_attention_heads * cfg.kv_channels,
        "qkv": (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels,
        "ffn": cfg.ffn_hidden_size, "ffn_glu": 2 * cfg.ffn_hidden_size,
        "experts": cfg.num_moe_experts, "expert_ffn": cfg.moe_ffn_hidden_size,
        "expert_glu": 2 * cfg.moe_ffn_hidden_size, "shared_ffn": shared,
        "shared_glu": 2 * shared, "tp": tp, "ep": ep,
    }


def _shape(spec: str, sizes: Dict[str, int]) -> Tuple[int, ...]:
    dims = []
    for token in spec.split():
        name, _, divisor = token.partition("/")
        value, parts = sizes[name], sizes[divisor] if divisor else 1
        if value % parts:
            raise ValueError(f"{name} = {value} is not divisible by {divisor} = {parts}")
        dims.append(value // parts)
    return tuple(dims)


# ------------------------------------------------------------------- a rank's parameters
@dataclass(frozen=True)
class LocalParameter:
    """One parameter of a model chunk, named as the chunk's `named_parameters` names it
    (layer numbers local to the chunk), with this rank's shape."""

    name: str
    shape: Tuple[int, ...]
    expert: bool  # a routed-expert weight

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def resolve_backend(backend: str) -> str:
    """`auto` -> `te` where Transformer Engine is importable, else `grouped` (as the model
    builder resolves it)."""
    if backend == "auto":
        from ..compat.versions import HAVE_TE

        return "te" if HAVE_TE else "grouped"
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert backend {backend!r}; choose one of auto, "
                         f"{', '.join(BACKENDS)}")
    return backend


def _check_pp_rank(layout: Layout, pp_rank: int) -> None:
    if not 0 <= pp_rank < layout.pp:
        raise ValueError(f"pp_rank {pp_rank} is outside the pipeline of size {layout.pp}")


def rank_parameters(cfg: DotsConfig, layout: Layout, pp_rank: int,
                    backend: str = "auto") -> List[List[LocalParameter]]:
    """The parameters of each model chunk of pipeline rank `pp_rank`, in module order (every
    TP / EP rank of a stage holds the same shapes)."""
    _check_pp_rank(layout, pp_rank)
    table = PARAMETER_TABLE[resolve_backend(backend)]
    sizes = named_sizes(cfg, layout.tp, layout.ep)
    local_experts = cfg.num_moe_experts // layout.ep

    def expand(blocks: Sequence[Block], prefix: str) -> List[LocalParameter]:
        out = []
        for block in blocks:
            rows = [row for row in block.rows if row.when is None or getattr(cfg, row.when)]
            experts = range(local_experts) if block.per_local_expert else [None]
            for e in experts:
                for row in rows:
                    name = row.name.format(e=e) if e is not None else row.name
                    out.append(LocalParameter(prefix + name, _shape(row.shape, sizes),
                                              block.expert))
        return out

    chunks = []
    for c, layers in enumerate(layout.stage_layers(cfg, pp_rank)):
        params = []
        if pp_rank == 0 and c == 0:
            params += expand(table["embedding"], "")
        for local, layer in enumerate(layers):
            part = "dense_layer" if layer < cfg.first_k_dense else "moe_layer"
            params += expand(table[part], f"decoder.layers.{local}.")
        if pp_rank == layout.pp - 1 and c == layout.vpp - 1:
            params += expand(table["final"], "")
        chunks.append(params)
    return chunks


# ---------------------------------------------------------------------- DDP's buffers
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def buffer_layout(numels: Sequence[int], data_parallel_size: int, bucket_size: Optional[int],
                  distributed_optimizer: bool
                  ) -> Tuple[List[Tuple[int, int, int]], List[Tuple[int, int]]]:
    """Where Megatron DDP puts parameters of `numels` (module order) in one buffer:
    ((start, end, bucket) of each parameter in the same order, (start, end) of each bucket,
    padding included)."""
    def bucket_end(end: int) -> int:
        if not distributed_optimizer:
            return end
        return _round_up(end, lcm(data_parallel_size, BUCKET_END_ALIGNMENT))

    placed: List[Tuple[int, int, int]] = [None] * len(numels)
    buckets: List[Tuple[int, int]] = []
    start = bucket_start = 0
    open_bucket = False
    for i in reversed(range(len(numels))):  # the backward's order
        if distributed_optimizer:
            start = _round_up(start, PARAM_START_ALIGNMENT)
        end = start + numels[i]
        placed[i] = (start, end, len(buckets))
        open_bucket = True
        if bucket_size is not None and end - bucket_start >= bucket_size:
            bucket_start = bucket_end(end)
            buckets.append((buckets[-1][1] if buckets else 0, bucket_start))
            start, open_bucket = bucket_start, False
        else:
            start = end
    if open_bucket:
        buckets.append((buckets[-1][1] if buckets else 0, bucket_end(end)))
    return placed, buckets


@dataclass(frozen=True)
class GradBuffer:
    """One DDP gradient buffer of a model chunk (Megatron's `_ParamAndGradBuffer`)."""

    chunk: int
    expert_parallel: bool  # reduced over expert-DP (routed experts with EP > 1)
    data_parallel_size: int  # of the group that reduces it (DP or expert-DP)
    params: Tuple[LocalParameter, ...]  # module order
    param_ranges: Tuple[Tuple[int, int, int], ...]  # (start, end, bucket) of each parameter
    buckets: Tuple[Tuple[int, int], ...]

    @property
    def numel(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0

    @property
    def param_numel(self) -> int:
        return sum(p.numel for p in self.params)

    def shard_range(self, bucket: int, dp_rank: int) -> Tuple[int, int]:
        """The distributed optimizer's slice of `bucket` for data-parallel rank `dp_rank`."""
        start, end = self.buckets[bucket]
        size = (end - start) // self.data_parallel_size
        return start + dp_rank * size, start + (dp_rank + 1) * size

    def shard_numels(self) -> List[int]:
        """Parameter elements the distributed optimizer's ranks (0 .. DP-1 of this buffer's
        group) update: each rank's slices of every bucket less the padding inside them."""
        dp = self.data_parallel_size
        owned = [0] * dp
        in_bucket: Dict[int, List[Tuple[int, int]]] = {}
        for start, end, bucket in self.param_ranges:
            in_bucket.setdefault(bucket, []).append((start, end))
        for bucket, (low, high) in enumerate(self.buckets):
            if (high - low) % dp:
                raise ValueError(f"bucket {bucket} ({high - low} elements) is not divisible by "
                                 f"DP {dp}: only the distributed optimizer's buffers are sharded")
            size = (high - low) // dp
            owned = [n + size for n in owned]
            cursor = low
            for start, end in sorted(in_bucket.get(bucket, [])) + [(high, high)]:
                if start > cursor:  # padding [cursor, start)
                    for r in range((cursor - low) // size, (start - 1 - low) // size + 1):
                        slice_low = low + r * size
                        owned[r] -= min(start, slice_low + size) - max(cursor, slice_low)
                cursor = max(cursor, end)
        return owned

    def shard_numel(self, dp_rank: int) -> int:
        """`shard_numels()[dp_rank]`."""
        return self.shard_numels()[dp_rank]


def ddp_bucket_size(layout: Layout, chunk: int, pp_rank: int, overlap_grad_reduce: bool,
                    bucket_size: Optional[int]) -> Optional[int]:
    """The bucket size Megatron DDP uses for a chunk (None: one bucket per buffer)."""
    if not overlap_grad_reduce or chunk > 0 or pp_rank > 0:
        return None
    if bucket_size is not None:
        return bucket_size
    return max(DEFAULT_BUCKET_ELEMENTS, DEFAULT_BUCKET_ELEMENTS_PER_DP_RANK * layout.dp)


def rank_grad_buffers(cfg: DotsConfig, layout: Layout, pp_rank: int, *, backend: str = "auto",
                      overlap_grad_reduce: bool = False,
                      bucket_size: Optional[int] = None) -> List[GradBuffer]:
    """Megatron DDP's buffers of pipeline rank `pp_rank`: per chunk the dense buffer, then the
    expert-parallel one (EP > 1). `overlap_grad_reduce` / `bucket_size`: the run's
    --overlap-grad-reduce / --ddp-bucket-size."""
    buffers = []
    for c, params in enumerate(rank_parameters(cfg, layout, pp_rank, backend)):
        size = ddp_bucket_size(layout, c, pp_rank, overlap_grad_reduce, bucket_size)
        for expert_parallel in (False, True):
            members = [p for p in params if (p.expert and layout.ep > 1) == expert_parallel]
            if not members:
                continue
            dp = layout.expert_dp if expert_parallel else layout.dp
            ranges, buckets = buffer_layout([p.numel for p in members], dp, size,
                                            layout.distributed_optimizer)
            buffers.append(GradBuffer(c, expert_parallel, dp, tuple(members), tuple(ranges),
                                      tuple(buckets)))
    return buffers


# ------------------------------------------------------------------------- the total
@dataclass
class StaticMemory:
    """Static bytes of one rank (see the module docstring for what is counted)."""

    parameters: int  # numel of parameters this rank holds (dense + expert shards)
    expert_parameters: int  # of which routed-expert numel
    param_bytes: int  # the parameters in their training dtype
    grad_bytes: int  # DDP's fp32 gradient buffers, padding included
    optimizer_bytes: int  # fp32 main weights (half precision) + Adam moments of this rank
    param_padding_bytes: int = 0  # the distributed optimizer's parameter-buffer padding

    def total(self) -> int:
        return self.param_bytes + self.param_padding_bytes + self.grad_bytes + \
            self.optimizer_bytes

    def to_dict(self) -> dict:
        return dict(asdict(self), total=self.total())


def optimizer_bytes_per_element(precision: str) -> int:
    """Adam's two fp32 moments, plus the fp32 main weight of a half-precision parameter."""
    return ADAM_MOMENT_BYTES + (MASTER_WEIGHT_BYTES if precision != "fp32" else 0)


def _owned(buffers: Sequence[GradBuffer], dp_size: int, dp_rank: Optional[int]) -> int:
    """Elements a data-parallel rank's optimizer updates over `buffers` (None: the largest)."""
    if not buffers:
        return 0
    per_rank = [sum(column) for column in zip(*(b.shard_numels() for b in buffers))]
    return max(per_rank) if dp_rank is None else per_rank[dp_rank]


def rank_static_memory(cfg: DotsConfig, layout: Layout, pp_rank: int, *, backend: str = "auto",
                       overlap_grad_reduce: bool = False, bucket_size: Optional[int] = None,
                       dp_rank: Optional[int] = None,
                       expert_dp_rank: Optional[int] = None) -> StaticMemory:
    """Static memory of a rank on pipeline stage `pp_rank` under `layout`.

    `backend`: the expert backend the run builds (`auto` as the builder resolves it);
    `overlap_grad_reduce` / `bucket_size`: the run's --overlap-grad-reduce /
    --ddp-bucket-size (they move bucket boundaries, hence padding). With the distributed
    optimizer, ranks of a stage differ in their optimizer shard by at most the padding:
    `dp_rank` / `expert_dp_rank` pick one rank exactly; None takes the largest shard of each
    (the worst rank of the stage, or a bound within the padding of it).
    """
    layout.check(cfg)
    if layout.precision not in PARAM_BYTES:
        raise ValueError(f"unknown precision {layout.precision!r}")
    params = [p for chunk in rank_parameters(cfg, layout, pp_rank, backend) for p in chunk]
    buffers = rank_grad_buffers(cfg, layout, pp_rank, backend=backend,
                                overlap_grad_reduce=overlap_grad_reduce, bucket_size=bucket_size)
    numel = sum(p.numel for p in params)
    size = PARAM_BYTES[layout.precision]
    per_element = optimizer_bytes_per_element(layout.precision)
    if layout.distributed_optimizer:
        owned = (_owned([b for b in buffers if not b.expert_parallel], layout.dp, dp_rank)
                 + _owned([b for b in buffers if b.expert_parallel], layout.expert_dp,
                          expert_dp_rank))
        padding = sum(b.numel - b.param_numel for b in buffers) * size
    else:
        owned, padding = numel, 0
    return StaticMemory(
        parameters=numel,
        expert_parameters=sum(p.numel for p in params if p.expert),
        param_bytes=numel * size,
        grad_bytes=sum(b.numel for b in buffers) * GRAD_BYTES,
        optimizer_bytes=owned * per_element,
        param_padding_bytes=padding,
    )


def model_parameters(cfg: DotsConfig) -> Tuple[int, int]:
    """(total, active-per-token) parameters, vocab padding excluded (`cfg.num_parameters`)."""
    return cfg.num_parameters()

