"""Counting the bytes autograd keeps for backward, per layer and per module region.

`SavedBytes` is a `torch.autograd.graph.saved_tensors_hooks` pair that records, for every tensor
saved for backward, the bytes of its storage, once per storage and never for parameters
(weights saved by matmuls are not activations). This works on any device, so the memory model
is fitted and checked on CPU exactly as on GPU.

Bytes go to the region open when the tensor is saved: `(layer, region)` where region is
`attn_core` (the core attention module), `mlp` (dense MLP or MoE block), `rest` (the rest of
the layer), `input` (what a whole-layer checkpoint keeps) or `(None, "outside")` for the
embedding, final norm, output layer and loss. Module inputs (`core_in`, `mlp_in`), which a
module-level checkpoint keeps instead of the module's internals, are recorded from the
module's arguments (the storages not already kept).
"""

from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterable, Optional, Tuple

import torch

OUTSIDE = (None, "outside")

_ACTIVE: list = []  # counters whose `counting()` block is open, innermost last


def active_counter() -> Optional["SavedBytes"]:
    """The innermost counter that is counting now, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def _storage_key(tensor: torch.Tensor) -> Optional[Tuple[str, int, int]]:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # no plain storage (e.g. a tensor subclass): not counted
    return (str(tensor.device), storage.data_ptr(), storage.nbytes())


def tensor_bytes(value, already=frozenset()) -> int:
    """Bytes of the tensors in a (nested) argument, one count per storage, leaving out the
    storages in `already`."""
    seen = set(already)
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            key = _storage_key(item)
            if key is not None and key not in seen:
                seen.add(key)
                total += key[2]
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return total


class SavedBytes:
    """Bytes saved for backward per (layer, region); see the module docstring."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._exclude = {_storage_key(p) for p in parameters}
        self._exclude.discard(None)
        self._seen = set()
        self._regions = [OUTSIDE]
        self.bytes: Dict[Tuple[Optional[int], str], int] = defaultdict(int)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None and key not in self._seen and key not in self._exclude:
            self._seen.add(key)
            self.bytes[self._regions[-1]] += key[2]
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @contextmanager
    def counting(self):
        """Count what is saved for backward inside this block."""
        _ACTIVE.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            _ACTIVE.pop()

    def fork(self) -> "SavedBytes":
        """A counter with the same excluded parameters and nothing seen yet (to measure one
        layer on its own, e.g. during its recomputation)."""
        other = SavedBytes()
        other._exclude = self._exclude
        return other

    def merge(self, other: "SavedBytes") -> None:
        for key, n in other.bytes.items():
            self.bytes[key] += n

    @contextmanager
    def region(self, layer: Optional[int], name: str):
        self._regions.append((layer, name))
        try:
            yield
        finally:
            self._regions.pop()

    def record_inputs(self, layer: int, name: str, value) -> None:
        """Record under (layer, name) the bytes a checkpoint of a module called with `value`
        would add: its tensors' storages that nothing saved so far keeps."""
        self.bytes[(layer, name)] += tensor_bytes(value, self._seen | self._exclude)

    @property
    def current_layer(self) -> Optional[int]:
        return self._regions[-1][0]

    def layer_bytes(self, layer: int) -> Dict[str, int]:
        return {name: n for (lay, name), n in self.bytes.items() if lay == layer}

    def total(self) -> int:
        """Bytes saved during the forward (module inputs from `record_inputs` excluded)."""
        return sum(n for (_, name), n in self.bytes.items() if name not in RECORDED)


# Regions filled by `record_inputs` (argument sizes), not by saved tensors.
RECORDED = ("core_in", "mlp_in")
