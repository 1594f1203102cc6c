"""init_distributed: one-process worlds without torchrun leave the environment alone."""

import json

from launch import describe, python_snippet


def test_single_process_world_does_not_touch_the_environment():
    code = (
        "import json, os, torch\n"
        "from megatron_dots.compat.distributed import init_distributed\n"
        "for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'): os.environ.pop(k, None)\n"
        "first = init_distributed(); again = init_distributed()\n"
        "print(json.dumps([first, again, torch.distributed.get_world_size(),\n"
        "      sorted(k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k in os.environ)]))\n"
    )
    proc = python_snippet(code)
    assert proc.returncode == 0, describe(proc)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, False, 1, []]
