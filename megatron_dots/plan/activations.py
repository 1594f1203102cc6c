"""Activation memory per rank from the model shape alone (`megatron-dots plan`).

Owns the analytic counterpart of the recompute planner's fitted memory model
(`recompute.memory_model`): the bytes each layer keeps for backward, per quantity the saved-
tensor counter (`recompute.measure.SavedBytes`) records (`rest`, `attn_core`, `mlp`, `core_in`,
`mlp_in`, `input`), and the bytes outside the layers (embedding, final norm, logits, loss);
an `ActivationMemoryModel` filled with them, so the existing `RecomputePlanner` plans from the
shape alone; and a rank's peak over the pipeline schedule (`schedule_order`), with or without
a recompute budget, plus the buffers the counter does not see.

What is counted is what the TE-free path keeps (`--dots-expert-backend grouped`, the default
without Transformer Engine: local parallel linears, `DotsRMSNorm`, SDPA / flash core attention,
`TorchGroupedExperts`, Megatron-Core's all-to-all dispatcher), per rank, for one micro-batch of
b x s tokens (t = b s), model dtype of `dtype_bytes` d (fp32 norms, router and softmax as the
code computes them). With sequence parallelism the norms, residuals and the linears' saved
inputs hold t / TP tokens (Megatron-Core's linears keep the local shard and all-gather again in
backward); attention and MLP tensors hold all t tokens with heads and FFN width split by TP.

* a norm keeps its fp32 input copy (the input itself in fp32), the fp32 rstd and the
  normalised input in the model dtype: t_sp (4h + 4 + d h); its output is kept by the next
  linear (t_sp h d);
* ``rest``: both norms, linear_qkv's input, the q / k RMSNorms (fp32 copies of q and k in half
  precision; in fp32 they keep views of the qkv output, i.e. all of it), their rstd and
  outputs, RoPE's cos / sin of q and k (4 s x head_dim x d, per micro-batch, not per sample);
* ``attn_core`` (flash): q and k after RoPE, v (which views the qkv output: all of it in half
  precision, where nothing kept it before), the output and the fp32 log-sum-exp (t heads / TP x
  4). Unfused (Megatron-Core's local `DotProductAttention`): q, k^T, v, the s x s causal mask,
  the fp32 softmax and its model-dtype copy (b heads / TP s^2 (4 + d)); its output is copied
  before linear_proj (counted in ``rest``);
* ``mlp`` dense: the input and 5 x FFN / TP per token (fc1 output 2 FFN, silu(gate),
  up + 0, fc2 input); MoE: the input, the shared experts (5 x shared FFN / TP), the router
  (fp32 sigmoid scores, top-k indices and weights, their sum, and the same again for the
  sequence aux loss: t_sp (8E + 20k + 8) + b E x 8), the permutation map (t_sp E x 5 bytes
  in megatron-core 0.16: bool map + fp32 probs; t_sp E x 8 from 0.19: argsort indices) and
  indices (t_sp k x 8), and the routed experts: per received token copy the input (h d), the
  fc1 output (2 x expert FFN / TP x d) and the fp32 weight;
* ``core_in``: what a core-attention checkpoint keeps instead of ``attn_core``: its inputs not
  kept otherwise, and its output, which linear_proj then keeps (the fitted model's recorded
  ``core_in`` misses the latter); ``mlp_in`` / ``input``: the MLP's / layer's input (t_sp h d).

Routed tokens: each rank routes t_sp tokens k times; over the expert-parallel group the copies
spread over the experts, and the expert-TP all-gather (expert TP = TP) brings TP peers' copies
together, so a rank's experts receive t k copies on average. `routing_imbalance` scales that:
1.0 is the expected value under balanced routing (what the aux-loss-free bias steers to; the
mean over the expert-parallel peers is exactly t k); the most loaded rank of a real step holds
more (e.g. 1.2-1.5 early in training), and that rank sets the memory peak (below 1.0: a rank
that received fewer copies than the mean, e.g. to check one measured rank).

Beside the saved tensors, a rank's peak (`rank_activation_memory`) adds what the counter does
not see: the dispatcher's communication buffers, the model-dtype logits alive while the loss is
computed, with --delay-wgrad-compute one MoE layer's deferred weight-gradient inputs, and with
planned whole-layer recompute the RoPE table the first checkpoint of a chunk keeps (s x
head_dim x 4; the planner's model has no slot for it). Not modelled: the backward's activation
gradients of the layer in progress (transient, a few t_sp h d), Transformer Engine's kernels
(the ``te`` backend keeps somewhat different tensors: fused norm + linear, its own attention).
"""

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ..compat.versions import MCORE_AT_LEAST_019
from ..config import DotsConfig
from ..recompute.layer import NODE_PATH_MODES
from ..recompute.memory_model import (
    ATTENTION_KINDS, LAYER_QUANTITIES, OUTSIDE, ActivationMemoryModel)
