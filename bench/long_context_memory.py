"""Activation bytes per layer at long context on the TE-free path (SDPA attention, grouped
experts), measured by the saved-tensor counter next to `megatron_dots.plan.activations`.

For every sequence length (micro-batch 1) one training forward of a dots model runs under
`recompute.measure.SavedBytes`, which records per layer and region what autograd keeps for
backward: ``rest`` (norms, QKV, q/k norms, RoPE, linear_proj's input), ``attn_core`` (the core
attention) and ``mlp`` (dense MLP or MoE block: router, permutation, routed and shared experts).
Beside each: the analytic prediction of `plan.activations.layer_parts` for that layer (flash
attention, balanced routing: exact for one rank, whose experts get every routed copy), the
bytes of one s x s fp32 score matrix, and what Megatron-Core's unfused attention would keep
(`attention="unfused"`: the heads' s x s scores and the mask).

Attention-mask variants (--masks): ``none`` is our training path (Megatron-Core gets
``attention_mask=None``); ``causal`` hands the layers the ``[1, 1, s, s]`` causal mask that
Megatron-LM's dataloader builds by default (without --no-create-attention-mask-in-dataloader),
which `SDPACoreAttention` recognises and runs as ``is_causal``. Either way nothing s x s is
kept: the bytes grow linearly in s.

With ``--device cuda`` the same runs on a GPU, in bf16 by default, with a backward, and
records `torch.cuda.max_memory_allocated` too: the bytes the forward leaves allocated (saved
tensors + the loss), the forward's peak and the step's peak, over the model's own memory.

CPU (dots-tiny width: hidden 64, 4 heads, a dense and a MoE layer; ~1-2 minutes at 32K):

    python bench/long_context_memory.py --out /tmp/long_context_memory.json

GPU (dots-mini width: hidden 1536, 12 heads x 128, 64 experts top-6; seconds on an H100):

    python bench/long_context_memory.py --device cuda --dots-model dots-mini --layers 2 \\
        --vocab-size 32000 --out /tmp/long_context_memory_gpu.json

Writes the JSON report (`--out`) and the markdown table beside it (same name, ``.md``).
"""

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import finite, host_info, json_default, markdown_table  # noqa: E402

MASKS = ("none", "causal")
REGIONS = ("rest", "attn_core", "mlp")
DEFAULT_LENGTHS = "4096,8192,16384,32768"
MIB = float(1 << 20)


# -- model ------------------------------------------------------------------------------------
def build_model(preset: str, layers: int, vocab_size: Optional[int], dtype: str,
                device: torch.device, max_length: int, seed: int = 1234):
    """(DotsConfig, model) with `layers` layers (the first dense, the rest MoE), on `device`,
    in the parallel state of one process (initialised here when absent)."""
    import megatron_dots  # noqa: F401  (compat patches before Megatron-Core is used)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_dots.compat.distributed import init_distributed
    from megatron_dots.config import DotsConfig
    from megatron_dots.model import build_dots_model

    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    overrides = dict(num_layers=layers, max_position_embeddings=max(max_length, 1))
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    cfg = DotsConfig.preset(preset, **overrides)
    params_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    tc = cfg.to_transformer_config(bf16=dtype == "bf16", params_dtype=params_dtype,
                                   pipeline_dtype=params_dtype)
    model = build_dots_model(cfg, tc, backend="grouped").to(device)
    model.train()
    return cfg, model


def layer_modules(model) -> List:
    from megatron_dots.recompute.layer import decoder_layers

    return decoder_layers(model)


def causal_mask(s: int, device: torch.device) -> torch.Tensor:
    """Megatron-LM's dataloader mask: ``[1, 1, s, s]`` bool, True = masked (future keys)."""
    return torch.ones(s, s, dtype=torch.bool, device=device).triu_(1)[None, None]


