"""Run `megatron-dots analyze` commands one after another in one torchrun process group
(torchrun worker): the arguments are megatron-dots command lines separated by `--then`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_dots.cli import main  # noqa: E402

if __name__ == "__main__":
    commands, current = [], []
    for arg in sys.argv[1:]:
        if arg == "--then":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for command in commands:
        rc = main(command)
        if rc:
            sys.exit(rc)
