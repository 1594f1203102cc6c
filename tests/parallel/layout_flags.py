"""Parallel-layout flags of the torchrun workers and the Megatron-Core sizes they mean (the same
keyword names for `initialize_model_parallel` and `TransformerConfig`)."""


def add_layout_flags(parser) -> None:
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None, help="expert TP (default: = TP)")
    parser.add_argument("--sp", action="store_true", help="sequence parallel (MoE with TP needs it)")


def layout_sizes(args) -> dict:
    return dict(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp,
    )
