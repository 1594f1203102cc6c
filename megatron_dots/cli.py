"""`megatron-dots` console entry point: one subcommand per job."""

import argparse
import sys


def _info(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-dots info",
        description="Show a dots preset (or a HF config.json): shape and parameter counts.",
    )
    parser.add_argument("source", nargs="?", default="dots.llm1",
                        help="preset name (dots.llm1, dots-mini, dots-tiny) or a HF model "
                        "directory / config.json (default: dots.llm1)")
    args = parser.parse_args(argv)
    from .config import PRESETS, DotsConfig, DotsConfigError

    try:
        cfg = (DotsConfig.preset(args.source) if args.source in PRESETS
               else DotsConfig.from_hf_config(args.source))
    except DotsConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total, active = cfg.num_parameters()
    for key, value in cfg.to_dict().items():
        print(f"{key:28s} {value}")
    print(f"{'parameters (total)':28s} {total:,} ({total / 1e9:.1f}B)")
    print(f"{'parameters (active/token)':28s} {active:,} ({active / 1e9:.1f}B)")
    return 0


def _demo(argv) -> int:
    from .demo import main

    return main(argv)


def _convert(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-dots convert",
        description="Convert checkpoints between Hugging Face dots1 and Megatron-Core "
        "(torch_dist), streaming on CPU: host memory stays at a few tensors.",
    )
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron release checkpoint",
                              description="Write OUT/release (a torch_dist checkpoint loadable "
                              "under any TP/PP/EP/VPP) and OUT/latest_checkpointed_iteration.txt.")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (config.json + "
                          "safetensors, sharded with an index or not)")
    to_mcore.add_argument("--out", required=True, help="checkpoint root to create")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size of the run "
                          "that will load it (sets the vocab padding; checked against the model)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size (checked)")
    to_mcore.add_argument("--ep", type=int, default=1, help="expert parallel size (checked)")
    to_mcore.add_argument("--vpp", type=int, default=None,
                          help="virtual pipeline chunks per stage (checked)")
    to_mcore.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), default=None,
                          help="cast weights (default: keep the stored dtype; the router bias "
                          "stays fp32)")
    to_mcore.add_argument("--overwrite", action="store_true",
                          help="replace a checkpoint already in --out")
    to_mcore.add_argument("--no-progress", action="store_true", help="no progress bar")

    to_hf = sub.add_parser("mcore-to-hf", help="Megatron torch_dist checkpoint -> HF directory",
                           description="Read a checkpoint saved under any layout and write an "
                           "HF dots1 directory loadable by transformers.")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint root (with latest_checkpointed_"
                       "iteration.txt) or one iter_*/release directory")
    to_hf.add_argument("--out", required=True, help="HF model directory to create")
    to_hf.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), default=None,
                       help="cast weights (default: keep the stored dtype)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size "
                       "(default 5GB)")
    to_hf.add_argument("--config", default=None, help="HF config.json to use when the "
                       "checkpoint does not carry its dots config")
    to_hf.add_argument("--tokenizer", default=None, help="directory with tokenizer files to "
                       "copy (default: the checkpoint's hf_assets/)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from .config import DotsConfigError
    from .storage.errors import CheckpointError

    try:
        if args.direction == "hf-to-mcore":
            from .convert.hf_to_mcore import convert_hf_to_mcore

            written = convert_hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.ep, args.vpp,
                                          args.dtype, args.overwrite, not args.no_progress)
        else:
            from .convert.mcore_to_hf import convert_mcore_to_hf

            written = convert_mcore_to_hf(args.ckpt, args.out, args.dtype, args.max_shard_size,
                                          args.config, args.tokenizer, args.overwrite,
                                          not args.no_progress)
    except (CheckpointError, DotsConfigError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


def _compare(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-dots compare",
        description="Run a Megatron checkpoint and an HF model on the same random tokens (fp32, "
        "one process) and compare logits; exit 1 beyond tolerance.",
    )
    parser.add_argument("--ckpt", required=True, help="Megatron checkpoint root or directory")
    parser.add_argument("--hf", required=True, help="HF model directory")
    parser.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    parser.add_argument("--seq-length", type=int, default=32, help="tokens each (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="token seed (default 0)")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="max abs logit difference allowed (default 1e-3)")
    parser.add_argument("--min-cosine", type=float, default=0.9999,
                        help="min mean cosine of logit rows (default 0.9999)")
    parser.add_argument("--min-top1", type=float, default=0.99,
                        help="min share of positions with the same argmax (default 0.99)")
    args = parser.parse_args(argv)
    from .config import DotsConfigError
    from .convert.compare import compare
    from .storage.errors import CheckpointError

    try:
        result = compare(args.ckpt, args.hf, args.batch, args.seq_length, args.seed)
    except (CheckpointError, DotsConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = result.within(args.atol, args.min_cosine, args.min_top1)
    print(f"tokens {result.tokens}  max|diff| {result.max_abs_diff:.3e}  cosine "
          f"{result.cosine:.8f}  top-1 agreement {result.top1_agreement:.4f}  -> "
          f"{'OK' if ok else 'MISMATCH'} (atol {args.atol}, min cosine {args.min_cosine}, "
          f"min top-1 {args.min_top1})")
    return 0 if ok else 1


def _pretrain(argv) -> int:
    from .training.pretrain import main

    return main(argv)


def _sft(argv) -> int:
    from .sft.main import main

    return main(argv)


def _sft_preprocess(argv) -> int:
    from .sft.prepare_cli import main

    return main(argv)


def _preprocess(argv) -> int:
    from .data.preprocess import main

    return main(argv)


def _plot_experts(argv) -> int:
    from .telemetry.plots import main

    return main(argv)


def _simulate_schedule(argv) -> int:
    from .schedule.simulate_cli import main

    return main(argv)


def _analyze(argv) -> int:
    from .analysis.cli import main

    return main(argv)


def _verify(argv) -> int:
    from .storage.verify_cli import main

    return main(argv)


def _plan(argv) -> int:
    from .plan.cli import main

    return main(argv)


def _utk(argv) -> int:
    from .utk.cli import main

    return main(argv)


def _eval_long(argv) -> int:
    from .eval_long.cli import main

    return main(argv)


def _megatron_lm_args(argv) -> int:
    from .megatron_lm.native_flags import main

    return main(argv)


DTYPE_CHOICES = ("bf16", "fp16", "fp32")


COMMANDS = {
    "demo": (_demo, "the whole workflow on dots-tiny and local text: tokenizer, preprocess, "
             "pretrain + resume, heatmap, HF export, generation"),
    "info": (_info, "show a preset or HF config: shape and parameter counts"),
    "convert": (_convert, "hf-to-mcore / mcore-to-hf checkpoint conversion (streaming, CPU)"),
    "compare": (_compare, "logits of a Megatron checkpoint vs an HF model; exit 1 if they differ"),
    "verify": (_verify, "is a checkpoint intact? sizes (or CRC-32s with --full) against its "
               "manifest, and its structure"),
    "analyze": (_analyze, "experts: per-domain expert shares and specialization; "
                "ablate-shared: loss without the shared / routed experts"),
    "pretrain": (_pretrain, "train with Megatron-LM flags plus --dots-* (torchrun for many "
                 "processes)"),
    "sft": (_sft, "supervised fine-tuning on chat JSONL: loss on assistant tokens, "
            "variable-length micro-batches; pretrain's flags otherwise"),
    "sft-preprocess": (_sft_preprocess, "chat JSONL -> token ids + assistant loss masks with "
                       "the chat template (what sft caches)"),
    "preprocess": (_preprocess, "JSONL -> Megatron indexed dataset (.bin/.idx), multiprocess"),
    "utk": (_utk, "indexed dataset -> UtK long-context samples (chunked, knotted documents "
            "with markers and a backtracing target), .bin/.idx that pretrain reads"),
    "eval-long": (_eval_long, "passkey / multi-key retrieval at several lengths and depths "
                  "(CSV, JSON, heatmap PNG)"),
    "plot-experts": (_plot_experts, "expert-load CSV -> PNG heatmap (layer x expert), or with "
                     "--over-time each layer's max share and imbalance against iteration"),
    "megatron-lm-args": (_megatron_lm_args, "the native Megatron-LM flags of a preset (for "
                         "pretrain_gpt.py --spec megatron_dots.megatron_lm.spec dots_spec)"),
    "plan": (_plan, "will a layout fit, and how fast will it run: per-rank memory and step "
             "time of one layout, or --search over every layout on N GPUs"),
    "simulate-schedule": (_simulate_schedule, "step time, bubble and exposed all-to-all of "
                          "1F1B / interleaved / overlapped schedules from per-op times (PNG)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-dots COMMAND [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:12s} {help_text}")
        print("\n`megatron-dots COMMAND --help` describes a command's options.")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"megatron-dots: unknown command {argv[0]!r}; choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import megatron_dots  # noqa: F401  (compat patches before any megatron use)

    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
