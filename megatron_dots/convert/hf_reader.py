"""Lazy reader of a Hugging Face dots1 checkpoint directory (safetensors, sharded or not).

Tensors are read one at a time with plain file reads into a fresh buffer (no memory map: the
pages of a mapped shard stay in the process's RSS for as long as the mapping lives, which made
a conversion's RSS grow to the checkpoint's size). Both on-disk expert layouts are accepted:
one tensor per expert (``mlp.experts.{e}.gate_proj.weight`` ..., what transformers writes and
the released dots.llm1 checkpoints use) and transformers-5's fused in-memory names
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]), read per expert.
"""

import os
import re
from typing import Dict, List, Tuple

import torch

from ..config import DotsConfig, DotsConfigError
from ..storage.errors import CheckpointError
from ..storage.safetensors_file import SafetensorsFile
from ..storage.structure import HF_INDEX, HF_SINGLE, read_hf_weight_map

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
        self._headers: Dict[str, SafetensorsFile] = {}
        self._files = self._weight_map()
        self._check_fused_expert_counts()

    def _weight_map(self) -> Dict[str, str]:
        index = os.path.join(self.directory, HF_INDEX)
        if os.path.isfile(index):
            weight_map = read_hf_weight_map(index)
            for name, shard in weight_map.items():
                if not os.path.isfile(os.path.join(self.directory, shard)):
                    raise CheckpointError(index, f"shard {shard!r} (for {name!r}) is missing "
                                          f"from {self.directory}")
            return dict(weight_map)
        single = os.path.join(self.directory, HF_SINGLE)
        if not os.path.isfile(single):
            raise CheckpointError(self.directory, f"has neither {HF_INDEX} nor {HF_SINGLE}")
        return {name: HF_SINGLE for name in self._header(HF_SINGLE)}

    def _check_fused_expert_counts(self) -> None:
        for name, shard in self._files.items():
            if self._fused_members(name):
                shape = self._stored(name)[0].shape(name)
                experts = shape[0] if shape else 0
                if experts != self.config.num_moe_experts:
                    raise CheckpointError(
                        os.path.join(self.directory, shard),
                        f"tensor {name!r} holds {experts} experts, config.json says "
                        f"n_routed_experts={self.config.num_moe_experts}")

    def _header(self, shard: str) -> SafetensorsFile:
        if shard not in self._headers:
            self._headers[shard] = SafetensorsFile(os.path.join(self.directory, shard))
        return self._headers[shard]

    def _stored(self, name: str) -> Tuple[SafetensorsFile, str]:
        """The file holding tensor `name` (or its fused expert tensor) and its stored name."""
        shard, stored = self.where(name)
        file = self._header(shard)
        if stored not in file:
            raise CheckpointError(file.path, f"tensor {stored!r} is missing (the index "
                                  f"{HF_INDEX} places it in this file)")
        return file, stored

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
        where = HF_INDEX if os.path.isfile(os.path.join(self.directory, HF_INDEX)) else HF_SINGLE
        raise CheckpointError(os.path.join(self.directory, where), f"tensor {name!r} is missing")

    def get_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor (read from the file header only)."""
        file, stored = self._stored(name)
        return file.dtype(stored)

    def get_shape(self, name: str) -> Tuple[int, ...]:
        """The stored shape of a tensor (per expert for fused expert tensors)."""
        file, stored = self._stored(name)
        shape = file.shape(stored)
        if stored == name:
            return shape
        return (shape[1] // 2,) + shape[2:] if stored.endswith("gate_up_proj") else shape[1:]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype."""
        file, stored = self._stored(name)
        if stored == name:
            return file.read(stored, 0, file.shape(stored))
        m = _PER_EXPERT.match(name)
        expert, kind = int(m.group(2)), m.group(3)
        shape = file.shape(stored)
        per_expert = 1
        for dim in shape[1:]:
            per_expert *= dim
        if kind == "down":
            return file.read(stored, expert * per_expert, shape[1:])
        half = (shape[1] // 2,) + shape[2:]
        start = expert * per_expert + (0 if kind == "gate" else per_expert // 2)
        return file.read(stored, start, half)

    def close(self):
        self._headers.clear()
