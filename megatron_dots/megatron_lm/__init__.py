"""megatron-dots inside Megatron-LM's own training program (`pretrain_gpt.py`).

Three ways in, one per kind of user (README, "Megatron-LM"):

* `launch` -- `python -m megatron_dots.megatron_lm.launch <pretrain_gpt.py flags>`: Megatron-LM's
  own training loop, data and checkpointing, unedited, on every supported release, with
  `--dots-model`, the `--dots-*` flags and `DotsGPTModel` (the all-to-all overlap layer plan).
* `spec` -- `pretrain_gpt.py --spec megatron_dots.megatron_lm.spec dots_spec` (core_v0.19.x and
  main, no edit of Megatron-LM): our block spec on Megatron-LM's stock `GPTModel`, the model
  described by native flags (`megatron-dots megatron-lm-args PRESET`, `native_flags`).
* the core_v0.16.1 patch (`patches/`), whose hooks live in `arguments`: `add_dots_args`,
  `dots_model_provider`.

`model_config` reads a Megatron-LM model config back into a `DotsConfig` (naming the flag of
every field that cannot describe a dots model); `guard` checks that a built model holds our
modules. Release differences of Megatron-LM's training API are in `compat.megatron_lm_api`.
"""

from .arguments import (  # noqa: F401  (the core_v0.16.1 patch imports these names from here)
    MEGATRON_LM_TAG, DotsArgumentError, add_dots_args, check_transformer_config,
    dots_config_from_args, dots_model_provider, validate_dots_args,
)

__all__ = [
    "MEGATRON_LM_TAG", "DotsArgumentError", "add_dots_args", "dots_config_from_args",
    "validate_dots_args", "check_transformer_config", "dots_model_provider",
]