from ..recompute.planner import ChunkLayout, ItemPlan, RecomputeCosts, RecomputePlanner
from ..recompute.schedule_order import Event, max_in_flight, schedule_events
from ..recompute.shapes import MicroBatchShape
from .layout import Layout

LAYER_KINDS = ("dense", "moe")
OUTSIDE_PARTS = ("embedding", "final_norm", "logits", "loss")
# The planner's chunk roles (`recompute.controller.chunk_layout`) and the parts they hold.
CHUNK_ROLES = {"chunk:pre+post": OUTSIDE_PARTS, "chunk:pre": ("embedding",),
               "chunk:post": ("final_norm", "logits", "loss"), "chunk:mid": ()}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def dtype_bytes(precision: str) -> int:
    """Bytes per activation element of a `Layout.precision`."""
    try:
        return DTYPE_BYTES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; expected one of "
                         f"{', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class _Dims:
    """Per-rank sizes of one micro-batch (see module docstring)."""

    t: int  # tokens b x s
    t_sp: float  # tokens of the norms / residuals / saved linear inputs on this rank
    b: int
    s: int
    h: int
    d: int
    tp: int

    @classmethod
    def of(cls, layout: Layout, cfg: DotsConfig, shape: MicroBatchShape, d: int) -> "_Dims":
        t = shape.tokens
        split = layout.tp if layout.sp else 1
        return cls(t, t / split, shape.micro_batch_size, shape.seq_length, cfg.hidden_size, d,
                   layout.tp)


def _norm(dims: _Dims, tokens: float) -> float:
    return tokens * (4 * dims.h + 4 + dims.d * dims.h)


def _check(kind: str, d: int, attention: str, routing_imbalance: float) -> None:
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")
    if d not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bf16 / fp16) or 4 (fp32), got {d}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {attention!r}; expected one of "
                         f"{ATTENTION_KINDS}")
    if not routing_imbalance > 0:
        raise ValueError(f"routing_imbalance must be > 0 (1.0: balanced), got "
                         f"{routing_imbalance}")


