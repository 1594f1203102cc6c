"""Grouped matrix multiplies for routed experts: torch's grouped GEMM with a portable fallback.

Two shapes occur in an expert MLP whose tokens are sorted by expert (group `g` owns rows
``offs[g-1]:offs[g]``):

* `grouped_linear(x, weight, offs)`: ``x [T, K]`` times each group's ``weight[g].T``
  (``weight [G, N, K]``, `torch.nn.Linear` layout) -> ``[T, N]`` (forward and dgrad);
* `grouped_weight_grad(dy, x, offs)`: per group ``dy_g.T @ x_g`` -> ``[G, N, K]`` (wgrad);
  a group without tokens gets zeros.

Both call ``torch.nn.functional.grouped_mm`` (else ``torch._grouped_mm``) when the kernel takes
the operands: CPU float32 / bfloat16 / float16; CUDA bfloat16 on compute capability >= 8.0; every
non-unit stride and the data pointers 16-byte aligned. Otherwise (float64, fp32 on CUDA,
unaligned dimensions, an older torch) they loop over the groups with ordinary matmuls, which is
slow but exact; `kernel_for` says which path a call takes. Should the kernel still refuse
operands that pass these checks (a GPU or torch build without it), the device and dtype are
remembered, a warning is logged once, and the loop is used from then on.
"""

import functools
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 16  # bytes
_REFUSED = set()  # (device type, dtype) where the kernel raised


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    if t.data_ptr() % _ALIGN:
        return False
    return all(stride == 1 or (stride * size) % _ALIGN == 0
               for stride, dim in zip(t.stride(), t.shape) if dim > 1)


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _device_ok(t: torch.Tensor) -> bool:
    if (t.device.type, t.dtype) in _REFUSED:
        return False
    if t.device.type == "cpu":
        return t.dtype in _CPU_DTYPES
    if t.device.type == "cuda":
        return t.dtype == torch.bfloat16 and _cuda_major(t.device.index) >= 8
    return False


def kernel_for(a: torch.Tensor, b: torch.Tensor) -> str:
    """``"grouped_mm"`` when torch's grouped GEMM takes these operands, else ``"loop"``."""
    if _GROUPED_MM is None or a.dtype != b.dtype or not _device_ok(a):
        return "loop"
    return "grouped_mm" if _aligned(a) and _aligned(b) else "loop"


def _try_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor):
    """torch's grouped GEMM, or None (remembered, warned once) if it refuses these operands."""
    try:
        return _GROUPED_MM(a, b, offs=offs)
    except RuntimeError as err:
        _REFUSED.add((a.device.type, a.dtype))
        logger.warning("torch grouped_mm refused %s %s operands (%s); using the per-expert "
                       "loop for them from now on (slower)", a.device.type, a.dtype, err)
        return None


def group_offsets(tokens_per_group: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Cumulative int32 end offsets of the groups, on `device` (what grouped_mm takes)."""
    return torch.cumsum(tokens_per_group.to(device=device, dtype=torch.int64), 0).to(torch.int32)


def _bounds(offs: torch.Tensor, counts: Optional[Sequence[int]]):
    if counts is None:
        counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
    start = 0
    for count in counts:
        yield start, start + count
        start += count


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor,
                   counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``cat_g(x[rows of g] @ weight[g].T)``; `x` [T, K], `weight` [G, N, K] -> [T, N].

    `counts` (the groups' token counts as Python ints) spares the loop path a device sync.
    Rows of `x` must all belong to a group (``offs[-1] == T``).
    """
    b = weight.transpose(-1, -2)
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    if kernel_for(x, b) == "grouped_mm":
        out = _try_grouped_mm(x, b, offs)
        if out is not None:
            return out
    out = x.new_empty(x.shape[0], weight.shape[1])
    for g, (lo, hi) in enumerate(_bounds(offs, counts)):
        if hi > lo:
            torch.matmul(x[lo:hi], b[g], out=out[lo:hi])
    return out


def grouped_weight_grad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor,
                        counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Per group ``dy[rows of g].T @ x[rows of g]``; `dy` [T, N], `x` [T, K] -> [G, N, K]."""
    groups = offs.numel()
    a = dy.t()
    if x.shape[0] > 0 and kernel_for(a, x) == "grouped_mm":
        out = _try_grouped_mm(a, x, offs)
        if out is not None:
            return out
    out = x.new_zeros(groups, dy.shape[1], x.shape[1])
    for g, (lo, hi) in enumerate(_bounds(offs, counts)):
        if hi > lo:
            torch.matmul(a[:, lo:hi], x[lo:hi], out=out[g])
    return out
