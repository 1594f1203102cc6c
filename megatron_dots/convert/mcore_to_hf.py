"""`megatron-dots convert mcore-to-hf`: Megatron-Core torch_dist checkpoint -> HF dots1 directory.

Reads a checkpoint saved under any TP/PP/EP/VPP layout on CPU, one stored (global) tensor at a
time, and streams the HF tensors into pre-planned safetensors shards, so host memory is bounded
by the largest stored tensor (a layer's stacked experts), not the model. Writes config.json,
the shards, ``model.safetensors.index.json``, generation_config.json and the tokenizer files
kept with the checkpoint (``hf_assets/``) or given with --tokenizer; vocab padding is stripped
and the router's ``e_score_correction_bias`` is kept (in fp32).
"""

import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..config import DotsConfig, DotsConfigError
from ..storage.checkpoint_format import resolve_checkpoint_dir
from ..storage.atomic import atomic_directory
from .dist_layout import (
    Source,
    StoredTensor,
    full_shape,
    hf_shapes,
    is_glu_fc1,
    model_prefixed,
    stored_sources,
    stored_tensors,
)
from .dist_reader import DistCheckpointReader
from ..storage.errors import CheckpointError
from ..storage.manifest import write_manifest
from .hf_mapping import from_mcore
from .hf_to_mcore import ASSET_FILES, DTYPES, HF_ASSETS
from ..storage.progress import progress_bar
from .safetensors_stream import (
    SafetensorsStreamWriter,
    TensorSpec,
    parse_size,
    plan_shards,
    shard_names,
)

_BIAS_SUFFIX = "mlp.gate.e_score_correction_bias"


@dataclass
class CheckpointModel:
    """What a checkpoint holds: its config, vocab padding and where each tensor lies."""

    reader: DistCheckpointReader
    cfg: DotsConfig
    padded_vocab_size: int
    tensors: List[StoredTensor]
    sources: Dict[str, Source]
    dtypes: Dict[str, torch.dtype]


def _config(reader: DistCheckpointReader, common: Dict, config_path: Optional[str]) -> DotsConfig:
    common_file = os.path.join(reader.directory, "common.pt")
    if config_path:
        return DotsConfig.from_hf_config(config_path)
    stored = (common.get("dots") or {}).get("config")
    if stored is None:
        raise CheckpointError(common_file, "has no 'dots' entry with the model config (not "
                              "saved by megatron-dots?); pass --config CONFIG.json")
    try:
        return DotsConfig(**stored)
    except (TypeError, DotsConfigError) as err:
        raise CheckpointError(common_file, f"field 'dots.config': {err}") from None


def open_checkpoint(ckpt: str, config_path: Optional[str] = None) -> CheckpointModel:
    """Open and validate a checkpoint (root with tracker file, or a torch_dist directory)."""
    reader = DistCheckpointReader(resolve_checkpoint_dir(ckpt))
    cfg = _config(reader, reader.common_state(), config_path)
    metadata_file = os.path.join(reader.directory, ".metadata")
    stored = reader.tensors()
    shapes = {k: shape for k, (shape, _) in stored.items()}
    if "embedding.word_embeddings.weight" not in shapes:
        raise CheckpointError(metadata_file, "tensor 'embedding.word_embeddings.weight' is "
                              "missing (not a GPT model checkpoint?)")
    padded = shapes["embedding.word_embeddings.weight"][0]
    if padded < cfg.vocab_size:
        raise CheckpointError(metadata_file, f"embedding has {padded} rows, fewer than the "
                              f"config's vocab_size {cfg.vocab_size}")
    backend = ("te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in shapes)
               else "sequential")
    tensors = stored_tensors(cfg, padded, backend)
    sources, dtypes, used = {}, {}, set()
    for tensor in tensors:
        try:
            source = stored_sources(tensor, shapes)
        except KeyError:
            raise CheckpointError(metadata_file, f"tensor {tensor.key!r} is missing (the "
                                  f"config has {cfg.num_layers} layers, "
                                  f"{cfg.num_moe_experts} experts)") from None
        _check_shapes(tensor, source, cfg, padded, metadata_file)
        sources[tensor.key] = source
        dtypes[tensor.key] = stored[source.keys[0]][1]
        used.update(source.keys)
    unexpected = [k for k in model_prefixed(shapes) if k not in used]
    if unexpected:
        raise CheckpointError(metadata_file, f"unexpected model tensor {unexpected[0]!r} "
                              f"({len(unexpected)} in all): the checkpoint has more layers or "
                              "modules than its config describes")
    return CheckpointModel(reader, cfg, padded, tensors, sources, dtypes)


