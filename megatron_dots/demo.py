"""`megatron-dots demo`: train a tiny dots model on local text, then check it against transformers.

Runs anywhere with no network: the corpus is the documentation of Python's standard library
(docstrings of the installed modules), tokenised as bytes. The model is the `dots-tiny` preset
trained with Megatron-Core's schedule, DDP, finalize_model_grads (router-bias update) and Adam.
At the end it saves a Megatron-Core torch_dist checkpoint, exports it with
`convert mcore-to-hf` and loads the export in transformers' `Dots1ForCausalLM`, which must give
the same logits, and generates a few bytes of text. With `--out`, the checkpoint (ckpt/), the
HF model (hf/), the loss curve (CSV) and a summary (JSON) stay there.
"""

import argparse
import csv
import importlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from typing import List, Optional

import torch

from .config import DotsConfig

# Standard-library modules whose documentation makes the corpus (present in every CPython).
_CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
    "io", "itertools", "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def local_corpus(min_bytes: int = 200_000) -> bytes:
    """Docstrings of standard-library modules, classes and functions, in a fixed order."""
    chunks: List[str] = []
    for name in _CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python: skip what is missing
            continue
        for _, obj in [(name, module)] + sorted(inspect.getmembers(module), key=lambda m: m[0]):
            doc = inspect.getdoc(obj) if (obj is module or getattr(obj, "__module__", None) == name) else None
            if doc and len(doc) > 80:
                chunks.append(doc.strip())
    text = "\n\n".join(dict.fromkeys(chunks)).encode("utf-8")
    if len(text) < min_bytes:
        raise RuntimeError(f"only {len(text)} bytes of local documentation found; need {min_bytes}")
    return text


