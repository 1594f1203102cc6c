"""Lazy reader of a Hugging Face dots1 checkpoint directory (safetensors, sharded or not).

Tensors are memory-mapped and read one at a time. Both on-disk expert layouts are accepted:
one tensor per expert (``mlp.experts.{e}.gate_proj.weight`` ..., what transformers writes and
the released dots.llm1 checkpoints use) and transformers-5's fused in-memory names
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]), read per expert.
"""

import json
import os
import re
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

from ..config import DotsConfig, DotsConfigError
from .errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}
_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")


class HFCheckpoint:
    """The tensors and config.json of one HF model directory."""

    def __init__(self, directory: str):
        self.directory = directory
        if not os.path.isdir(directory):
            raise CheckpointError(directory, "no such Hugging Face model directory")
        try:
            self.config = DotsConfig.from_hf_config(directory)
        except DotsConfigError as err:
            raise CheckpointError(os.path.join(directory, "config.json"), str(err)) from None
        self._files = self._weight_map()
        self._handles: Dict[str, object] = {}

    def _weight_map(self) -> Dict[str, str]:
        index = os.path.join(self.directory, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (KeyError, ValueError) as err:
                    raise CheckpointError(index, f"no readable 'weight_map' ({err})") from None
            for name, shard in weight_map.items():
                if not os.path.isfile(os.path.join(self.directory, shard)):
                    raise CheckpointError(index, f"shard {shard!r} (for {name!r}) is missing "
                                          f"from {self.directory}")
            return dict(weight_map)
        single = os.path.join(self.directory, SINGLE)
        if not os.path.isfile(single):
            raise CheckpointError(self.directory, f"has neither {INDEX} nor {SINGLE}")
        with safe_open(single, "pt") as f:
            return {name: SINGLE for name in f.keys()}

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.directory, shard), "pt")
        return self._handles[shard]

    def keys(self) -> List[str]:
        """Stored tensor names, fused expert tensors expanded to per-expert names."""
        out = []
        for name in self._files:
            fused = self._fused_members(name)
            out.extend(fused if fused else [name])
        return out

    def _fused_members(self, name: str) -> List[str]:
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$", name)
        if not m:
            return []
        kinds = ("down",) if m.group(2) == "down_proj" else ("gate", "up")
        return [f"{m.group(1)}{e}.{k}_proj.weight"
                for e in range(self.config.num_moe_experts) for k in kinds]

    def where(self, name: str) -> Tuple[str, str]:
        """(shard file, stored name) holding `name`."""
        if name in self._files:
            return self._files[name], name
        m = _PER_EXPERT.match(name)
        if m:
            fused = m.group(1) + ("down_proj" if m.group(3) == "down" else "gate_up_proj")
            if fused in self._files:
                return self._files[fused], fused
        where = INDEX if os.path.isfile(os.path.join(self.directory, INDEX)) else SINGLE
        raise CheckpointError(os.path.join(self.directory, where), f"tensor {name!r} is missing")

    def get_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor (read from the file header only)."""
        shard, stored = self.where(name)
        code = self._handle(shard).get_slice(stored).get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(os.path.join(self.directory, shard),
                                  f"tensor {stored!r} has unsupported dtype {code}")
        return _DTYPES[code]

    def get_shape(self, name: str) -> Tuple[int, ...]:
        """The stored shape of a tensor (per expert for fused expert tensors)."""
        shard, stored = self.where(name)
        shape = tuple(self._handle(shard).get_slice(stored).get_shape())
        if stored == name:
            return shape
        return (shape[1] // 2,) + shape[2:] if stored.endswith("gate_up_proj") else shape[1:]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype."""
        shard, stored = self.where(name)
        handle = self._handle(shard)
        if stored == name:
            return handle.get_tensor(name)
        m = _PER_EXPERT.match(name)
        expert, kind = int(m.group(2)), m.group(3)
        fused = handle.get_slice(stored)
        if kind == "down":
            return fused[expert:expert + 1][0]
        rows = fused.get_shape()[1] // 2
        lo = 0 if kind == "gate" else rows
        return fused[expert:expert + 1, lo:lo + rows][0]

    def close(self):
        self._handles.clear()
