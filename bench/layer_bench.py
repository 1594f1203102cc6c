"""One dots MoE decoder layer and its MoE block, side by side, on one device (forward + backward).

Cases (all in one process, same shapes, same dtype):

* ``ours-layer`` / ``ours-moe``: our TE-free fast path (``--dots-expert-backend grouped``:
  `TorchGroupedExperts`, `SDPACoreAttention`, `DotsRMSNorm`), a Megatron-Core TransformerLayer;
* ``mcore-layer`` / ``mcore-moe``: Megatron-Core's local spec (``sequential``: `SequentialMLP`,
  unfused `DotProductAttention`), built from the same seed, so the weights are identical to ours;
* ``te-layer`` / ``te-moe``: Megatron-Core's Transformer Engine modules (only where TE exists);
* ``hf-layer`` / ``hf-moe``: transformers' `Dots1DecoderLayer` / `Dots1MoE` (sdpa attention,
  ``--hf-experts`` experts implementation, grouped_mm by default);
* ``experts-balanced``: our grouped experts on perfectly balanced, already permuted tokens plus
  the shared experts (router and permutation excluded): what the MoE block could cost;
* ``matmul``: a bf16 ``--matmul-size``^3 matmul, the device's measured GEMM ceiling;
* ``train-step``: a whole training step of ``--train-model`` (default dots-mini: forward,
  backward, gradient finalisation, Adam) on ``--train-micro-batches`` x ``--seq`` tokens, with
  model FLOP utilisation against ``--peak-tflops`` and against the measured ``matmul`` ceiling.

For every case the report gives ms per forward+backward (mean over ``--iters`` after
``--warmup``), TFLOP/s of the model FLOPs (forward x 3, causal attention counted half), tokens/s
the peak memory above what was allocated before the case ran (``torch.cuda`` statistics; null on
CPU) and, for the layer / MoE cases, the bytes autograd saves for backward in one forward
(parameters excluded; counted by saved-tensor hooks, so also on CPU). ``ours-*`` are also checked against ``mcore-*``: the largest output difference and
whether the router chose exactly the same experts for every token.

GPU (one H100; the dots.llm1 layer of arXiv 2506.05767, 2 x 4096 tokens, bf16):

    python bench/layer_bench.py --markdown

CPU smoke check (dots-tiny, fp32, seconds):

    python bench/layer_bench.py --model dots-tiny --batch 2 --seq 64 --iters 2 --warmup 1 \\
        --matmul-size 512 --train-model dots-tiny --train-micro-batches 2 \\
        --out /tmp/layer_bench.json

``--profile DIR`` also writes a torch.profiler trace of three ``ours-*`` steps per part
(``DIR/ours-layer.json``, ``DIR/ours-moe.json``, for chrome://tracing or Perfetto) and prints the
most expensive operators: where the router, permutation and grouped GEMMs spend their time.
"""

import argparse
import os
import sys
import time
import types
from typing import Callable, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build, free_memory, host_info, sync, write_report  # noqa: E402

CASES = ("matmul", "ours-layer", "ours-moe", "mcore-layer", "mcore-moe", "te-layer", "te-moe",
         "hf-layer", "hf-moe", "experts-balanced", "train-step")
GIB = float(1 << 30)


# -- FLOPs ------------------------------------------------------------------------------------
def attention_flops(dc, b: int, s: int) -> float:
    """Forward FLOPs of one attention block: projections + causal core (half the s x s)."""
    h, heads, groups, d = dc.hidden_size, dc.num_attention_heads, dc.num_query_groups, dc.kv_channels
    tokens = b * s
    proj = 2 * tokens * h * (heads + 2 * groups) * d + 2 * tokens * heads * d * h
    core = 2 * 2 * b * heads * s * s * d / 2
    return proj + core


def moe_flops(dc, tokens: int) -> float:
    """Forward FLOPs of one MoE block: router, top-k routed SwiGLU experts, shared experts."""
    h = dc.hidden_size
    router = 2 * tokens * h * dc.num_moe_experts
    routed = tokens * dc.moe_router_topk * 6 * h * dc.moe_ffn_hidden_size
    shared = 6 * tokens * h * dc.shared_expert_intermediate_size
    return router + routed + shared


def model_flops(dc, b: int, s: int) -> float:
    """Forward FLOPs of the whole model on b x s tokens (embedding lookups are free)."""
    tokens = b * s
    dense = 6 * tokens * dc.hidden_size * dc.ffn_hidden_size
    layers = dc.num_layers * attention_flops(dc, b, s)
    layers += dc.first_k_dense * dense + (dc.num_layers - dc.first_k_dense) * moe_flops(dc, tokens)
    return layers + 2 * tokens * dc.hidden_size * dc.vocab_size


