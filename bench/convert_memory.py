"""Peak host memory and time of checkpoint conversion on a synthetic multi-GB dots1 model (CPU).

Writes a random bf16 HF dots1 checkpoint (default ~2.4 GB: hidden 1024, 9 layers, 64 experts),
then runs `megatron-dots convert hf-to-mcore` and `convert mcore-to-hf` each in a fresh
process, records its peak RSS (getrusage of the child) and wall time, checks that the round
trip is bit-exact tensor by tensor, and writes a JSON report.

    python bench/convert_memory.py --work /tmp/convert-bench --out bench/results/convert_memory.json
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch
from safetensors import safe_open

from megatron_dots.config import DotsConfig
from megatron_dots.convert.dist_layout import stored_tensors
from megatron_dots.convert.hf_to_mcore import expected_hf_tensors
from megatron_dots.convert.safetensors_stream import (
    SafetensorsStreamWriter,
    TensorSpec,
    plan_shards,
    shard_names,
)


def synthetic_config(args) -> DotsConfig:
    return DotsConfig.preset(
        "dots-tiny", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
        num_query_groups=8, kv_channels=args.hidden // 8, ffn_hidden_size=4 * args.hidden,
        moe_ffn_hidden_size=args.moe_ffn, num_moe_experts=args.experts, moe_router_topk=6,
        num_shared_experts=2, vocab_size=32000, make_vocab_size_divisible_by=128)


def write_synthetic_hf(cfg: DotsConfig, directory: str) -> int:
    """Random bf16 weights (router bias fp32), written tensor by tensor; returns bytes."""
    padded = cfg.padded_vocab_size()
    shapes = expected_hf_tensors(cfg, stored_tensors(cfg, padded), padded)
    specs = [TensorSpec(name, shape, torch.float32 if name.endswith("correction_bias")
                        else torch.bfloat16) for name, shape in shapes.items()]
    shards = plan_shards(specs, 1_000_000_000)
    names = shard_names(len(shards))
    gen = torch.Generator().manual_seed(0)
    os.makedirs(directory)
    for shard, name in zip(shards, names):
        writer = SafetensorsStreamWriter(os.path.join(directory, name), shard)
        for spec in shard:
            writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).to(spec.dtype))
        writer.close()
    weight_map = {spec.name: name for shard, name in zip(shards, names) for spec in shard}
    total = sum(spec.nbytes for spec in specs)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**cfg.to_hf_config(), "torch_dtype": "bfloat16"}, f)
    return total


def measured(cmd):
    """Run cmd in a fresh measuring process: (peak RSS bytes of cmd, wall seconds)."""
    probe = ("import resource, subprocess, sys, json, time; t = time.time(); "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "time.time() - t]))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    rc, maxrss_kib, wall = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}):\n{out.stderr[-3000:]}")
    return maxrss_kib * 1024, wall


def same_tensors(a_dir: str, b_dir: str) -> int:
    """Compare two HF directories tensor by tensor (bit-exact); returns the tensor count."""
    def index(d):
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            return json.load(f)["weight_map"]

    a_map, b_map = index(a_dir), index(b_dir)
    if set(a_map) != set(b_map):
        raise SystemExit(f"key sets differ: {sorted(set(a_map) ^ set(b_map))[:5]}")
    for name in a_map:
        with safe_open(os.path.join(a_dir, a_map[name]), "pt") as fa, \
                safe_open(os.path.join(b_dir, b_map[name]), "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                raise SystemExit(f"{name} differs after the round trip")
    return len(a_map)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/megatron-dots-convert-bench",
                        help="scratch directory (deleted first)")
    parser.add_argument("--out", default="bench/results/convert_memory.json", help="JSON report")
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--moe-ffn", type=int, default=704)
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    cfg = synthetic_config(args)
    hf, mcore, back = (os.path.join(args.work, n) for n in ("hf", "mcore", "hf-back"))
    t0 = time.time()
    size = write_synthetic_hf(cfg, hf)
    print(f"synthetic HF checkpoint: {size / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    padded = cfg.padded_vocab_size()
    largest_stored = max(2 * torch.Size(t.shape).numel() for t in stored_tensors(cfg, padded))
    cli = [sys.executable, "-m", "megatron_dots.cli"]
    baseline, _ = measured([sys.executable, "-c", "import megatron_dots.convert.mcore_to_hf"])
    to_mcore = measured(cli + ["convert", "hf-to-mcore", "--hf", hf, "--out", mcore,
                               "--tp", "2", "--ep", "4", "--pp", "3", "--no-progress"])
    to_hf = measured(cli + ["convert", "mcore-to-hf", "--ckpt", mcore, "--out", back,
                            "--max-shard-size", "1GB", "--no-progress"])
    count = same_tensors(hf, back)
    report = {
        "date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(),
        "checkpoint_bytes": size, "tensors": count,
        "largest_stored_tensor_bytes": largest_stored,
        "python_import_baseline_rss_bytes": baseline,
        "hf_to_mcore": {"peak_rss_bytes": to_mcore[0], "seconds": round(to_mcore[1], 1)},
        "mcore_to_hf": {"peak_rss_bytes": to_hf[0], "seconds": round(to_hf[1], 1)},
        "round_trip_bit_exact": True,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    gib = 2 ** 30
    print(f"checkpoint {size / gib:.2f} GiB, largest stored tensor {largest_stored / gib:.3f} GiB, "
          f"import baseline {baseline / gib:.2f} GiB")
    for name in ("hf_to_mcore", "mcore_to_hf"):
        print(f"{name}: peak RSS {report[name]['peak_rss_bytes'] / gib:.2f} GiB, "
              f"{report[name]['seconds']} s")
    print(f"round trip bit-exact over {count} tensors; report: {args.out}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
