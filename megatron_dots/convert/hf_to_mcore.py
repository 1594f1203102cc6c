"""`megatron-dots convert hf-to-mcore`: HF dots1 safetensors -> Megatron-Core torch_dist checkpoint.

Streams: each Megatron tensor is built from its HF tensors when the file writer reaches it, so
host memory stays at a few tensors whatever the model size. The result is a Megatron-LM style
``release`` checkpoint (model weights only) that loads under any TP/PP/EP/VPP layout; the
layout given here sets the vocab padding and is checked against the model's shape.
"""

import os
import shutil
from typing import Dict, List, Optional

import torch

from ..config import DotsConfig
from ..storage.checkpoint_format import RELEASE, TRACKER, dots_common_state, iteration_dir
from ..storage.atomic import atomic_directory, atomic_write_text
from .dist_layout import StoredTensor, extra_state_keys, hf_shapes, stored_tensors
from .dist_writer import Chunk, PickledObject, write_dist_checkpoint
from ..storage.errors import CheckpointError
from ..storage.manifest import write_manifest
from .hf_mapping import hf_sources, to_mcore
from .hf_reader import HFCheckpoint
from ..storage.progress import progress_bar

HF_ASSETS = "hf_assets"
# Files copied from the HF directory so that an export can restore them.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
               "merges.txt", "special_tokens_map.json", "added_tokens.json",
               "generation_config.json", "chat_template.jinja", "config.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def expected_hf_tensors(cfg: DotsConfig, tensors: List[StoredTensor],
                        padded_vocab_size: int) -> Dict[str, tuple]:
    """HF name -> shape for every HF tensor the model needs."""
    out = {}
    for tensor in tensors:
        for member in tensor.members:
            out.update(hf_shapes(member.model_key, cfg, padded_vocab_size))
    return out


def _check_hf_tensors(hf: HFCheckpoint, expected: Dict[str, tuple]) -> None:
    present = hf.keys()
    unexpected = [k for k in present if k not in expected]
    if unexpected:
        shard, _ = hf.where(unexpected[0])
        raise CheckpointError(
            os.path.join(hf.directory, shard),
            f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) for the shape in "
            f"config.json ({hf.config.num_layers} layers, {hf.config.num_moe_experts} experts)")
    for name, shape in expected.items():
        with_shape = hf.get_shape(name)  # raises on a missing tensor
        if with_shape != shape:
            shard, _ = hf.where(name)
            raise CheckpointError(os.path.join(hf.directory, shard),
                                  f"tensor {name!r} has shape {list(with_shape)}, config.json "
                                  f"implies {list(shape)}")


def _producer(hf: HFCheckpoint, cfg: DotsConfig, model_key: str, padded: int, expert: bool):
    def produce():
        sources = hf_sources(model_key)
        full = to_mcore(model_key, [hf.get(s) for s in sources], cfg, padded)
        return full.unsqueeze(0) if expert else full

    return produce


def _chunks(hf: HFCheckpoint, cfg: DotsConfig, tensor: StoredTensor, padded: int,
            dtype: Optional[torch.dtype]) -> List[Chunk]:
    chunks = []
    for member in tensor.members:
        stored_dtype = hf.get_dtype(hf_sources(member.model_key)[0])
        chunk_dtype = (torch.float32 if member.model_key.endswith("router.expert_bias")
                       else dtype or stored_dtype)
        if member.expert is None:
            offsets, sizes = (0,) * len(tensor.shape), tensor.shape
        else:
            offsets = (member.expert,) + (0,) * (len(tensor.shape) - 1)
            sizes = (1,) + tensor.shape[1:]
        chunks.append(Chunk(tensor.key, tensor.shape, offsets, sizes, chunk_dtype,
                            _producer(hf, cfg, member.model_key, padded,
                                      member.expert is not None)))
    return chunks


def convert_hf_to_mcore(
    hf_dir: str,
    out: str,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: Optional[int] = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Convert; returns the written torch_dist directory (OUT/release)."""
    hf = HFCheckpoint(hf_dir)
    cfg = hf.config
    cfg.check_parallel_layout(tp, pp, ep, vpp,
                              flags={"tp": "--tp", "pp": "--pp", "ep": "--ep", "vpp": "--vpp"})
    if os.path.exists(os.path.join(out, TRACKER)) and not overwrite:
        raise FileExistsError(f"{out}: already holds a checkpoint ({TRACKER}); pass "
                              "--overwrite to replace it")
    padded = cfg.padded_vocab_size(tp)
    tensors = stored_tensors(cfg, padded)
    _check_hf_tensors(hf, expected_hf_tensors(cfg, tensors, padded))

    groups: List[List[Chunk]] = [[]]
    layer = None
    for tensor in tensors:
        if tensor.layer != layer and groups[-1]:
            groups.append([])  # one data file per transformer layer
        layer = tensor.layer
        groups[-1].extend(_chunks(hf, cfg, tensor, padded, DTYPES.get(dtype)))
    objects = [PickledObject(k, None) for k in extra_state_keys(cfg)]
    common = dots_common_state(cfg, padded, {"tp": tp, "pp": pp, "ep": ep, "vpp": vpp or 1},
                               converted_from=os.path.abspath(hf_dir))

    total = sum(len(g) for g in groups)
    with progress_bar(total, "hf-to-mcore", unit="tensor", enabled=progress) as bar:
        with atomic_directory(iteration_dir(out, RELEASE), overwrite=overwrite) as tmp:
            write_dist_checkpoint(tmp, groups, objects, common, on_chunk=lambda _: bar.update())
            write_manifest(tmp)
        _copy_assets(hf_dir, os.path.join(out, HF_ASSETS))
        atomic_write_text(os.path.join(out, TRACKER), RELEASE)
    hf.close()
    return iteration_dir(out, RELEASE)


def _copy_assets(hf_dir: str, target: str) -> None:
    names = [n for n in ASSET_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    with atomic_directory(target, overwrite=True) as tmp:
        for name in names:
            shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, name))
