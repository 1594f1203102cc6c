"""Building dots `GPTModel`s: one (virtual) pipeline stage, or every chunk this rank holds."""

from typing import List, Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from ..config import DotsConfig
from .specs import get_dots_decoder_block_spec


class DotsGPTModel(GPTModel):
    """Megatron-Core's GPTModel; its combined-1F1B schedule plans (the all-to-all overlap
    schedule, `overlap_moe_expert_parallel_comm`) fill each dots MoE layer's dispatch wait with
    its shared experts and delayed expert wgrad (`schedule/layer_plan.py`). The same holds when
    Megatron-LM's pretrain_gpt.py builds the plan."""

    def build_schedule_plan(self, *args, **kwargs):
        from ..schedule.layer_plan import adapt_layer_plans

        plan = super().build_schedule_plan(*args, **kwargs)
        adapt_layer_plans(plan)
        return plan


def build_dots_model(
    dots_config: DotsConfig,
    config=None,
    *,
    backend: str = "auto",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pg_collection=None,
    **transformer_overrides,
) -> DotsGPTModel:
    """Build the part of a dots model that this rank holds.

    `config` is a Megatron-Core `TransformerConfig`; by default it is made from `dots_config`
    with `transformer_overrides` (parallel sizes, precision...). Process groups default to
    Megatron-Core's global parallel state, which must be initialised first.
    """
    if config is None:
        config = dots_config.to_transformer_config(**transformer_overrides)
    elif transformer_overrides:
        raise TypeError("pass either a TransformerConfig or TransformerConfig overrides, not both")
    block_spec = get_dots_decoder_block_spec(config, backend=backend, vp_stage=vp_stage)
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    return DotsGPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=dots_config.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=dots_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=dots_config.rotary_base,
        vp_stage=vp_stage,
        **kwargs,
    )


def build_dots_model_chunks(
    dots_config: DotsConfig, config, *, backend: str = "auto"
) -> List[DotsGPTModel]:
    """The model chunks of this rank: one per virtual pipeline stage (one without VPP).

    Needs Megatron-Core's parallel state initialised with the same PP / VPP sizes as `config`.
    """
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    chunks = []
    for vp_stage in stages:
        chunks.append(
            build_dots_model(
                dots_config,
                config,
                backend=backend,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                vp_stage=vp_stage,
            )
        )
    return chunks
