"""Predicted step time of a layout: per-op roofline times fed to the schedule simulator, plus
what the simulator leaves out.

**Op times** (`op_times`, ms per layer per micro-batch on one GPU). Every kernel costs
`max(FLOPs / (peak x efficiency), bytes / (HBM x hbm_efficiency))` (`roofline_s`); an op is
the sum of its kernels and of its blocking collectives. T = micro-batch x sequence tokens of
one data-parallel rank; TP splits every GEMM; with sequence parallelism (SP) the norms and
element-wise kernels see T / TP tokens and each TP block all-gathers its input and
reduce-scatters its output (T x hidden x 2 B x (TP-1)/TP each, over NVLink when TP fits in a
node; 1.5x that in the backward: the wgrad all-gathers the input again).

* attention: RMSNorm, QKV GEMM, q/k-norm + RoPE, causal core attention (2 x b x s^2 x heads x
  head_dim FLOPs, half of the full s^2, at `attention_efficiency`), output GEMM, residual +
  pre-MLP norm, and for a MoE layer the router GEMM + scoring (fp32 operands, counted at the
  GEMM rate); backward: GEMMs 2x, core attention 2.5x (flash backward: 5 matmuls vs 2).
* experts: each GPU runs T x top-k token-expert pairs (its TP group's, after Megatron-Core's
  all-to-all + TP all-gather), on E / EP local experts of width ffn / TP, so m = T x top-k x
  EP / E tokens per expert; the grouped GEMM reaches `Hardware.grouped_gemm_efficiency x
  m / (m + grouped_gemm_half_tokens)` of the peak; plus the permutations and SwiGLU (memory
  bound). dgrad and wgrad each cost the forward's GEMMs. With `routing_imbalance` r the
  busiest EP rank gets r x the even share of pairs and of all-to-all bytes, and sets the pace.
* dispatch / combine: (T / TP) x top-k x hidden x 2 B per GPU through the all-to-all, of which
  the share for EP peers on the same node goes over NVLink and the rest over the scale-out
  network (EP ranks sit TP apart, Megatron-Core's tp-ep-dp-pp order), at `a2a_efficiency`;
  with TP > 1 also the TP all-gather (dispatch) / reduce-scatter (combine) of the received
  tokens.
* shared: the shared-expert SwiGLU MLP (a TP MLP with its own SP collectives).
* p2p: one SP shard of the activations (b x s x hidden / TP x 2 B) between stages, over the
  scale-out network when a pipeline stage fills whole nodes (gpus / PP >= gpus per node).

**Step** (`predict_step`) = simulated MoE layers + dense-and-outside + exposed DP grad sync +
optimizer:

* The simulator runs every layer as a MoE layer. The first (dense) layer replaces one MoE
  layer on its rank (difference: dense MLP minus that layer's experts + shared + its exposed
  all-to-all), the embedding is on pipeline rank 0 and the output layer + cross-entropy on the
  last rank. Each rank r gets `extra_r` per micro-batch; a pipeline runs at its slowest stage,
  so the step grows by `max_r(extra_r) x micro-batches` (all of it on one rank when PP = 1).
* Long steps are simulated at a few micro-batches and extrapolated: the schedules are linear in
  the micro-batch count once it reaches 2 x PP (two points, `_sim_points`).
* DP grad sync: fp32 gradients reduce-scattered (all-reduced without the distributed
  optimizer) and bf16 parameters all-gathered, dense parameters over DP and expert parameters
  over expert-DP, ring cost `bytes x (n-1)/n` at `collective_efficiency`, over the scale-out
  network when a pipeline stage spans nodes. With `overlap_grad_sync` (the
  `--overlap-grad-reduce --overlap-param-gather` of every real run) the reduce-scatter runs
  under the last micro-batch's backward and the all-gather under the first micro-batch's
  forward of the rank's layers: exposed = max(one bucket's time, total - that window) each,
  buckets of max(40M, 1M x DP) parameters (Megatron-Core's default). Without it: all of it.
  The slowest rank counts.
* recompute: `recompute_flops_per_rank` (extra forward FLOPs per step on one rank) at the GEMM
  rate, spread over the rank's layer backward passes inside the simulation (so the pipeline
  and the all-to-all overlap see it); `recompute_s` reports its compute time.
* optimizer: Adam reads and writes the rank's fp32 state (params, m, v: 12 B per parameter)
  and reads the gradient and writes the bf16 parameter, and the grad-norm reads the gradient:
  34 B of traffic per 12 B of state, at `hbm_efficiency`. Given `optimizer_state_bytes` is used
  as is; None estimates it from the rank's parameters (sharded over (expert-)DP with the
  distributed optimizer).

MFU = model FLOPs (`model_flops_per_token`: 6 x matmul-active parameters + causal attention,
no recompute) x tokens per step / (GPUs x bf16 peak x step time).

External anchor (tests/test_plan_step_time.py): the dots.llm1 report's 130K H800 GPU hours per
trillion tokens; with its published setup (interleaved 1F1B + all-to-all overlap, expert TP 1
with 8 or 4 experts per GPU, 8K sequences, 64M-token batches) and assumed H800 nodes, 512 GPUs,
TP 1, PP 2 x VPP 31, this predicts 67K (EP 16) and 91K (EP 32): 1.4-2x optimistic. The same
report's dense Qwen2.5-72B (340K) is predicted at 275-367K. What the roofline leaves out is
MoE-specific: expert load imbalance, communication kernels slowing overlapped compute,
dispatcher host syncs.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config import DotsConfig
from ..schedule.simulator import OpTimes, SimResult, simulate
from .hardware import Hardware
from .layout import Layout
from .static_memory import rank_static_memory

ADAM_TRAFFIC_PER_STATE_BYTE = 34 / 12  # see module docstring
GRAD_BYTES = 4  # Megatron-Core reduces gradients in fp32 (grad_reduce_in_fp32)
STATE_BYTES_PER_PARAM = 12  # fp32 main parameter + Adam m + v
BUCKET_MIN_ELEMENTS = 40_000_000  # Megatron-Core's default DDP bucket: max(40M, 1M x DP)
SIM_MIN_MICRO_BATCHES = 8
ATTENTION_BWD_FLOPS = 2.5  # flash attention backward / forward FLOPs
TP_BWD_COLLECTIVES = 1.5  # backward SP collectives per forward one (wgrad re-gathers inputs)


def roofline_s(flops: float, nbytes: float, hw: Hardware, efficiency: float,
               peak_scale: float = 1.0) -> float:
    """One kernel: max(compute time at `efficiency` of the peak, HBM time)."""
    compute = flops / (hw.peak_tflops * 1e12 * peak_scale * efficiency)
    memory = nbytes / (hw.hbm_gbps * 1e9 * hw.hbm_efficiency)
    return max(compute, memory)


def grouped_gemm_efficiency(hw: Hardware, tokens_per_expert: float) -> float:
    """The grouped GEMM's fraction of the peak with m tokens per expert (module docstring)."""
    m = max(tokens_per_expert, 0.0)
    return hw.grouped_gemm_efficiency * m / (m + hw.grouped_gemm_half_tokens)