# -- measurement ------------------------------------------------------------------------------
def measure(cfg, model, s: int, mask: str = "none", backward: bool = False,
            seed: int = 0) -> Dict:
    """One forward (and optionally backward) of micro-batch 1 x `s` under the saved-tensor
    counter: per layer its kind and saved bytes per region, the counter's total, and on CUDA
    the allocator's view (bytes over the memory allocated before the forward)."""
    from megatron_dots.recompute.layer import set_modes
    from megatron_dots.recompute.measure import OUTSIDE, SavedBytes

    if mask not in MASKS:
        raise ValueError(f"unknown mask variant {mask!r}; expected one of {MASKS}")
    device = next(model.parameters()).device
    layers = layer_modules(model)
    for layer in layers:
        layer.install_recompute_regions()
    set_modes(model, None)
    gen = torch.Generator().manual_seed(seed + s)
    tokens = torch.randint(0, cfg.vocab_size, (1, s + 1), generator=gen).to(device)
    positions = torch.arange(s, device=device)[None]
    attention_mask = causal_mask(s, device) if mask == "causal" else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    counter = SavedBytes(model.parameters())
    start = time.perf_counter()
    with counter.counting():
        loss = model(tokens[:, :-1], positions, attention_mask, labels=tokens[:, 1:])
    record = {"seq_length": s, "mask": mask, "layers": {},
              "outside_bytes": counter.bytes.get(OUTSIDE, 0), "total_bytes": counter.total()}
    if cuda:
        torch.cuda.synchronize(device)
        record["cuda"] = {"forward_kept_bytes": torch.cuda.memory_allocated(device) - base,
                          "forward_peak_bytes": torch.cuda.max_memory_allocated(device) - base}
    if backward:
        loss.float().mean().backward()
        if cuda:
            torch.cuda.synchronize(device)
            record["cuda"]["step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        model.zero_grad(set_to_none=True)
    record["seconds"] = round(time.perf_counter() - start, 3)
    del loss, attention_mask
    for layer in layers:
        regions = counter.layer_bytes(layer.layer_number)
        record["layers"][str(layer.layer_number)] = dict(
            kind=layer.kind, **{name: regions.get(name, 0) for name in REGIONS})
    return record


def predict(cfg, s: int, dtype: str, kind: str, attention: str = "flash") -> Dict[str, float]:
    """`plan.activations.layer_parts` summed per region, one rank, micro-batch 1 x `s`."""
    from megatron_dots.plan.activations import dtype_bytes, layer_parts
    from megatron_dots.plan.layout import Layout
    from megatron_dots.recompute.shapes import MicroBatchShape

    layout = Layout(gpus=1, micro_batch_size=1, global_batch_size=1, seq_length=s,
                    precision=dtype)
    parts = layer_parts(cfg, layout, kind, MicroBatchShape(1, s), dtype_bytes(dtype),
                        attention=attention)
    return {name: float(sum(parts[name].values())) for name in REGIONS}


def score_bytes(cfg, s: int) -> Dict[str, float]:
    """One s x s fp32 score matrix, and all heads' (what unfused attention computes, b = 1)."""
    one = 4.0 * s * s
    return {"one_score_matrix_fp32": one,
            "all_heads_scores_fp32": one * cfg.num_attention_heads}


def annotate(cfg, record: Dict, dtype: str) -> Dict:
    """Add each layer's prediction (flash, and unfused attention for contrast) and the score
    matrix bytes to a `measure` record."""
    for entry in record["layers"].values():
        entry["predicted"] = predict(cfg, record["seq_length"], dtype, entry["kind"])
        entry["measured_total"] = sum(entry[name] for name in REGIONS)
        entry["predicted_total"] = sum(entry["predicted"].values())
        entry["unfused_attn_core_predicted"] = predict(
            cfg, record["seq_length"], dtype, entry["kind"], attention="unfused")["attn_core"]
    record.update(score_bytes(cfg, record["seq_length"]))
    return record


# -- report -----------------------------------------------------------------------------------
def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def markdown(report: Dict) -> str:
    headers = ["s", "mask", "layer", "attn core meas / pred MiB", "rest meas / pred MiB",
               "MLP/MoE meas / pred MiB", "layer total meas / pred MiB",
               "one s x s fp32 MiB", "unfused attn core MiB", "CUDA fwd kept / step peak MiB"]
    rows = []
    for record in report["records"]:
        cuda = record.get("cuda") or {}
        for number, entry in sorted(record["layers"].items(), key=lambda x: int(x[0])):
            pred = entry["predicted"]
            rows.append([
                f"{record['seq_length']:,}", record["mask"], f"{number} ({entry['kind']})",
                f"{_mib(entry['attn_core'])} / {_mib(pred['attn_core'])}",
                f"{_mib(entry['rest'])} / {_mib(pred['rest'])}",
                f"{_mib(entry['mlp'])} / {_mib(pred['mlp'])}",
                f"{_mib(entry['measured_total'])} / {_mib(entry['predicted_total'])}",
                _mib(record["one_score_matrix_fp32"]),
                _mib(entry["unfused_attn_core_predicted"]),
                f"{_mib(cuda.get('forward_kept_bytes'))} / {_mib(cuda.get('step_peak_bytes'))}"
                if cuda else "-",
            ])
    model = report["model"]
    head = (f"{model['preset']} width (hidden {model['hidden_size']}, "
            f"{model['heads']} heads x {model['head_dim']}, {model['experts']} experts top-"
            f"{model['topk']}), {report['dtype']}, micro-batch 1, {report['host']['device']}")
    return head + "\n\n" + markdown_table(headers, rows) + "\n"


def parse_lengths(text: str) -> List[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: comma-separated integers") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: give positive lengths")
    return lengths


def parse_masks(text: str) -> List[str]:
    masks = [x for x in text.split(",") if x]
    unknown = sorted(set(masks) - set(MASKS))
    if not masks or unknown:
        raise argparse.ArgumentTypeError(f"--masks {text!r}: choose from {', '.join(MASKS)}")
    return masks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths(DEFAULT_LENGTHS),
                        help=f"sequence lengths, comma-separated (default {DEFAULT_LENGTHS})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to run (default cpu); cuda adds the allocator's peaks")
    parser.add_argument("--dots-model", default="dots-tiny",
                        help="preset whose width to use (default dots-tiny; dots-mini on a GPU)")
    parser.add_argument("--layers", type=int, default=2,
                        help="decoder layers: the first dense, the rest MoE (default 2)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size (default: the preset's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="model dtype (default fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--masks", type=parse_masks, default=list(MASKS),
                        help="attention-mask variants, comma-separated: none (our training "
                             "path), causal (Megatron-LM's dataloader mask); default both")
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the backward (default: on cuda only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    parser.add_argument("--out", default="long_context_memory.json",
                        help="JSON report path; the markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    if args.layers < 2:
        parser.error(f"--layers {args.layers}: need at least 2 (a dense and a MoE layer)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.backward is None:
        args.backward = args.device == "cuda"
    return args


def write_outputs(report: Dict, path: str) -> str:
    """The JSON report at `path` and its markdown table beside it, each written atomically."""
    import json

    from megatron_dots.storage.atomic import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(finite(report), indent=2, default=json_default) + "\n")
    table = markdown(report)
    atomic_write_text(os.path.splitext(path)[0] + ".md", table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_dots.storage.progress import progress_bar

    device = torch.device(args.device)
    cfg, model = build_model(args.dots_model, args.layers, args.vocab_size, args.dtype, device,
                             max(args.lengths))
    records = []
    runs = [(s, m) for s in args.lengths for m in args.masks]
    with progress_bar(len(runs), "long-context memory", unit="run") as bar:
        for s, mask in runs:
            record = measure(cfg, model, s, mask, backward=args.backward, seed=args.seed)
            records.append(annotate(cfg, record, args.dtype))
            bar.update(1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = {
        "host": host_info(device), "dtype": args.dtype, "backward": args.backward,
        "model": {"preset": args.dots_model, "layers": args.layers,
                  "hidden_size": cfg.hidden_size, "heads": cfg.num_attention_heads,
                  "head_dim": cfg.kv_channels, "experts": cfg.num_moe_experts,
                  "topk": cfg.moe_router_topk, "vocab_size": cfg.vocab_size},
        "records": records,
    }
    if device.type == "cuda":
        report["model_bytes"] = torch.cuda.memory_allocated(device)
    print(write_outputs(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
