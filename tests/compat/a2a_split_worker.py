"""Worker (2 ranks, gloo): megatron-core all_to_all with tensor split sizes, unpatched vs patched.

Shows runtime patch 2 (``megatron/core/tensor_parallel/mappings.py:_AllToAll.forward``):
``MoEAlltoAllTokenDispatcher`` leaves its split sizes as torch tensors on CPU, and
``torch.distributed.all_to_all_single`` rejects tensors.
Writes ``<out>/rank<r>.json``.
"""

import json
import os
import sys

import torch

out_dir = sys.argv[1]
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
group = torch.distributed.group.WORLD

# Importing megatron_dots applies the runtime patches and (no CUDA) the CPU backend. To show the
# defect, temporarily put the upstream _AllToAll.forward back (the CPU backend is still needed:
# upstream allocates the output on torch.cuda.current_device()).
import megatron_dots  # noqa: E402,F401
from megatron.core.tensor_parallel import mappings  # noqa: E402
from megatron.core.tensor_parallel.mappings import all_to_all  # noqa: E402
from megatron_dots.compat.runtime_patches import apply_runtime_patches  # noqa: E402

apply_runtime_patches()
patched_forward = mappings._AllToAll.forward
assert getattr(patched_forward, "__megatron_dots_patched__", False)

# rank 0 sends 2 rows to rank 0 and 4 to rank 1; rank 1 sends 3 and 3.
input_splits = [2, 4] if rank == 0 else [3, 3]
output_splits = [2, 3] if rank == 0 else [4, 3]
x = (torch.arange(6, dtype=torch.float32) + 10 * rank).unsqueeze(1).repeat(1, 2)
x.requires_grad_(True)

result = {"rank": rank}
mappings._AllToAll.forward = staticmethod(patched_forward.__wrapped_original__)  # upstream
try:
    all_to_all(group, x, torch.tensor(output_splits), torch.tensor(input_splits))
    result["unpatched"] = "ok"
except Exception as exc:  # expected: TypeError from all_to_all_single
    result["unpatched"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
finally:
    mappings._AllToAll.forward = staticmethod(patched_forward)
torch.distributed.barrier()

expected = all_to_all(group, x.detach(), output_splits, input_splits)
outs = {}
for kind, conv in {
    "tensor": torch.tensor,
    "numpy": lambda v: __import__("numpy").array(v),
    "list": list,
}.items():
    y = all_to_all(group, x, conv(output_splits), conv(input_splits))
    y.sum().backward()  # backward all_to_all reuses the (converted) split sizes
    outs[kind] = {
        "equal": bool(torch.equal(y.detach(), expected)),
        "grad_ok": bool(torch.equal(x.grad, torch.ones_like(x))),
    }
    x.grad = None
result["patched"] = outs
result["expected"] = expected[:, 0].tolist()
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Leave without the interpreter's teardown: gloo's worker threads, torn down by static
# destructors at exit, occasionally abort the process ("terminate called without an active
# exception") after all the work above is done and written.
sys.stdout.flush()
os._exit(0)