# ----------------------------------------------------------------------- the roofline
class _Costs:
    """Per-GPU kernel and communication costs of one layout, in seconds."""

    def __init__(self, cfg: DotsConfig, layout: Layout, hw: Hardware,
                 routing_imbalance: float = 1.0):
        self.cfg, self.layout, self.hw = cfg, layout, hw
        self.imbalance = routing_imbalance  # busiest EP rank's tokens / an even split
        self.tp, self.sp = layout.tp, layout.sp
        self.a = 4 if layout.precision == "fp32" else 2  # bytes per activation element
        self.peak_scale = 0.5 if layout.precision == "fp32" else 1.0  # fp32 runs as TF32
        self.b, self.s = layout.micro_batch_size, layout.seq_length
        self.T = self.b * self.s  # tokens of one micro-batch of one DP rank
        self.L = self.T / self.tp if self.sp else self.T  # tokens on one GPU (SP shards them)
        self.h = cfg.hidden_size
        self.q = cfg.num_attention_heads * cfg.kv_channels
        self.kv = cfg.num_query_groups * cfg.kv_channels

    # -------------------------------------------------------------- kernel prices
    def gemm(self, flops, nbytes):
        return roofline_s(flops, nbytes, self.hw, self.hw.gemm_efficiency, self.peak_scale)

    def grouped(self, flops, nbytes, tokens_per_expert):
        eff = grouped_gemm_efficiency(self.hw, tokens_per_expert)
        return roofline_s(flops, nbytes, self.hw, eff, self.peak_scale)

    def core_attention(self, flops, nbytes):
        return roofline_s(flops, nbytes, self.hw, self.hw.attention_efficiency, self.peak_scale)

    def memory(self, nbytes):
        return nbytes / (self.hw.hbm_gbps * 1e9 * self.hw.hbm_efficiency)

    def link_gbps(self, spans_nodes: bool) -> float:
        return self.hw.inter_node_gbps if spans_nodes else self.hw.intra_node_gbps

    def tp_collective(self, full_bytes):
        """All-gather or reduce-scatter of a tensor of `full_bytes` over the TP group."""
        if self.tp == 1:
            return 0.0
        bw = self.link_gbps(self.tp > self.hw.gpus_per_node)
        return full_bytes * (self.tp - 1) / self.tp / (bw * 1e9 * self.hw.collective_efficiency)

    def tp_block_collectives(self, full_bytes):
        """A TP block's forward collectives: SP all-gather + reduce-scatter (or one all-reduce
        = the same bytes without SP)."""
        return 2 * self.tp_collective(full_bytes)

    def all_to_all(self, nbytes):
        """All-to-all of `nbytes` per GPU over the EP group (balanced routing)."""
        ep, hw = self.layout.ep, self.hw
        if ep == 1:
            return 0.0
        local = 1 if self.tp > hw.gpus_per_node else min(ep, max(1, hw.gpus_per_node // self.tp))
        intra = nbytes * (local - 1) / ep / (hw.intra_node_gbps * 1e9)
        inter = nbytes * (ep - local) / ep / (hw.inter_node_gbps * 1e9)
        return max(intra, inter) / hw.a2a_efficiency

    # ---------------------------------------------------------------------- ops
    def attention(self, moe: bool) -> Tuple[float, float]:
        """(forward, backward) seconds of the attention block (+ router for a MoE layer)."""
        h, q, kv, T, L, a, tp = self.h, self.q, self.kv, self.T, self.L, self.a, self.tp
        qkv = q + 2 * kv
        gemms = (self.gemm(2 * T * h * qkv / tp, a * (T * h + h * qkv / tp + T * qkv / tp))
                 + self.gemm(2 * T * q * h / tp, a * (T * q / tp + q * h / tp + T * h)))
        core_flops = 2 * self.b * self.s * self.s * q / tp
        core_bytes = a * T * (2 * q + 2 * kv) / tp
        mem = (2 * L * h * a  # input RMSNorm
               + 2 * 2 * a * T * (q + kv) / tp  # q/k RMSNorm + RoPE: two passes over q and k
               + 5 * L * h * a)  # residual add + pre-MLP RMSNorm
        comm = self.tp_block_collectives(T * h * a)
        fwd = gemms + self.core_attention(core_flops, core_bytes) + self.memory(mem) + comm
        bwd = (2 * gemms + self.core_attention(ATTENTION_BWD_FLOPS * core_flops, 2 * core_bytes)
               + self.memory(2 * mem) + TP_BWD_COLLECTIVES * comm)
        if moe:
            E = self.cfg.num_moe_experts
            router = (self.gemm(2 * L * h * E, 4 * (L * h + E * h + L * E))
                      + self.memory(4 * 4 * L * E))  # sigmoid, bias, top-k, normalise (fp32)
            fwd += router
            bwd += 2 * router
        return fwd, bwd

    def mlp(self, ffn: int) -> Tuple[float, float]:
        """(forward, backward) of a TP SwiGLU MLP of width `ffn` on the micro-batch."""
        h, T, L, a, tp = self.h, self.T, self.L, self.a, self.tp
        f = ffn / tp
        gemms = (self.gemm(2 * T * h * 2 * f, a * (T * h + h * 2 * f + T * 2 * f))
                 + self.gemm(2 * T * f * h, a * (T * f + f * h + T * h)))
        mem = a * T * 3 * f + 3 * L * h * a  # SwiGLU; the residual (or routed-output) add
        comm = self.tp_block_collectives(T * h * a)
        return (gemms + self.memory(mem) + comm,
                2 * gemms + self.memory(2 * mem) + TP_BWD_COLLECTIVES * comm)

    def routed_experts(self) -> Tuple[float, float, float]:
        """(forward, dgrad, wgrad) seconds of the routed experts."""
        cfg, h, L, a, tp = self.cfg, self.h, self.L, self.a, self.tp
        k, E, ep = cfg.moe_router_topk, cfg.num_moe_experts, self.layout.ep
        pairs = self.T * k * self.imbalance  # token-expert pairs on the busiest GPU
        m = pairs * ep / E
        local = E / ep
        f = cfg.moe_ffn_hidden_size / tp
        gemms = (self.grouped(2 * pairs * h * 2 * f, a * (pairs * h + local * h * 2 * f
                                                          + pairs * 2 * f), m)
                 + self.grouped(2 * pairs * f * h, a * (pairs * f + local * f * h + pairs * h), m))
        mem = (2 * a * L * h * (1 + k)  # permute before dispatch + unpermute after combine
               + 2 * 2 * a * pairs * h  # sort received tokens by expert, and back
               + a * pairs * 3 * f)  # SwiGLU
        fwd = gemms + self.memory(mem)
        return fwd, gemms + self.memory(mem), gemms

    def dispatch(self) -> float:
        """One all-to-all of the routed tokens (dispatch; combine costs the same)."""
        routed = self.cfg.moe_router_topk * self.h * self.a * self.imbalance  # busiest receiver
        return self.all_to_all(self.L * routed) + self.tp_collective(self.T * routed)

    def p2p(self) -> float:
        layout = self.layout
        if layout.pp == 1:
            return 0.0
        nbytes = self.L * self.h * self.a
        bw = self.link_gbps(layout.gpus // layout.pp >= self.hw.gpus_per_node)
        return nbytes / (bw * 1e9 * self.hw.collective_efficiency)

    def embedding(self) -> float:
        """Forward + backward of the vocab-parallel input embedding."""
        T, h, a = self.T, self.h, self.a
        fwd = self.memory(2 * T * h * a) + self.tp_collective(T * h * a)
        bwd = self.memory(T * h * (a + 4 + 4)) + self.tp_collective(T * h * a)
        return fwd + bwd

    def output_and_loss(self) -> float:
        """Forward + backward of the final norm, output layer and vocab-parallel cross-entropy."""
        T, L, h, a, tp = self.T, self.L, self.h, self.a, self.tp
        V = self.cfg.padded_vocab_size(tp) / tp
        gemm = self.gemm(2 * T * h * V, a * (T * h + V * h + T * V))
        fwd = (self.memory(2 * L * h * a) + self.tp_collective(T * h * a) + gemm
               + self.memory(16 * T * V))  # logits to fp32, max, exp, sum: ~4 fp32 passes
        bwd = (self.memory(4 * L * h * a) + self.tp_collective(T * h * a) + 2 * gemm
               + self.memory(8 * T * V))  # softmax - one-hot, back to 16 bit
        return fwd + bwd


def _ms(seconds: float) -> float:
    return seconds * 1e3


def _is_dense(cfg: DotsConfig) -> bool:
    return cfg.first_k_dense >= cfg.num_layers


def op_times(cfg: DotsConfig, layout: Layout, hw: Hardware,
             routing_imbalance: float = 1.0) -> OpTimes:
    """Per-layer per-micro-batch op times (ms) of a MoE layer of `cfg` under `layout` on `hw`
    (of the dense layer when every layer is dense: its MLP as `experts`, no all-to-all).
    `routing_imbalance`: tokens the busiest expert-parallel rank receives relative to an even
    split; its routed experts and all-to-all set the pace of every EP rank."""
    if not routing_imbalance >= 1.0:
        raise ValueError(f"routing_imbalance must be >= 1 (the busiest rank against an even "
                         f"split), got {routing_imbalance}")
    c = _Costs(cfg, layout, hw, routing_imbalance)
    p2p = _ms(c.p2p())
    if _is_dense(cfg):
        att_f, att_b = c.attention(moe=False)
        mlp_f, mlp_b = c.mlp(cfg.ffn_hidden_size)
        return OpTimes(attention=_ms(att_f), attention_bwd=_ms(att_b), dispatch=0.0, combine=0.0,
                       experts=_ms(mlp_f), experts_dgrad=_ms(mlp_b / 2),
                       experts_wgrad=_ms(mlp_b / 2), shared=0.0, shared_bwd=0.0, p2p=p2p)
    att_f, att_b = c.attention(moe=True)
    exp_f, exp_d, exp_w = c.routed_experts()
    if cfg.shared_expert_intermediate_size:
        sh_f, sh_b = c.mlp(cfg.shared_expert_intermediate_size)
    else:  # still the residual add of the MoE output
        sh_f = c.memory(3 * c.L * c.h * c.a)
        sh_b = 2 * sh_f
    a2a = _ms(c.dispatch()) if layout.ep > 1 else 0.0
    return OpTimes(attention=_ms(att_f), attention_bwd=_ms(att_b), dispatch=a2a, combine=a2a,
                   experts=_ms(exp_f), experts_dgrad=_ms(exp_d), experts_wgrad=_ms(exp_w),
                   shared=_ms(sh_f), shared_bwd=_ms(sh_b), p2p=p2p)


def model_flops_per_token(cfg: DotsConfig, seq_length: int) -> float:
    """Forward + backward model FLOPs per token: 6 x the active parameters that multiply
    (all active parameters but the input embedding, a lookup; the output layer counts) plus
    causal attention, 6 x seq x heads x head_dim per layer (half of the full s^2). No
    recompute."""
    _, active = cfg.num_parameters()
    matmul = active - cfg.vocab_size * cfg.hidden_size
    attention = 6 * seq_length * cfg.num_attention_heads * cfg.kv_channels * cfg.num_layers
    return 6.0 * matmul + attention


# ----------------------------------------------------------------------- prediction
@dataclass
class StepPrediction:
    """One layout's predicted step (seconds unless named otherwise); see module docstring."""

    step_time_s: float
    moe_layers_s: float  # the simulated schedule, extrapolated to the step's micro-batches
    sim: SimResult = field(repr=False)  # at `sim_micro_batches` micro-batches
    sim_micro_batches: int
    bubble: float  # mean idle share of the compute stream in the simulated schedule
    exposed_a2a_s: float  # mean over pipeline ranks
    dense_and_outside_s: float
    stage_extra_s: List[float]  # per pipeline rank and micro-batch, before taking the max
    dp_grad_sync_s: float  # exposed
    dp_grad_sync_total_s: float  # on the slowest rank, before overlap
    recompute_s: float
    optimizer_s: float
    mfu: float
    tokens_per_s_per_gpu: float
    gpu_hours_per_trillion_tokens: float
    model_flops_per_token: float
    op_times: OpTimes = field(repr=False)
    hardware: str = ""

    def to_dict(self) -> Dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("sim", "op_times")}
        out["op_times_ms"] = asdict(self.op_times)
        out["schedule"] = self.sim.schedule
        return out

    def draw_timeline(self, png: str) -> str:
        """The simulated schedule as a PNG (`megatron-dots simulate-schedule`'s drawing)."""
        from ..schedule.simulate_cli import draw

        return draw([self.sim], png)


def _sim_points(micro_batches: int, pp: int) -> List[int]:
    """Micro-batch counts to simulate: all of them when few, else two multiples of PP from
    2 x PP up (beyond the warmup the step is linear in the micro-batches)."""
    low = math.ceil(max(SIM_MIN_MICRO_BATCHES, 2 * pp) / pp) * pp
    return [micro_batches] if micro_batches <= low + pp else [low, low + pp]


def _simulate(layout: Layout, times: OpTimes, layers_per_chunk: int):
    """(SimResult at the largest simulated count, step ms, per-rank compute ms, per-rank
    exposed a2a ms, per-rank a2a ms) for the layout's micro-batches."""
    M = layout.num_micro_batches
    points = _sim_points(M, layout.pp)

    def run(schedule, m):
        return simulate(schedule, times, pp=layout.pp, vpp=layout.vpp if layout.vpp > 1 else None,
                        ep=layout.ep, micro_batches=m, layers_per_chunk=layers_per_chunk,
                        delay_wgrad=layout.delay_wgrad)

    runs = [run(layout.schedule, m) for m in points]
    last = runs[-1]
    if len(runs) == 1:
        return last, last.step_ms, last.compute_ms, last.exposed_a2a_ms, last.a2a_ms
    first = runs[0]
    span = points[1] - points[0]

    def extend(a, b):
        return b + (b - a) / span * (M - points[1])

    step = extend(first.step_ms, last.step_ms)
    per_rank = [[extend(x, y) for x, y in zip(getattr(first, name), getattr(last, name))]
                for name in ("compute_ms", "exposed_a2a_ms", "a2a_ms")]
    return (last, step, *per_rank)


def _grad_sync(c: _Costs, dense: float, expert: float, window_bwd: float,
               window_fwd: float, overlap: bool) -> Tuple[float, float]:
    """(exposed, total) seconds of one rank's data-parallel gradient / parameter sync."""
    layout, hw = c.layout, c.hw
    bw = c.link_gbps(layout.gpus // layout.pp > hw.gpus_per_node) * 1e9 * hw.collective_efficiency

    def ring(params, n, nbytes):
        return params * nbytes * (n - 1) / n / bw if n > 1 else 0.0

    groups = ((dense, layout.dp), (expert, layout.expert_dp))
    if layout.distributed_optimizer:
        rs = sum(ring(p, n, GRAD_BYTES) for p, n in groups)
        ag = sum(ring(p, n, c.a) for p, n in groups)
    else:
        rs, ag = sum(2 * ring(p, n, GRAD_BYTES) for p, n in groups), 0.0
    total = rs + ag
    if not overlap:
        return total, total
    bucket = max(BUCKET_MIN_ELEMENTS, 1_000_000 * layout.dp)
    share = min(1.0, bucket / max(dense + expert, 1.0))  # one bucket's share of the traffic
    exposed = max(share * rs, rs - window_bwd) + max(share * ag, ag - window_fwd)
    return exposed, total


def predict_step(cfg: DotsConfig, layout: Layout, hw: Hardware,
                 recompute_flops_per_rank: float = 0.0,
                 optimizer_state_bytes: Optional[int] = None,
                 overlap_grad_sync: bool = True,
                 routing_imbalance: float = 1.0) -> StepPrediction:
    """Predicted step time of `layout` on `hw` (module docstring). `recompute_flops_per_rank`:
    extra forward FLOPs one GPU recomputes per step; `optimizer_state_bytes`: one GPU's
    optimizer state (None: estimated); `overlap_grad_sync`: --overlap-grad-reduce and
    --overlap-param-gather; `routing_imbalance`: see `op_times`."""
    layout.check(cfg)
    if recompute_flops_per_rank < 0:
        raise ValueError(f"recompute_flops_per_rank must be >= 0, got {recompute_flops_per_rank}")
    if optimizer_state_bytes is not None and optimizer_state_bytes < 0:
        raise ValueError(f"optimizer_state_bytes must be >= 0, got {optimizer_state_bytes}")
    c = _Costs(cfg, layout, hw, routing_imbalance)
    M, pp, vpp = layout.num_micro_batches, layout.pp, layout.vpp
    lpc = layout.layers_per_chunk(cfg)
    times = op_times(cfg, layout, hw, routing_imbalance)
    recompute_s = recompute_flops_per_rank / (hw.peak_tflops * 1e12 * c.peak_scale
                                              * hw.gemm_efficiency)
    sim_times = times
    if recompute_s:  # recomputed forwards run at the start of each layer's backward
        sim_times = OpTimes(**{**asdict(times), "attention_bwd": times.attention_bwd
                               + _ms(recompute_s) / (M * vpp * lpc)})
    sim, step_ms, compute_ms, exposed_ms, a2a_ms = _simulate(layout, sim_times, lpc)

    # dense layers in place of simulated MoE layers, embedding, output layer + loss
    extra = [0.0] * pp
    if not _is_dense(cfg):
        att_dense = sum(c.attention(moe=False))
        dense_layer = att_dense + sum(c.mlp(cfg.ffn_hidden_size))
        moe_compute = times.layer_compute() / 1e3
        for r in range(pp):
            exposed_share = exposed_ms[r] / a2a_ms[r] if a2a_ms[r] else 0.0
            moe_layer = moe_compute + times.layer_a2a() / 1e3 * exposed_share
            dense_here = sum(1 for chunk in layout.stage_layers(cfg, r) for layer in chunk
                             if layer < cfg.first_k_dense)
            extra[r] += dense_here * (dense_layer - moe_layer)
    extra[0] += c.embedding()
    extra[pp - 1] += c.output_and_loss()
    dense_and_outside = max(0.0, max(extra)) * M

    # data-parallel sync and optimizer, slowest rank
    per_layer_f = (times.attention + times.experts + times.shared) / 1e3
    per_layer_b = (times.attention_bwd + times.experts_dgrad + times.experts_wgrad
                   + times.shared_bwd) / 1e3
    sync, sync_total, opt = 0.0, 0.0, 0.0
    for r in range(pp):
        held = rank_static_memory(cfg, layout, r)
        dense, expert = held.parameters - held.expert_parameters, held.expert_parameters
        exposed, total = _grad_sync(c, dense, expert, vpp * lpc * per_layer_b,
                                    vpp * lpc * per_layer_f, overlap_grad_sync)
        sync, sync_total = max(sync, exposed), max(sync_total, total)
        if optimizer_state_bytes is None:
            params = (dense / layout.dp + expert / layout.expert_dp
                      if layout.distributed_optimizer else dense + expert)
            state = STATE_BYTES_PER_PARAM * params
        else:
            state = optimizer_state_bytes
        opt = max(opt, c.memory(ADAM_TRAFFIC_PER_STATE_BYTE * state))

    step = step_ms / 1e3 + dense_and_outside + sync + opt
    tokens = layout.tokens_per_step
    flops_per_token = model_flops_per_token(cfg, layout.seq_length)
    tokens_per_s_per_gpu = tokens / step / layout.gpus
    return StepPrediction(
        step_time_s=step, moe_layers_s=step_ms / 1e3, sim=sim,
        sim_micro_batches=_sim_points(M, pp)[-1],
        bubble=sum(1.0 - x / step_ms for x in compute_ms) / pp,
        exposed_a2a_s=sum(exposed_ms) / pp / 1e3,
        dense_and_outside_s=dense_and_outside, stage_extra_s=extra,
        dp_grad_sync_s=sync, dp_grad_sync_total_s=sync_total, recompute_s=recompute_s,
        optimizer_s=opt,
        mfu=flops_per_token * tokens / (layout.gpus * hw.peak_tflops * 1e12 * step),
        tokens_per_s_per_gpu=tokens_per_s_per_gpu,
        gpu_hours_per_trillion_tokens=1e12 / tokens_per_s_per_gpu / 3600,
        model_flops_per_token=flops_per_token, op_times=times, hardware=hw.name)