# -- timing -----------------------------------------------------------------------------------
def time_case(step: Callable[[], None], args, device) -> Dict[str, Optional[float]]:
    """Mean ms per call of `step` and the peak memory it adds."""
    for _ in range(args.warmup):
        step()
    sync(device)
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    ms = (time.perf_counter() - start) * 1e3 / args.iters
    peak = None if base is None else (torch.cuda.max_memory_allocated(device) - base) / GIB
    return {"ms": ms, "peak_gib": peak}


def fwd_bwd(module_call, inputs, params, grad_seed=0):
    """(step, saved bytes): a step runs forward `module_call(*inputs)` and backward a fixed
    random gradient; saved bytes are what autograd keeps for backward after one forward
    (parameters excluded; device independent, so comparable on CPU too)."""
    from megatron_dots.recompute.measure import SavedBytes

    counter = SavedBytes(params)
    with counter.counting():
        out = module_call(*inputs)
    saved = counter.total()
    gen = torch.Generator(device=inputs[0].device).manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    del out

    def step():
        for t in inputs:
            t.grad = None
        module_call(*inputs).backward(grad)

    return step, saved


# -- models -----------------------------------------------------------------------------------
def layer_dots_config(args):
    from megatron_dots.config import DotsConfig

    # layer 0 dense, layer 1 the MoE layer we time; a small vocabulary (no embedding cost)
    overrides = {"num_moe_experts": args.num_experts} if args.num_experts else {}
    return DotsConfig.preset(args.model, num_layers=2, first_k_dense=1, vocab_size=1024,
                             **overrides)


def megatron_layer(dc, backend: str, args, device, dtype):
    """(MoE TransformerLayer, rotary embedding for --seq) of a 2-layer model built from the seed."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_dots.model import build_dots_model

    tc = dc.to_transformer_config(bf16=dtype == torch.bfloat16, params_dtype=dtype,
                                  use_cpu_initialization=device.type == "cpu")
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    model = build_dots_model(dc, tc, backend=backend).to(device).train()
    rope = model.rotary_pos_emb(args.seq)
    return model.decoder.layers[1], rope


def megatron_cases(name: str, backend: str, dc, args, device, dtype, results, outputs):
    layer, rope = megatron_layer(dc, backend, args, device, dtype)
    x = torch.randn(args.seq, args.batch, dc.hidden_size, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(args.seed))
    x.requires_grad_(True)
    routing = []
    hook = layer.mlp.router.register_forward_hook(lambda m, i, o: routing.append(o[1].detach()))
    with torch.no_grad():
        outputs[name] = {"layer": layer(x, attention_mask=None, rotary_pos_emb=rope)[0].float(),
                         "moe": layer.mlp(x)[0].float(), "routing": routing[:]}
    hook.remove()
    tokens = args.batch * args.seq
    flops = {"layer": 3 * (attention_flops(dc, args.batch, args.seq) + moe_flops(dc, tokens)),
             "moe": 3 * moe_flops(dc, tokens)}
    calls = {"layer": lambda t: layer(t, attention_mask=None, rotary_pos_emb=rope)[0],
             "moe": lambda t: layer.mlp(t)[0]}
    for part in ("layer", "moe"):
        case = f"{name}-{part}"
        if case in args.cases:
            step, saved = fwd_bwd(calls[part], [x], layer.parameters())
            results[case] = record(time_case(step, args, device), flops[part], tokens, saved)
            if args.profile and name == "ours":
                profile(step, case, args, device)
    return layer


def profile(step, case: str, args, device) -> None:
    """Trace three calls of `step` into ``args.profile/<case>.json``; print the top operators."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    os.makedirs(args.profile, exist_ok=True)
    prof.export_chrome_trace(os.path.join(args.profile, f"{case}.json"))
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"-- {case}: top operators by {key} (3 calls)")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def hf_cases(dc, args, device, dtype, results):
    from transformers import Dots1Config
    from transformers.models.dots1.modeling_dots1 import Dots1DecoderLayer, Dots1RotaryEmbedding

    fields = {k: v for k, v in dc.to_hf_config().items() if k not in ("architectures", "model_type")}
    cfg = Dots1Config(**fields, attn_implementation="sdpa", experts_implementation=args.hf_experts)
    torch.manual_seed(args.seed)
    layer = Dots1DecoderLayer(cfg, layer_idx=1).to(device=device, dtype=dtype).train()
    with torch.no_grad():
        for param in layer.parameters():  # transformers leaves some weights uninitialised
            if param.dim() > 1:
                param.normal_(0.0, 0.006)
        for name, buffer in layer.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.zero_()
    rope = Dots1RotaryEmbedding(config=cfg).to(device)
    x = torch.randn(args.batch, args.seq, dc.hidden_size, device=device, dtype=dtype,
                    requires_grad=True)
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)
    cos_sin = rope(x, positions)
    tokens = args.batch * args.seq
    if "hf-layer" in args.cases:
        step, saved = fwd_bwd(
            lambda t: layer(t, position_ids=positions, position_embeddings=cos_sin), [x],
            layer.parameters())
        flops = 3 * (attention_flops(dc, args.batch, args.seq) + moe_flops(dc, tokens))
        results["hf-layer"] = record(time_case(step, args, device), flops, tokens, saved)
    if "hf-moe" in args.cases:
        step, saved = fwd_bwd(layer.mlp, [x], layer.parameters())
        results["hf-moe"] = record(time_case(step, args, device), 3 * moe_flops(dc, tokens),
                                   tokens, saved)