def layer_parts(cfg: DotsConfig, layout: Layout, kind: str, shape: MicroBatchShape,
                dtype_bytes: int, *, attention: str = "flash",
                routing_imbalance: float = 1.0) -> Dict[str, Dict[str, float]]:
    """Bytes per quantity (`LAYER_QUANTITIES`) and per named part, for one layer of `kind` on
    one rank (module docstring)."""
    _check(kind, dtype_bytes, attention, routing_imbalance)
    x = _Dims.of(layout, cfg, shape, dtype_bytes)
    t, tsp, d, h, tp = x.t, x.t_sp, x.d, x.h, x.tp
    half = d < 4
    hd = cfg.kv_channels
    heads, groups = cfg.num_attention_heads / tp, cfg.num_query_groups / tp
    q, kv = heads * hd, groups * hd
    qkv = t * (q + 2 * kv) * d
    rest = {
        "input_norm": _norm(x, tsp),
        "qkv_input": tsp * h * d,
        "qkv_output": 0.0 if half else qkv,  # q/k norms keep views of it in fp32
        # fp32 copies of q and k (half precision only), fp32 rstd per head, normalised q, k
        "qk_norms": t * ((q + kv) * (4 if half else 0) + (heads + groups) * 4 + (q + kv) * d),
        "rope": 4 * x.s * hd * d,
        "pre_mlp_norm": _norm(x, tsp),
    }
    qk_roped = t * (q + kv) * d
    v = qkv if half else 0.0
    if attention == "flash":
        attn = {"q_k": qk_roped, "v": v, "output": t * q * d, "lse": t * heads * 4}
        core_in = {"q_k": qk_roped, "v": v, "output": t * q * d}
    else:
        scores = x.b * heads * x.s ** 2
        attn = {"q_k": qk_roped, "v": v, "mask": float(x.s ** 2),
                "softmax": scores * (4 + d * half)}
        rest["core_output_copy"] = t * q * d
        core_in = {"q_k": qk_roped, "v": v}
    mlp = {"input": tsp * h * d}
    if kind == "dense":
        mlp["mlp"] = 5 * t * cfg.ffn_hidden_size / tp * d
    else:
        e, k = cfg.num_moe_experts, cfg.moe_router_topk
        mlp["shared_experts"] = 5 * t * (cfg.shared_expert_intermediate_size or 0) / tp * d
        router = tsp * (4 * e + 12 * k + 4)
        if cfg.seq_aux_loss_coeff:
            router += tsp * (4 * e + 8 * k + 4) + x.b * e * 8 + 4
        mlp["router"] = router
        mlp["permutation"] = tsp * e * (8 if MCORE_AT_LEAST_019 else 5) + tsp * k * 8
        received = t * k * routing_imbalance
        mlp["routed_experts"] = (received * (h * d + 2 * cfg.moe_ffn_hidden_size / tp * d + 4)
                                 + e / layout.ep * 4)
    return {
        "rest": rest,
        "attn_core": attn,
        "mlp": mlp,
        "core_in": core_in,
        "mlp_in": {"input": tsp * h * d},
        "input": {"input": tsp * h * d},
    }


def layer_quantities(cfg: DotsConfig, layout: Layout, kind: str, shape: MicroBatchShape,
                     dtype_bytes: int, *, attention: str = "flash",
                     routing_imbalance: float = 1.0) -> Dict[str, float]:
    """Bytes per quantity in `LAYER_QUANTITIES` of one `kind` layer on one rank, in the
    memory model's sense (`ActivationMemoryModel.layer_bytes` turns them into each mode)."""
    parts = layer_parts(cfg, layout, kind, shape, dtype_bytes, attention=attention,
                        routing_imbalance=routing_imbalance)
    return {name: float(sum(parts[name].values())) for name in LAYER_QUANTITIES}


def outside_quantities(cfg: DotsConfig, layout: Layout, role: str, shape: MicroBatchShape,
                       dtype_bytes: int) -> float:
    """Bytes kept outside the decoder layers, per rank and micro-batch. `role` is a part:

    * ``embedding``: the token ids (int64; under TP the vocabulary-range mask too); the
      embedding's output is kept by the first layer's norm;
    * ``final_norm``: the final RMSNorm (as a layer norm above);
    * ``logits``: the output layer's input (t_sp h d) and the cross entropy's fp32 softmax over
      the padded vocabulary / TP (in fp32 training the logits themselves, exponentiated in
      place);
    * ``loss``: the cross entropy's target mask and index (t x 9), the loss mask the loss
      function multiplies by (t x 4, fp32) and its normaliser;

    or a chunk role of the planner (``chunk:pre+post``, ``chunk:pre``, ``chunk:post``,
    ``chunk:mid``): the sum of its parts."""
    if role in CHUNK_ROLES:
        return float(sum(outside_quantities(cfg, layout, p, shape, dtype_bytes)
                         for p in CHUNK_ROLES[role]))
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bf16 / fp16) or 4 (fp32), got {dtype_bytes}")
    x = _Dims.of(layout, cfg, shape, dtype_bytes)
    if role == "embedding":  # under TP also the out-of-range mask (bool)
        return float(x.t * (8 + (layout.tp > 1)))
    if role == "final_norm":
        return float(_norm(x, x.t_sp))
    if role == "logits":
        vocab = cfg.padded_vocab_size(layout.tp) / layout.tp
        return float(x.t_sp * x.h * x.d + x.t * vocab * 4)
    if role == "loss":
        return float(x.t * (1 + 8 + 4) + 4)
    raise ValueError(f"unknown role {role!r}; expected one of {OUTSIDE_PARTS} or "
                     f"{tuple(CHUNK_ROLES)}")


