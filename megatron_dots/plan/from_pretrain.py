"""Between `pretrain` command lines and plans: the layout a `pretrain` command line runs (its
flags parsed and validated as `pretrain` does; with --dots-batch-stages, the largest global
batch), and the model flags that make `pretrain` build a planned model."""

from typing import List, Tuple

from ..config import PRESETS, DotsConfig
from ..training import arguments
from .layout import Layout


def layout_from_pretrain_flags(argv: List[str], gpus: int) -> Tuple[DotsConfig, Layout]:
    """(model, layout) of `megatron-dots pretrain ARGV` on `gpus` GPUs; raises what pretrain's
    own validation raises for bad flags."""
    args = arguments.build_parser().parse_args(argv)
    arguments.validate_args(args, world_size=gpus)
    cfg = args.dots_config
    stages = getattr(args, "batch_stages", None)
    global_batch = (max(s.global_batch_size for s in stages) if stages
                    else args.global_batch_size)
    precision = "bf16" if args.bf16 else "fp16" if getattr(args, "fp16", False) else "fp32"
    layout = Layout(
        gpus=gpus, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        vpp=arguments.virtual_pipeline_size(args, cfg.num_layers) or 1,
        ep=args.expert_model_parallel_size, micro_batch_size=args.micro_batch_size,
        global_batch_size=global_batch, seq_length=args.seq_length,
        sequence_parallel=bool(args.sequence_parallel),
        distributed_optimizer=bool(args.use_distributed_optimizer),
        overlap_grad_reduce=bool(args.overlap_grad_reduce), precision=precision,
        a2a_overlap=bool(args.dots_a2a_overlap), delay_wgrad=bool(args.delay_wgrad_compute),
        recompute_budget_gib=args.dots_recompute_budget_gb)
    return cfg, layout.check(cfg)


def model_flags(cfg: DotsConfig) -> List[str]:
    """`--dots-model PRESET` (the preset of the same architecture; else dots.llm1 with the
    differing fields as pretrain's model flags). The vocabulary comes from the tokenizer."""
    ours = {k: v for k, v in cfg.architecture().items() if k != "vocab_size"}
    for name in PRESETS:
        preset = DotsConfig.preset(name).architecture()
        if all(preset.get(k) == v for k, v in ours.items()):
            return ["--dots-model", name]
    base = DotsConfig.preset("dots.llm1")
    flags = ["--dots-model", "dots.llm1"]
    for field, (flag, _) in arguments.MODEL_FLAGS.items():
        if getattr(cfg, field) != getattr(base, field):
            flags += [flag, str(getattr(cfg, field))]
    return flags
