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


COMMANDS = {
    "demo": (_demo, "train dots-tiny on local text on CPU/GPU and check it against transformers"),
    "info": (_info, "show a preset or HF config: shape and parameter counts"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-dots COMMAND [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:8s} {help_text}")
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
