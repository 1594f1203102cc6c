"""`examples/pretrain_dots.py` that also reports what the recompute planner did, for the
length-stage tests: `length_stage_worker.py --planner-json FILE PRETRAIN_FLAGS...` runs
`megatron-dots pretrain` with the flags and, with `--dots-recompute-budget-gb`, writes the
planner's activation budget (bytes) and its per-step records (calibration, modes, predicted and
measured saved-tensor peaks) to FILE at the end.
"""

import json
import sys

from megatron_dots.training import loop
from megatron_dots.training.pretrain import main

_controllers = []
_build_recompute = loop.build_recompute


def _capturing_build_recompute(args, config, chunks):
    controller = _build_recompute(args, config, chunks)
    _controllers.append(controller)
    return controller


if __name__ == "__main__":
    argv = sys.argv[1:]
    out = None
    if argv[:1] == ["--planner-json"]:
        out, argv = argv[1], argv[2:]
    loop.build_recompute = _capturing_build_recompute
    code = main(argv)
    if out and _controllers and _controllers[0] is not None:
        controller = _controllers[0]
        with open(out, "w") as handle:
            json.dump({"budget": controller.planner.budget, "history": controller.history},
                      handle, default=str)
    sys.exit(code)