def balanced_experts_case(layer, dc, args, device, dtype, results):
    """Routed (grouped GEMM, balanced) + shared experts, no router, no permutation."""
    experts, shared = layer.mlp.experts, layer.mlp.shared_experts
    tokens = args.batch * args.seq
    routed = tokens * dc.moe_router_topk
    counts = torch.full((experts.num_local_experts,), routed // experts.num_local_experts)
    counts[: routed - int(counts.sum())] += 1
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(routed, dc.hidden_size, device=device, dtype=dtype, generator=gen,
                    requires_grad=True)
    probs = torch.rand(routed, device=device, generator=gen)
    h = torch.randn(tokens, 1, dc.hidden_size, device=device, dtype=dtype, generator=gen,
                    requires_grad=True)

    def call(xr, hs):
        out = experts(xr, counts, probs)[0]
        shared_out = shared(hs)  # a tensor (SharedExpertMLP), (output, bias) from an MLP
        if isinstance(shared_out, tuple):
            shared_out = shared_out[0]
        return out.float().sum() + shared_out.float().sum()  # both outputs in one backward

    def step():
        call(x, h).backward()

    flops = 3 * (routed * 6 * dc.hidden_size * dc.moe_ffn_hidden_size
                 + 6 * tokens * dc.hidden_size * dc.shared_expert_intermediate_size)
    results["experts-balanced"] = record(time_case(step, args, device), flops, tokens)


def matmul_case(args, device, results):
    n = args.matmul_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_case(lambda: torch.mm(a, b), args, device)
    results["matmul"] = record(timing, 2 * n ** 3, None)


def train_step_case(args, device, results):
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_dots.training.step import train_step

    parallel_state.destroy_model_parallel()
    # the aux-loss tracker is sized by the layer cases' 2-layer model (the 0-d aux-loss scale
    # their bare backward leaves is handled by compat.runtime_patches)
    get_moe_layer_wise_logging_tracker().clear()
    build_args = types.SimpleNamespace(model=args.train_model, dtype=args.dtype,
                                       expert_backend=args.train_backend, lr=1e-5, seed=args.seed)
    dc, _, chunks, optimizer, device, _ = build(build_args)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, dc.vocab_size, (1, args.seq + 1), generator=gen).to(device)
               for _ in range(args.train_micro_batches)]
    losses = []

    def step():
        losses.append(train_step(chunks, optimizer, batches, args.seq, 1).loss)

    timing = time_case(step, args, device)
    tokens = args.train_micro_batches * args.seq
    flops = 3 * model_flops(dc, args.train_micro_batches, args.seq)
    out = record(timing, flops, tokens)
    out["model"] = args.train_model
    out["backend"] = args.train_backend
    out["loss_first_last"] = [losses[0], losses[-1]]
    if args.peak_tflops:
        out["mfu_vs_peak"] = out["tflops"] / args.peak_tflops
    if "matmul" in results:
        out["mfu_vs_matmul"] = out["tflops"] / results["matmul"]["tflops"]
    results["train-step"] = out


def record(timing, flops: float, tokens: Optional[int], saved_bytes: Optional[int] = None):
    seconds = timing["ms"] / 1e3
    return {**timing, "tflops": flops / seconds / 1e12,
            "tokens_per_s": None if tokens is None else tokens / seconds,
            "saved_mib": None if saved_bytes is None else saved_bytes / (1 << 20)}