class ByteTokenizer:
    """Bytes as token ids 1..256; id 0 is end-of-text."""

    eos_id = 0

    def encode(self, text: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).long() + 1

    def decode(self, ids) -> str:
        return bytes(int(i) - 1 for i in ids if 0 < int(i) <= 256).decode("utf-8", errors="replace")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="megatron-dots demo",
        description="Train dots-tiny on local text with Megatron-Core, then compare it with "
        "transformers' Dots1ForCausalLM.",
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sample")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per step (gradient accumulation)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    parser.add_argument("--seed", type=int, default=1234, help="random seed")
    parser.add_argument("--log-interval", type=int, default=25, help="steps between log lines")
    parser.add_argument("--out", default=None,
                        help="directory to keep the checkpoint, HF export, loss CSV and summary "
                        "JSON in (default: a temporary directory, deleted at the end)")
    args = parser.parse_args(argv)
    for flag in ("steps", "seq_length", "micro_batch_size", "micro_batches", "log_interval"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def run(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from .compat.distributed import default_device, init_distributed
    from .convert.mcore_to_hf import convert_mcore_to_hf
    from .training.checkpointing import save_checkpoint
    from .model import build_dots_model_chunks
    from .training import train_step, wrap_with_ddp

    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise SystemExit("megatron-dots demo runs as one process: start it without torchrun")
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)

    tokenizer = ByteTokenizer()
    data = tokenizer.encode(local_corpus())
    split = int(len(data) * 0.95)
    train_data, valid_data = data[:split], data[split:]
    cfg = DotsConfig.preset("dots-tiny", max_position_embeddings=args.seq_length)
    print(f"corpus: {len(data):,} bytes of standard-library documentation; model: dots-tiny "
          f"({cfg.num_parameters()[0]:,} parameters, {cfg.num_parameters()[1]:,} active), "
          f"{cfg.num_moe_experts} experts top-{cfg.moe_router_topk} + {cfg.num_shared_experts} "
          "shared", flush=True)

    tc = cfg.to_transformer_config()
    chunks = wrap_with_ddp(build_dots_model_chunks(cfg, tc, backend="auto"), tc)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.lr / 10, weight_decay=0.1,
                        adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
                        params_dtype=torch.float32),
        chunks,
    )
    # WSD as in the paper: warmup (10%), stable, linear anneal to 10% of peak (last 20%).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.lr / 10,
        lr_warmup_steps=max(1, args.steps // 10), lr_decay_steps=args.steps,
        lr_decay_style="WSD", lr_wsd_decay_style="linear",
        wsd_decay_steps=max(1, args.steps // 5), start_wd=0.1, end_wd=0.1,
        wd_incr_steps=args.steps, wd_incr_style="constant",
    )
    gen = torch.Generator().manual_seed(args.seed)
    device = default_device()

    def sample(source, count):
        starts = torch.randint(0, len(source) - args.seq_length - 1, (count,), generator=gen)
        return torch.stack([source[s: s + args.seq_length + 1] for s in starts.tolist()])

    history, start = [], time.time()
    for step in range(args.steps):
        batch = sample(train_data, args.micro_batch_size * args.micro_batches)
        loss, grad_norm = train_step(
            chunks, optimizer, batch.to(device).split(args.micro_batch_size), args.seq_length,
            args.micro_batch_size,
        )
        scheduler.step(1)
        history.append(loss)
        if (step + 1) % args.log_interval == 0 or step == 0:
            tokens_per_s = (step + 1) * batch.numel() / (time.time() - start)
            print(f" step {step + 1:5d}/{args.steps} | loss {loss:.4f} | grad norm "
                  f"{grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s", flush=True)

    # Save a Megatron torch_dist checkpoint and export it with the converter, as users do.
    work = args.out or tempfile.mkdtemp(prefix="megatron-dots-demo-")
    ckpt = save_checkpoint(chunks, os.path.join(work, "ckpt"), args.steps, cfg)
    hf_dir = convert_mcore_to_hf(ckpt, os.path.join(work, "hf"), overwrite=True, progress=False)
    print(f"saved the Megatron checkpoint {ckpt} and exported it to {hf_dir}")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    valid = sample(valid_data, 4)[:, :-1]
    model = chunks[0].module.eval()
    with torch.no_grad():
        on_device = valid.to(device)
        positions = torch.arange(valid.shape[1], device=device).expand_as(on_device)
        ours = model(on_device, positions, None)[..., : cfg.vocab_size].float().cpu()
        theirs = hf(valid).logits
        valid_loss = torch.nn.functional.cross_entropy(
            theirs[:, :-1].reshape(-1, cfg.vocab_size), valid[:, 1:].reshape(-1)).item()
    max_diff = (ours - theirs).abs().max().item()
    prompt = "Return a new"
    ids = tokenizer.encode(prompt.encode()).unsqueeze(0)
    generated = hf.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=None,
                            pad_token_id=tokenizer.eos_id)
    text = tokenizer.decode(generated[0].tolist())

    first, last = _mean(history[:10]), _mean(history[-10:])
    summary = {
        "steps": args.steps, "first_loss": first, "last_loss": last, "valid_loss": valid_loss,
        "uniform_loss": math.log(256), "hf_max_abs_logit_diff": max_diff,
        "seconds": round(time.time() - start, 1), "generation": text,
    }
    print(f"loss {first:.3f} -> {last:.3f} (training, mean of 10 steps); held-out loss "
          f"{valid_loss:.3f} (uniform over bytes: {math.log(256):.3f})")
    print(f"transformers Dots1ForCausalLM on the exported weights: max |logit diff| = "
          f"{max_diff:.2e}")
    print(f"greedy generation: {text!r}")
    if args.out:
        _write_outputs(args.out, history, summary)
        print(f"wrote ckpt/, hf/, losses.csv and summary.json to {args.out}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    parallel_state.destroy_model_parallel()
    return summary


def _mean(values):
    return sum(values) / len(values)


def _write_outputs(out: str, history, summary) -> None:
    with open(os.path.join(out, "losses.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(history, start=1))
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)


def main(argv=None) -> int:
    summary = run(argv)
    return 0 if summary["hf_max_abs_logit_diff"] <= 1e-4 else 1