def rope_table_bytes(cfg: DotsConfig, shape: MicroBatchShape) -> float:
    """The fp32 RoPE table (s x head_dim) the first whole-layer (``full``) checkpoint of a chunk
    keeps with its input (the other layers share it)."""
    return float(shape.seq_length * cfg.kv_channels * 4)


def loss_transient_bytes(cfg: DotsConfig, layout: Layout, shape: MicroBatchShape,
                         dtype_bytes: int) -> float:
    """The model-dtype logits alive beside their fp32 copy while the loss is computed (and their
    gradient in the backward); none in fp32, where the cross entropy works in place."""
    if dtype_bytes >= 4:
        return 0.0
    return float(shape.tokens * cfg.padded_vocab_size(layout.tp) / layout.tp * dtype_bytes)


def _sample_shapes(layout: Layout) -> List[MicroBatchShape]:
    """The layout's micro-batch shape and two shorter ones (same micro-batch size: at a fixed
    size every quantity is linear in the tokens, or quadratic for unfused attention)."""
    step = layout.tp if layout.sp else 1
    lengths = {layout.seq_length}
    for div in (2, 4):
        s = layout.seq_length // div // step * step
        if s >= step and s > 0:
            lengths.add(s)
    return [MicroBatchShape(layout.micro_batch_size, s) for s in sorted(lengths)]


def analytic_memory_model(cfg: DotsConfig, layout: Layout, attention: str = "flash",
                          routing_imbalance: float = 1.0) -> ActivationMemoryModel:
    """An `ActivationMemoryModel` filled with this module's bytes (both layer kinds and every
    chunk role) at the layout's micro-batch shape and shorter ones, so the `RecomputePlanner`
    plans from the model shape alone."""
    d = dtype_bytes(layout.precision)
    model = ActivationMemoryModel(attention)
    for shape in _sample_shapes(layout):
        for kind in LAYER_KINDS:
            model.add(kind, shape, {
                name: round(v) for name, v in layer_quantities(
                    cfg, layout, kind, shape, d, attention=attention,
                    routing_imbalance=routing_imbalance).items()})
        for role in CHUNK_ROLES:
            bytes_ = outside_quantities(cfg, layout, role, shape, d)
            model.add(role, shape, {OUTSIDE: round(bytes_)})
    return model


def recompute_costs(cfg: DotsConfig, layout: Layout) -> RecomputeCosts:
    """The planner's FLOP costs of recomputation, from the model shape."""
    return RecomputeCosts(
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels, ffn=cfg.ffn_hidden_size, moe_ffn=cfg.moe_ffn_hidden_size,
        shared_ffn=cfg.shared_expert_intermediate_size or 0, experts=cfg.num_moe_experts,
        topk=cfg.moe_router_topk, tp=layout.tp)


def chunk_layouts(cfg: DotsConfig, layout: Layout, pp_rank: int) -> List[ChunkLayout]:
    """The planner's view of the model chunks of `pp_rank` (layer kinds, outside role)."""
    out = []
    last_stage = layout.pp * layout.vpp - 1
    for c, layers in enumerate(layout.stage_layers(cfg, pp_rank)):
        stage = c * layout.pp + pp_rank
        kinds = tuple("dense" if n < cfg.first_k_dense else "moe" for n in layers)
        role = "+".join(r for r, on in (("pre", stage == 0), ("post", stage == last_stage)) if on)
        out.append(ChunkLayout(kinds, f"chunk:{role or 'mid'}"))
    return out