def compare(outputs, results):
    """ours vs mcore: largest |output difference| and whether the routing is identical."""
    if "ours" not in outputs or "mcore" not in outputs:
        return None
    ours, ref = outputs["ours"], outputs["mcore"]
    check = {part: (ours[part] - ref[part]).abs().max().item() for part in ("layer", "moe")}
    check["reference_abs_max"] = ref["layer"].abs().max().item()
    check["routing_identical"] = all(torch.equal(a, b)
                                     for a, b in zip(ours["routing"], ref["routing"]))
    return check


# -- report -----------------------------------------------------------------------------------
def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(results):
    head = ("case", "ms", "TFLOP/s", "tokens/s", "peak GiB", "saved MiB")
    rows = [(case, fmt(r["ms"], ".2f"), fmt(r["tflops"], ".1f"), fmt(r["tokens_per_s"], ",.0f"),
             fmt(r["peak_gib"], ".2f"), fmt(r.get("saved_mib"), ",.1f"))
            for case, r in results.items()]
    return head, rows


def print_table(results, markdown: bool):
    head, rows = table(results)
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dots.llm1",
                        help="DotsConfig preset whose layer shapes are timed")
    parser.add_argument("--num-experts", type=int, default=None,
                        help="override the preset's routed-expert count (e.g. to compare saved "
                        "bytes at real hidden / ffn sizes on a CPU without 128 experts' weights)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per call")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--hf-experts", default="grouped_mm",
                        help="transformers experts_implementation for hf-* (eager, batched_mm, "
                        "grouped_mm, ...)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--train-model", default="dots-mini", help="preset of train-step")
    parser.add_argument("--train-backend", default="auto",
                        help="expert backend of train-step (auto, grouped, sequential, te)")
    parser.add_argument("--train-micro-batches", type=int, default=4,
                        help="micro-batches (of 1 x --seq tokens) per train-step")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak for MFU (H100 SXM: 989; H200: 989)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace the ours-* cases with torch.profiler into DIR")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="bench/results/layer_bench.json", help="JSON report")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import megatron_dots  # noqa: F401  (compat patches first)
    from megatron.core import parallel_state

    from megatron_dots.compat.distributed import default_device, init_distributed
    from megatron_dots.compat.versions import HAVE_TE

    init_distributed()
    parallel_state.initialize_model_parallel(1, 1)
    device = default_device()
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dc = layer_dots_config(args)
    results, outputs, skipped = {}, {}, {}

    if "matmul" in args.cases:
        matmul_case(args, device, results)
    for name, backend in (("ours", "grouped"), ("mcore", "sequential"), ("te", "te")):
        wanted = {f"{name}-layer", f"{name}-moe"} & set(args.cases)
        if not wanted and not (name == "ours" and "experts-balanced" in args.cases):
            continue
        if backend == "te" and not HAVE_TE:
            skipped["te-layer"] = skipped["te-moe"] = "Transformer Engine is not installed"
            continue
        layer = megatron_cases(name, backend, dc, args, device, dtype, results, outputs)
        if name == "ours" and "experts-balanced" in args.cases:
            balanced_experts_case(layer, dc, args, device, dtype, results)
        del layer
        free_memory(device)
    if {"hf-layer", "hf-moe"} & set(args.cases):
        hf_cases(dc, args, device, dtype, results)
        free_memory(device)
    if "train-step" in args.cases:
        train_step_case(args, device, results)
        free_memory(device)

    check = compare(outputs, results)
    print_table(results, args.markdown)
    if check:
        print(f"ours vs mcore (same weights): max |diff| layer {check['layer']:.3g}, "
              f"moe {check['moe']:.3g} (outputs up to {check['reference_abs_max']:.3g}); "
              f"routing identical: {check['routing_identical']}")
    for case, why in skipped.items():
        print(f"skipped {case}: {why}")
    report = {
        "host": host_info(device),
        "shapes": {"model": args.model, "hidden": dc.hidden_size, "experts": dc.num_moe_experts,
                   "topk": dc.moe_router_topk, "moe_ffn": dc.moe_ffn_hidden_size,
                   "shared_ffn": dc.shared_expert_intermediate_size, "batch": args.batch,
                   "seq": args.seq, "dtype": args.dtype},
        "results": results,
        "ours_vs_mcore": check,
        "skipped": skipped,
        "args": vars(args),
    }
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out}")
    parallel_state.destroy_model_parallel()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
