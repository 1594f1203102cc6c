"""`megatron-dots pretrain` / `examples/pretrain_dots.py`: parse, validate, train (and the
entry logic `megatron-dots sft` shares).

The flags are validated before anything is started (no process group, no model), so a bad
combination fails at once with a message naming the flags, on every rank alike.
"""

import os
import sys
from typing import List, Optional

from .arguments import ArgumentError, parse_args


def main(argv: Optional[List[str]] = None) -> int:
    from .loop import pretrain

    return run_training_main(argv, parse_args, pretrain)


def run_training_main(argv: Optional[List[str]], parse, run) -> int:
    """Parse with `parse(argv, world_size)`, start torch.distributed, `run(args)`; errors
    become one line and exit code 2 (1 when another rank was lost). Shared by pretrain and
    sft."""
    import megatron_dots  # noqa: F401  (compat patches before any megatron use)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parse(argv, world_size)
    except ArgumentError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    from ..compat.distributed import init_distributed, lost_peer
    from ..config import DotsConfigError
    from ..storage.errors import CheckpointError, DataFileError
    from ..data.tokenizer import TokenizerError
    from .numerics import NumericalFault

    import torch

    init_distributed(args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes)
    try:
        result = run(args)
    except (ArgumentError, CheckpointError, DataFileError, DotsConfigError,
            NumericalFault, TokenizerError) as err:
        if torch.distributed.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        # Another rank died (gloo: at once) or hung (after --distributed-timeout-minutes): one
        # line per surviving rank instead of a traceback each; the launcher sees the failure.
        peer = lost_peer(err)
        if peer is None:
            raise
        print(f"error: rank {torch.distributed.get_rank()}: lost contact with another rank "
              f"({peer}); it exited or stopped responding, see its log. Restart from the last "
              "checkpoint (--load)", file=sys.stderr, flush=True)
        return 1
    if torch.distributed.get_rank() == 0:
        print(f" training ended at iteration {result.iteration} after "
              f"{result.seconds:.1f} s" + (" (signal)" if result.stopped_by_signal else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