@dataclass
class ActivationMemory:
    """Activation memory of one pipeline rank (every TP / EP / DP peer on the stage alike).

    `peak_bytes` + `logits_and_loss_bytes` + `a2a_buffer_bytes` is the rank's activation peak;
    the three do not overlap."""

    pp_rank: int
    # Saved activations alive at the rank's peak (in-flight (micro-batch, chunk) passes of the
    # schedule, the recompute backward's extra), without the logits and loss counted below;
    # plus `delayed_wgrad_bytes`.
    peak_bytes: float
    # Most (micro-batch, model chunk) passes alive at once (virtual micro-batches with VPP).
    in_flight: int
    per_micro_batch_bytes: List[float]  # per chunk, one micro-batch, no recompute
    # fp32 logits softmax + loss masks of the passes alive at the peak, plus the model-dtype
    # logits alive while the loss is computed (`loss_transient_bytes`).
    logits_and_loss_bytes: float
    # One MoE layer's all-to-all send buffer (permuted local token copies, t_sp k h d) and
    # receive buffer (the copies for this rank's experts after the all-to-all and expert-TP
    # all-gather, t k h d x imbalance): the largest pair alive at once, not saved for backward;
    # twice under the all-to-all overlap schedule (one micro-batch's forward dispatch beside
    # another's backward). 0 without MoE layers.
    a2a_buffer_bytes: float
    recompute: Dict[str, int]  # layer passes per step per recompute mode
    recompute_flops: float  # forward FLOPs recomputed per step on this rank
    fits_budget: bool = True  # the planner's plan fits its budget (True without one)
    budget_bytes: Optional[float] = None
    saved_peak_bytes: float = 0.0  # what the saved-tensor counter sees at the peak
    # With --delay-wgrad-compute: one MoE layer's expert weight-gradient inputs the backward
    # leaves for `backward_dw` (output and fc1-input gradients, scaled activation: r (h + 3
    # expert FFN / TP) d for r received copies), beside that layer's saved input.
    delayed_wgrad_bytes: float = 0.0
    micro_batches: int = 0
    layer_bytes: Dict[str, float] = field(default_factory=dict)  # per kind, no recompute
    # Per chunk: the layer modes every micro-batch runs, and the bytes it then keeps.
    chunk_modes: List[List[str]] = field(default_factory=list)
    chunk_live_bytes: List[float] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return asdict(self)


def _peak(events: List[Event], live, transient, logits) -> Tuple[float, float]:
    """(peak of live bytes + a backward's transient, logits bytes alive at that peak)."""
    total = logit = peak = at_peak = 0.0
    for kind, mb, chunk in events:
        if kind == "F":
            total += live[chunk]
            logit += logits[chunk]
            if total > peak:
                peak, at_peak = total, logit
        else:
            if total + transient[chunk] > peak:
                peak, at_peak = total + transient[chunk], logit
            total -= live[chunk]
            logit -= logits[chunk]
    return peak, at_peak


def _chunk_bytes(cfg, layout, chunk: ChunkLayout, shape, d, attention, imbalance) -> float:
    """One micro-batch of a chunk without recompute, from the exact quantities."""
    total = outside_quantities(cfg, layout, chunk.role, shape, d)
    for kind in chunk.layer_kinds:
        q = layer_quantities(cfg, layout, kind, shape, d, attention=attention,
                             routing_imbalance=imbalance)
        total += q["rest"] + q["attn_core"] + q["mlp"]
    return total


