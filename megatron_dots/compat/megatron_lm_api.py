"""Megatron-LM's training-program API, per release (the `megatron.training` of a checkout).

* core_v0.16.x: `pretrain(datasets_provider, model_provider, model_type, forward_step,
  args_defaults=, extra_args_provider=, ...)` parses the flags itself and builds the model with
  `model_provider(builder, pre_process, post_process, vp_stage, config, pg_collection)`; the
  model config is `core_transformer_config_from_args(args)` plus GPT fields left in `args`.
* core_v0.19.x and main: the program parses (`parse_and_validate_args(extra_args_provider=)`),
  makes a `GPTModelConfig` (`gpt_config_from_args`, `model_config_cls=` for a subclass naming
  another builder class), a config container (`pretrain_cfg_container_from_args`) and calls
  `pretrain(container, datasets_provider, model_type, forward_step, ...)`; the builder class
  named by the config builds every stage.

The release is told by what `megatron.training` offers (`argument_utils.gpt_config_from_args`),
not by a version string: Megatron-LM itself has none besides its megatron-core's.
Only importable with a Megatron-LM checkout (its `megatron.training`) on `sys.path`.
"""

import types
import typing
from functools import partial

if not hasattr(typing, "override"):
    # core_v0.19+'s megatron/training/models/*.py import typing.override (Python 3.12+), a
    # decorator that only marks a method; megatron-dots runs on 3.10+, so give older Pythons
    # typing_extensions' identical one before megatron.training is imported.
    import typing_extensions

    typing.override = typing_extensions.override

from megatron.training import arguments as mlm_arguments  # noqa: E402

try:
    from megatron.training.argument_utils import gpt_config_from_args  # noqa: F401
    HAS_CONFIG_CONTAINER = True
except ImportError:  # core_v0.16: no such module
    HAS_CONFIG_CONTAINER = False

ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # pretrain_gpt.py's


def model_config_from_args(args):
    """Megatron-LM's model config for parsed `args`: its `GPTModelConfig` where the release has
    one, else a view with the same GPT fields around `core_transformer_config_from_args`."""
    if HAS_CONFIG_CONTAINER:
        return gpt_config_from_args(args)
    return types.SimpleNamespace(
        transformer=mlm_arguments.core_transformer_config_from_args(args),
        vocab_size=args.padded_vocab_size,
        seq_length=args.max_position_embeddings,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
    )


def parse_args(extra_args_provider):
    """Megatron-LM's parse + validate (+ global variables on core_v0.19+), as pretrain does."""
    if HAS_CONFIG_CONTAINER:
        return mlm_arguments.parse_and_validate_args(
            extra_args_provider=extra_args_provider, args_defaults=ARGS_DEFAULTS)
    args = mlm_arguments.parse_args(extra_args_provider=extra_args_provider)
    mlm_arguments.validate_args(args, ARGS_DEFAULTS)
    return args


def run_pretrain(pretrain_gpt, extra_args_provider, build_stage, check_args):
    """Run Megatron-LM's training program (`pretrain_gpt`, its module) with our flags and model.

    build_stage(args, pre_process, post_process, vp_stage, config, pg_collection) builds one
    model stage; check_args(args) runs on the parsed flags before any process group exists.
    """
    from megatron.training import inprocess_restart

    provider = pretrain_gpt.train_valid_test_datasets_provider
    setattr(provider, "is_distributed", True)  # as pretrain_gpt.py's __main__
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain_gpt.pretrain)
    args = parse_args(extra_args_provider)
    check_args(args)  # before pretrain initialises any process group
    if not HAS_CONFIG_CONTAINER:  # core_v0.16: pretrain parses the flags again itself
        pretrain(provider, partial(pretrain_gpt.model_provider, build_stage),
                 pretrain_gpt.ModelType.encoder_or_decoder, pretrain_gpt.forward_step,
                 args_defaults=ARGS_DEFAULTS, extra_args_provider=extra_args_provider,
                 store=store, get_embedding_ranks=pretrain_gpt.get_embedding_ranks)
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    DotsGPTModelBuilder.build_stage = staticmethod(build_stage)
    model_cfg = gpt_config_from_args(args, model_config_cls=DotsGPTModelConfig)
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), provider,
             pretrain_gpt.ModelType.encoder_or_decoder, pretrain_gpt.forward_step,
             store=store, get_embedding_ranks=pretrain_gpt.get_embedding_ranks)


if HAS_CONFIG_CONTAINER:
    from megatron.core.pipeline_parallel.utils import (
        is_pp_first_stage, is_pp_last_stage, is_vp_first_stage, is_vp_last_stage,
    )
    from megatron.training.global_vars import get_args
    from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

    class DotsGPTModelBuilder(GPTModelBuilder):
        """Megatron-LM's GPT builder building each stage with `build_stage` (our model)."""

        build_stage = None  # set by run_pretrain (or a test) before building

        def build_model(self, pg_collection, pre_process=None, post_process=None,
                        vp_stage=None):
            vp_size = self._model_config.transformer.virtual_pipeline_model_parallel_size
            if pre_process is None:
                pre_process = (is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size)
                               and is_pp_first_stage(pg_collection.pp))
            if post_process is None:
                post_process = (is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size)
                                and is_pp_last_stage(pg_collection.pp))
            return type(self).build_stage(get_args(), pre_process, post_process, vp_stage,
                                          self._model_config.transformer, pg_collection)

    class DotsGPTModelConfig(GPTModelConfig):
        """A `GPTModelConfig` whose builder is `DotsGPTModelBuilder`."""

        builder = f"{__name__}.DotsGPTModelBuilder"
