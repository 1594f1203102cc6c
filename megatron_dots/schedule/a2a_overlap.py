"""`--dots-a2a-overlap`: the interleaved 1F1B whose steady state overlaps the expert all-to-all
of one micro-batch with the compute of another.

We run Megatron-Core's combined 1F1B (`pipeline_parallel/combined_1f1b.py`, turned on by
`TransformerConfig.overlap_moe_expert_parallel_comm`): one extra warmup micro-batch, then each
steady-state step runs the forward of micro-batch k+w and the backward of micro-batch k layer by
layer, issuing one's dispatch / combine all-to-all on the communication stream while the other
computes (PP=1 uses the same pairing with no pipeline). On top of it, for dots models:

* shared experts run while their own dispatch all-to-all is in flight, and delayed expert
  weight gradients while the dispatch backward is (`layer_plan.py`, applied by
  `model.builder.DotsGPTModel.build_schedule_plan`);
* delayed weight gradients (`delay_wgrad_compute`) work on the TE-free path: our grouped experts
  compute their wgrad in `backward_dw()`, and the local linear layers, which cannot defer,
  compute theirs in backward (runtime patch 5 gives 0.16.1's `RowParallelLinear` the no-op
  `backward_dw`);
* fp32 models are allowed (upstream asserts bf16/fp16; nothing in the schedule needs it, and the
  CPU correctness tests compare fp32 runs);
* 0.16.1's skipped gradient-sync launch for model chunk 0 is fixed (runtime patch 4);
* the input-aware recompute planner (`--dots-recompute-budget-gb`) runs with it: it plans with
  the recompute the layer nodes honour (core attention; a dense layer's MLP), in this
  schedule's order, and calibrates on the plain schedule (`recompute/controller.py`).

`enable_a2a_overlap(config)` validates and sets the two config fields; call it before the model
is built (the experts read `delay_wgrad_compute` at construction) and wrap DDP with
`DistributedDataParallelConfig(delay_wgrad_compute=...)` to match.
"""

from typing import List, Optional

__all__ = ["A2AOverlapError", "a2a_overlap_problems", "config_problems", "enable_a2a_overlap"]


class A2AOverlapError(ValueError):
    """The configuration cannot run the all-to-all overlap schedule; the message says why."""


def a2a_overlap_problems(*, expert_parallel: int, pipeline_parallel: int = 1,
                         virtual_pipeline: Optional[int] = None, dispatcher: str = "alltoall",
                         recompute_granularity: Optional[str] = None,
                         recompute_method: Optional[str] = None,
                         shared_expert_overlap: bool = False,
                         mtp_num_layers: Optional[int] = None,
                         autocast: bool = False) -> List[str]:
    """Why a layout / config cannot use the overlap schedule; empty if it can. Each message
    names the Megatron-LM flag (and the TransformerConfig field)."""
    problems = []
    if expert_parallel < 2:
        problems.append("it overlaps the expert-parallel all-to-all, so it needs "
                        "--expert-model-parallel-size > 1 (expert_model_parallel_size is "
                        f"{expert_parallel})")
    if pipeline_parallel > 1 and not (virtual_pipeline and virtual_pipeline > 1):
        problems.append("with --pipeline-model-parallel-size > 1 it runs on the interleaved "
                        "schedule: set --num-layers-per-virtual-pipeline-stage "
                        "(virtual_pipeline_model_parallel_size >= 2)")
    if dispatcher not in ("alltoall", "flex"):
        problems.append("it needs --moe-token-dispatcher-type alltoall or flex "
                        f"(moe_token_dispatcher_type is {dispatcher!r})")
    if recompute_granularity == "full" or recompute_method is not None:
        problems.append("full-layer recompute (--recompute-granularity full, "
                        "--recompute-method) is not supported: the schedule runs each layer as "
                        "separate nodes")
    if shared_expert_overlap:
        problems.append("--moe-shared-expert-overlap (moe_shared_expert_overlap) must be off: "
                        "the schedule overlaps the shared experts with the dispatch itself")
    if mtp_num_layers not in (None, 0, 1):
        problems.append(f"at most one multi-token-prediction layer (--mtp-num-layers "
                        f"{mtp_num_layers})")
    if autocast:
        problems.append("enable_autocast is not supported")
    return problems


def config_problems(config) -> List[str]:
    """`a2a_overlap_problems` of a Megatron-Core TransformerConfig."""
    return a2a_overlap_problems(
        expert_parallel=config.expert_model_parallel_size,
        pipeline_parallel=config.pipeline_model_parallel_size,
        virtual_pipeline=config.virtual_pipeline_model_parallel_size,
        dispatcher=config.moe_token_dispatcher_type,
        recompute_granularity=config.recompute_granularity,
        recompute_method=config.recompute_method,
        shared_expert_overlap=config.moe_shared_expert_overlap,
        mtp_num_layers=config.mtp_num_layers,
        autocast=getattr(config, "enable_autocast", False),
    )


def enable_a2a_overlap(config, delay_wgrad: bool = False):
    """Turn the overlap schedule on in `config` (in place; returned for chaining); with
    `delay_wgrad` the experts' weight gradients are deferred to fill the all-to-all waits.
    Raises A2AOverlapError listing every problem."""
    problems = config_problems(config)
    if problems:
        raise A2AOverlapError("--dots-a2a-overlap: " + "; ".join(problems))
    # Set after TransformerConfig.__post_init__: upstream's checks are the ones above plus a
    # bf16/fp16-only assertion that dots lifts (fp32 runs the same code).
    config.overlap_moe_expert_parallel_comm = True
    config.delay_wgrad_compute = bool(delay_wgrad)
    return config