def rank_activation_memory(cfg: DotsConfig, layout: Layout, pp_rank: int,
                           activation_budget_bytes: Optional[float] = None,
                           attention: str = "flash", routing_imbalance: float = 1.0,
                           margin: float = 0.05) -> ActivationMemory:
    """Activation memory of pipeline rank `pp_rank` over one step of `layout`.

    Without a budget nothing recomputes (`pretrain` without --dots-recompute-budget-gb). With
    `activation_budget_bytes` (what the controller gets: the budget less this rank's static
    bytes) the `RecomputePlanner` plans on the analytic model with this rank's schedule order
    and `margin` (--dots-recompute-margin), restricted under the all-to-all overlap schedule
    to the modes its layer nodes honour; the reported bytes are without the margin. A budget
    of zero or less fits nothing (the plan with the most recompute is reported)."""
    if not 0 <= pp_rank < layout.pp:
        raise ValueError(f"pp_rank {pp_rank} outside the pipeline of size {layout.pp}")
    d = dtype_bytes(layout.precision)
    shape = MicroBatchShape(layout.micro_batch_size, layout.seq_length)
    chunks = chunk_layouts(cfg, layout, pp_rank)
    m = layout.num_micro_batches
    # Equal shapes: the peak and each pass's plan are those of a capped schedule (its steady
    # state is reached); FLOPs and recompute counts scale with the real count.
    m_eff = max(1, min(m, layout.pp * (layout.vpp + 3)))
    events = schedule_events(m_eff, layout.pp, pp_rank, layout.vpp if layout.vpp > 1 else None,
                             overlap=layout.a2a_overlap)
    post = [c.role.endswith("post") for c in chunks]
    logits = [outside_quantities(cfg, layout, "logits", shape, d)
              + outside_quantities(cfg, layout, "loss", shape, d) if p else 0.0 for p in post]
    no_recompute = [_chunk_bytes(cfg, layout, c, shape, d, attention, routing_imbalance)
                    for c in chunks]
    if activation_budget_bytes is None:
        modes = [("none",) * len(c.layer_kinds) for c in chunks]
        live, transient = list(no_recompute), [0.0] * len(chunks)
        flops, fits = 0.0, True
    else:
        model = analytic_memory_model(cfg, layout, attention, routing_imbalance)
        planner = RecomputePlanner(
            model, recompute_costs(cfg, layout), chunks, max(activation_budget_bytes, 1.0),
            margin=margin, allowed_modes=NODE_PATH_MODES if layout.a2a_overlap else None)
        plan = planner.plan_step([shape] * m_eff, events)
        row: Tuple[ItemPlan, ...] = plan.items[0]  # equal shapes: every micro-batch alike
        modes = [item.modes for item in row]
        live = [item.live_bytes / (1.0 + margin)
                + (rope_table_bytes(cfg, shape) if "full" in item.modes else 0.0)
                for item in row]
        transient = [item.transient_bytes / (1.0 + margin) for item in row]
        flops = sum(item.recompute_flops for item in row) * m
        fits = plan.fits and activation_budget_bytes > 0
    saved_peak, logits_at_peak = _peak(events, live, transient, logits)
    a2a = wgrad = 0.0
    if any(k == "moe" for c in chunks for k in c.layer_kinds):
        x = _Dims.of(layout, cfg, shape, d)
        k = cfg.moe_router_topk
        received = x.t * k * routing_imbalance
        a2a = (x.t_sp * k + received) * x.h * d
        a2a *= 2 if layout.a2a_overlap else 1
        if layout.delay_wgrad:
            wgrad = received * (x.h + 3 * cfg.moe_ffn_hidden_size / layout.tp) * d
    counts = Counter(mode for row_modes in modes for mode in row_modes)
    return ActivationMemory(
        pp_rank=pp_rank,
        peak_bytes=saved_peak - logits_at_peak + wgrad,
        in_flight=max_in_flight(events),
        per_micro_batch_bytes=no_recompute,
        logits_and_loss_bytes=logits_at_peak + (
            loss_transient_bytes(cfg, layout, shape, d) if any(post) else 0.0),
        a2a_buffer_bytes=a2a,
        recompute={mode: n * m for mode, n in sorted(counts.items())},
        recompute_flops=flops,
        fits_budget=fits,
        budget_bytes=activation_budget_bytes,
        saved_peak_bytes=saved_peak,
        delayed_wgrad_bytes=wgrad,
        micro_batches=m,
        chunk_modes=[list(row_modes) for row_modes in modes],
        chunk_live_bytes=list(live),
        layer_bytes={kind: sum(layer_quantities(
            cfg, layout, kind, shape, d, attention=attention,
            routing_imbalance=routing_imbalance)[q] for q in ("rest", "attn_core", "mlp"))
            for kind in LAYER_KINDS},
    )
