"""Megatron-LM's own training program with the whole dots experience, no edit of Megatron-LM.

    MEGATRON_LM_DIR=/path/to/Megatron-LM torchrun ... -m megatron_dots.megatron_lm.launch \\
        --dots-model dots.llm1 <pretrain_gpt.py flags>

Runs the checkout's `pretrain_gpt.py` (its data, forward step, loss and `pretrain()`: training
loop, checkpointing, logging) on every supported release (`compat.megatron_lm_api`), with:
`--dots-model PRESET` as the default of Megatron-LM's model flags and the `--dots-*` flags
(`arguments.add_dots_args`), their validation before any process group exists, and the model
built by `build_dots_model` (`DotsGPTModel`, whose combined-1F1B layer plans overlap the
all-to-all with shared experts under `--overlap-moe-expert-parallel-comm`), checked after
building (`guard`).

The checkout is `MEGATRON_LM_DIR`, else the directory of a `pretrain_gpt.py` on `sys.path`.
Its `megatron/core` must be the one imported (Megatron-LM pairs each release with its own):
when the checkout is not on the path yet, the launcher re-executes itself with it in front of
PYTHONPATH; a different megatron-core still being imported is an error naming both versions.
"""

import os
import re
import sys
from typing import List, Optional

ENV = "MEGATRON_LM_DIR"


class LaunchError(RuntimeError):
    """The launcher cannot run Megatron-LM as asked; the message says what to change."""


def locate_megatron_lm(environ=os.environ) -> str:
    """The Megatron-LM checkout to run."""
    candidates = [environ[ENV]] if environ.get(ENV) else [p for p in sys.path if p]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
            return os.path.abspath(path)
    if environ.get(ENV):
        raise LaunchError(f"{ENV}={environ[ENV]} has no pretrain_gpt.py: point it at the root "
                          "of a Megatron-LM checkout")
    raise LaunchError(f"no Megatron-LM checkout: set {ENV}=/path/to/Megatron-LM")


def checkout_core_version(mlm_dir: str) -> Optional[str]:
    """The megatron-core version a checkout carries (its megatron/core/package_info.py)."""
    path = os.path.join(mlm_dir, "megatron", "core", "package_info.py")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        text = handle.read()
    parts = {k: v for k, v in re.findall(r"^(MAJOR|MINOR|PATCH)\s*=\s*(\d+)", text, re.M)}
    return ".".join(parts[k] for k in ("MAJOR", "MINOR", "PATCH")) if len(parts) == 3 else None


def check_pairing(mlm_dir: str) -> None:
    """The imported megatron-core must be the checkout's own."""
    import megatron.core

    loaded = os.path.dirname(os.path.abspath(megatron.core.__file__))
    if os.path.commonpath([loaded, mlm_dir]) != mlm_dir:
        raise LaunchError(
            f"Megatron-LM at {mlm_dir} (megatron-core {checkout_core_version(mlm_dir)}) would run "
            f"with megatron-core {megatron.core.__version__} from {loaded}: Megatron-LM's "
            "training code needs its own megatron/core. Put the checkout first on PYTHONPATH.")


def build_stage(args, pre_process=True, post_process=True, vp_stage=None, config=None,
                pg_collection=None):
    """One model stage for Megatron-LM's pretrain: the dots model, checked."""
    from megatron.training.arguments import core_transformer_config_from_args

    from .arguments import dots_model_provider
    from .guard import check_dots_modules

    if config is None:
        config = core_transformer_config_from_args(args)
    model = dots_model_provider(args, pre_process, post_process, vp_stage, config=config,
                                pg_collection=pg_collection)
    check_dots_modules(model)
    return model


def check_args(args) -> None:
    """The parsed flags describe a dots model (before any process group exists)."""
    from .arguments import DotsArgumentError, validate_dots_args

    if not getattr(args, "dots_model", None):
        raise DotsArgumentError("the megatron-dots launcher needs --dots-model PRESET")
    validate_dots_args(args)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not any(a == "--dots-model" or a.startswith("--dots-model=") for a in argv) and not (
                {"-h", "--help"} & set(argv)):
            raise LaunchError("the megatron-dots launcher needs --dots-model PRESET (for "
                              "native flags use pretrain_gpt.py --spec "
                              "megatron_dots.megatron_lm.spec dots_spec)")
        mlm_dir = locate_megatron_lm()
        if mlm_dir not in [os.path.abspath(p) for p in sys.path if p]:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [mlm_dir] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
            os.execve(sys.executable, [sys.executable, "-m", __name__, *argv], env)
        check_pairing(mlm_dir)
        sys.argv = [os.path.join(mlm_dir, "pretrain_gpt.py"), *argv]
        from ..compat.megatron_lm_api import run_pretrain  # first: it readies megatron.training
        from .arguments import DotsArgumentError, add_dots_args

        import pretrain_gpt
    except LaunchError as err:
        print(f"megatron-dots launch: error: {err}", file=sys.stderr)
        return 2
    try:
        run_pretrain(pretrain_gpt, add_dots_args, build_stage, check_args)
    except DotsArgumentError as err:
        print(f"megatron-dots launch: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
