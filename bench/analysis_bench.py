"""`megatron-dots analyze` on the GPU in bf16 against the same run in fp32: the GPU suite's
`analysis` step.

Builds a random dots model as a Hugging Face directory (transformers' Dots1ForCausalLM, bf16
on disk) and two token-range domains as indexed datasets, then runs `analyze experts` and
`analyze ablate-shared` once with --dtype fp32 and once with --dtype bf16 (one process), and
reports per precision the tokens per second of each analysis, and between them the largest
loss difference and the share of routed slots that land on the same expert counts (bf16 moves
a few near-tied top-k choices; the counts of a layer then differ by those slots).

    python bench/analysis_bench.py --markdown --out bench/results/analysis.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import host_info, markdown_table, write_report  # noqa: E402


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8 if cuda else 3)
    parser.add_argument("--hidden", type=int, default=1024 if cuda else 64)
    parser.add_argument("--experts", type=int, default=32 if cuda else 8)
    parser.add_argument("--topk", type=int, default=6 if cuda else 2)
    parser.add_argument("--vocab-size", type=int, default=32000 if cuda else 512)
    parser.add_argument("--tokens", type=int, default=65536 if cuda else 600)
    parser.add_argument("--seq", type=int, default=2048 if cuda else 32)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "analysis.json"))
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args(argv)


def make_model(args, path: str):
    from megatron_dots.config import DotsConfig

    heads = max(2, args.hidden // 128)
    cfg = DotsConfig.preset(
        "dots-tiny", num_layers=args.layers, hidden_size=args.hidden,
        num_attention_heads=heads, num_query_groups=heads, kv_channels=args.hidden // heads,
        ffn_hidden_size=4 * args.hidden, moe_ffn_hidden_size=args.hidden // 2,
        num_moe_experts=args.experts, moe_router_topk=args.topk, vocab_size=args.vocab_size,
        max_position_embeddings=max(args.seq, 256))
    from transformers import Dots1Config, Dots1ForCausalLM

    hf = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    model = Dots1ForCausalLM(Dots1Config(**hf))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.rand(param.shape) + 0.5)
            else:
                param.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(path)
    return cfg


def make_domains(cfg, root: str, tokens: int):
    from megatron.core.datasets.indexed_dataset import (IndexedDatasetBuilder, get_bin_path,
                                                         get_idx_path)

    half = cfg.vocab_size // 2
    prefixes = {}
    for name, (low, high) in {"low": (1, half), "high": (half, cfg.vocab_size)}.items():
        rng = np.random.default_rng(len(prefixes))
        prefix = os.path.join(root, name)
        builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.int32)
        written = 0
        while written < tokens:
            doc = rng.integers(low, high, size=int(rng.integers(200, 3000)))
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
            written += len(doc)
        builder.finalize(get_idx_path(prefix))
        prefixes[name] = prefix
    return prefixes


def run_analysis(args, analysis: str, hf: str, domains, dtype: str, out: str) -> float:
    argv = [sys.executable, "-m", "megatron_dots.cli", "analyze", analysis, "--hf", hf,
            "--tokens", str(args.tokens), "--seq-length", str(args.seq),
            "--micro-batch-size", str(args.micro_batch_size), "--dtype", dtype, "--out", out,
            "--no-progress", "--bootstrap", "100"]
    for name, prefix in domains.items():
        argv += ["--data", f"{name}={prefix}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def _counts(path: str):
    import csv

    with open(path, newline="") as f:
        return {(r["domain"], r["layer"], r["expert"]): int(r["count"]) for r in csv.DictReader(f)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import megatron_dots  # noqa: F401

    work = tempfile.mkdtemp(prefix="analysis-bench-")
    cfg = make_model(args, os.path.join(work, "hf"))
    domains = make_domains(cfg, work, args.tokens)
    dtypes = ("fp32", "bf16") if torch.cuda.is_available() else ("fp32",)
    results = {}
    for dtype in dtypes:
        out = os.path.join(work, dtype)
        entry = {}
        for analysis in ("experts", "ablate-shared"):
            seconds = run_analysis(args, analysis, os.path.join(work, "hf"), domains, dtype, out)
            passes = 1 if analysis == "experts" else 3
            entry[f"{analysis} tokens/s (incl. start-up)"] = \
                passes * len(domains) * args.tokens / seconds
        with open(os.path.join(out, "ablation.json")) as f:
            entry["losses"] = {d: {v: e[v]["loss"] for v in ("full", "no-shared", "shared-only")}
                               for d, e in json.load(f)["domains"].items()}
        entry["counts"] = _counts(os.path.join(out, "expert_share.csv"))
        results[dtype] = entry
    report = {"host": host_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
              "model": {"layers": args.layers, "hidden": args.hidden, "experts": args.experts,
                        "topk": args.topk, "vocab": args.vocab_size},
              "tokens_per_domain": args.tokens, "seq_length": args.seq, "results": {}}
    for dtype, entry in results.items():
        report["results"][dtype] = {k: v for k, v in entry.items() if k != "counts"}
    if len(results) == 2:
        a, b = results["fp32"], results["bf16"]
        total = sum(a["counts"].values())
        moved = sum(abs(a["counts"][k] - b["counts"][k]) for k in a["counts"]) / 2
        report["bf16_vs_fp32"] = {
            "max_loss_diff": max(abs(a["losses"][d][v] - b["losses"][d][v])
                                 for d in a["losses"] for v in a["losses"][d]),
            "routed_slots_agreeing": 1.0 - moved / total}
    write_report(report, args.out)
    if args.markdown:
        rows = [[dtype, *(f"{v:,.0f}" for k, v in e.items() if k.endswith("(incl. start-up)"))]
                for dtype, e in report["results"].items()]
        print(markdown_table(["dtype", "experts tok/s", "ablate-shared tok/s"], rows))
        if "bf16_vs_fp32" in report:
            print(json.dumps(report["bf16_vs_fp32"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