def _check_shapes(tensor: StoredTensor, source: Source, cfg: DotsConfig, padded: int,
                  metadata_file: str) -> None:
    if not source.singleton:
        (shape,) = source.shapes
        if shape == tensor.shape:
            return
        hint = ""
        if tensor.members[0].expert is not None and shape[1:] == tensor.shape[1:]:
            hint = (f": saved with {shape[0]} experts, the config has "
                    f"{cfg.num_moe_experts}")
        raise CheckpointError(metadata_file, f"tensor {tensor.key!r} has shape {list(shape)}, "
                              f"the config implies {list(tensor.shape)}{hint}")
    member_shape = full_shape(tensor.members[0].model_key, cfg, padded)
    if is_glu_fc1(tensor.key):
        member_shape = (member_shape[0] // 2,) + member_shape[1:]
    for key, shape in zip(source.keys, source.shapes):
        if shape != member_shape:
            raise CheckpointError(metadata_file, f"tensor {key!r} has shape {list(shape)}, the "
                                  f"config implies {list(member_shape)}")


def _member_tensors(model: CheckpointModel, tensor: StoredTensor):
    """Yield (model_key, full Megatron tensor) for each member, loading the stored data once."""
    source = model.sources[tensor.key]
    if not source.singleton:
        data = model.reader.load(tensor.key)
        for member in tensor.members:
            yield member.model_key, data if member.expert is None else data[member.expert]
        return
    step = 2 if is_glu_fc1(tensor.key) else 1
    for i, member in enumerate(tensor.members):
        parts = [model.reader.load(k) for k in source.keys[i * step:(i + 1) * step]]
        yield member.model_key, parts[0] if step == 1 else torch.cat(parts, dim=0)


def _hf_dtype(name: str, stored: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    if name.endswith(_BIAS_SUFFIX):
        return torch.float32
    return dtype or stored


def hf_tensor_plan(model: CheckpointModel, dtype: Optional[torch.dtype]) -> List[TensorSpec]:
    """Every HF tensor of the export, in the order it will be produced."""
    specs = []
    for tensor in model.tensors:
        for member in tensor.members:
            shapes = hf_shapes(member.model_key, model.cfg, model.padded_vocab_size)
            specs += [TensorSpec(name, shape, _hf_dtype(name, model.dtypes[tensor.key], dtype))
                      for name, shape in shapes.items()]
    return specs


def convert_mcore_to_hf(
    ckpt: str,
    out: str,
    dtype: Optional[str] = None,
    max_shard_size: str = "5GB",
    config_path: Optional[str] = None,
    tokenizer_dir: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Convert; returns `out`."""
    model = open_checkpoint(ckpt, config_path)
    torch_dtype = DTYPES[dtype] if dtype else None
    specs = hf_tensor_plan(model, torch_dtype)
    shards = plan_shards(specs, parse_size(max_shard_size))
    names = shard_names(len(shards))
    assets = tokenizer_dir or _assets_dir(ckpt, model.reader.directory)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with progress_bar(len(specs), "mcore-to-hf", unit="tensor", enabled=progress) as bar:
            _write_shards(model, shards, names, tmp, bar)
        weight_map = {spec.name: name for shard, name in zip(shards, names) for spec in shard}
        total_size = sum(spec.nbytes for spec in specs)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                      f, indent=2)
        main_dtype = torch_dtype or model.dtypes["embedding.word_embeddings.weight"]
        _write_configs(model.cfg, main_dtype, assets, tmp)
        write_manifest(tmp)
    return out


def _write_shards(model: CheckpointModel, shards, names, directory, bar) -> None:
    shard_iter = iter(zip(shards, names))

    def next_writer():
        shard, name = next(shard_iter)
        return SafetensorsStreamWriter(os.path.join(directory, name), shard)

    writer = next_writer()
    for tensor in model.tensors:
        for model_key, full in _member_tensors(model, tensor):
            for name, value in from_mcore(model_key, full, model.cfg).items():
                if writer.complete:
                    writer.close()
                    writer = next_writer()
                writer.write(name, value.to(writer.next_spec.dtype))
                bar.update()
    writer.close()


def _assets_dir(ckpt: str, checkpoint_dir: str) -> Optional[str]:
    for root in (ckpt, os.path.dirname(os.path.abspath(checkpoint_dir))):
        candidate = os.path.join(root, HF_ASSETS)
        if os.path.isdir(candidate):
            return candidate
    return None


_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _write_configs(cfg: DotsConfig, dtype: torch.dtype, assets: Optional[str], out: str):
    config = cfg.to_hf_config()
    config["torch_dtype"] = _DTYPE_NAMES.get(dtype, "float32")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copied = set()
    if assets:
        for name in ASSET_FILES:
            path = os.path.join(assets, name)
            if name != "config.json" and os.path.isfile(path):
                shutil.copy2(path, os.path.join(out, name))
                copied.add(name)
    if "generation_config.json" not in copied:
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        if cfg.pad_token_id is not None:
            generation["pad_token_id"] = cfg.pad_token_id
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
