"""The model an analysis runs: a Megatron checkpoint (`--ckpt`) or a Hugging Face directory
(`--hf`), built as this rank's pipeline stage of a TP / PP / EP layout and filled with its
weights, for forward passes only.

A torch_dist checkpoint is loaded with Megatron-Core dist_checkpointing (any saved layout
into any layout, as training resumes). An HF directory is streamed tensor by tensor into this
rank's shards (`convert.hf_mapping` builds each full Megatron tensor from its HF tensors,
`convert.sharding` cuts this rank's piece), so no converted copy is written and host memory
stays at a few tensors.
"""

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..config import DotsConfig, DotsConfigError
from ..storage.errors import CheckpointError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of an analysis run; data parallel takes the remaining ranks."""

    tp: int = 1
    pp: int = 1
    ep: int = 1


@dataclass
class LoadedModel:
    """This rank's model stage, its configs and where it came from."""

    cfg: DotsConfig
    config: object  # megatron.core TransformerConfig
    chunk: torch.nn.Module
    source: str
    config_file: str
    device: torch.device

    @property
    def moe_layers(self) -> List[int]:
        """1-based numbers of the model's MoE layers (all of them, not only this stage's)."""
        return self.cfg.moe_layer_numbers


def read_model_config(ckpt: Optional[str], hf: Optional[str]):
    """(DotsConfig, the file it came from) of `--ckpt` or `--hf`, after the directory's
    integrity and structure checks; refuses a dense-only model. Reads no weights."""
    if (ckpt is None) == (hf is None):
        raise ValueError("give exactly one of --ckpt and --hf")
    cfg, config_file = _model_config(ckpt, hf)
    _check_moe(cfg, config_file)
    return cfg, config_file


def _model_config(ckpt: Optional[str], hf: Optional[str]):
    if hf is not None:
        from ..convert.compare import check_hf_directory

        check_hf_directory(hf)  # integrity, and a config and tensors our reader accepts
        return DotsConfig.from_hf_config(hf), os.path.join(hf, "config.json")
    from ..convert.mcore_to_hf import open_checkpoint

    opened = open_checkpoint(ckpt)
    return opened.cfg, os.path.join(opened.reader.directory, "common.pt")


def _check_moe(cfg: DotsConfig, config_file: str) -> None:
    if not cfg.num_moe_experts or not cfg.moe_layer_numbers:
        raise CheckpointError(config_file, f"describes a dense model (num_moe_experts "
                              f"{cfg.num_moe_experts}, {cfg.first_k_dense} of "
                              f"{cfg.num_layers} layers dense): there are no experts to analyse")


def load_model(ckpt: Optional[str], hf: Optional[str], layout: Layout, dtype: str,
               backend: str = "auto", model_config=None) -> LoadedModel:
    """Initialise torch.distributed and Megatron-Core's parallel state for `layout`, build
    this rank's stage and load its weights; eval mode. `model_config`: what
    `read_model_config` returned, if already called."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ..compat.distributed import default_device, init_distributed
    from ..model import build_dots_model_chunks

    cfg, config_file = model_config or read_model_config(ckpt, hf)
    flags = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
             "ep": "--expert-model-parallel-size"}
    try:
        cfg.check_parallel_layout(layout.tp, layout.pp, layout.ep, flags=flags)
    except DotsConfigError as err:
        raise ValueError(str(err)) from None
    init_distributed()
    world = torch.distributed.get_world_size()
    if world % (layout.tp * layout.pp) or (world // layout.pp) % layout.ep:
        raise ValueError(f"{world} processes cannot hold --tensor-model-parallel-size "
                         f"{layout.tp} x --pipeline-model-parallel-size {layout.pp} with "
                         f"--expert-model-parallel-size {layout.ep}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep)
    else:  # a caller (a test, a notebook) set up the parallel state: it must match
        current = Layout(parallel_state.get_tensor_model_parallel_world_size(),
                         parallel_state.get_pipeline_model_parallel_world_size(),
                         parallel_state.get_expert_model_parallel_world_size())
        if current != layout:
            raise ValueError(f"Megatron-Core's parallel state is already initialised as "
                             f"{current}, the analysis asks for {layout}")
    model_parallel_cuda_manual_seed(0)
    dtype_value = DTYPES[dtype]
    device = default_device()
    config = cfg.to_transformer_config(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, sequence_parallel=layout.tp > 1,
        bf16=dtype == "bf16", params_dtype=dtype_value, pipeline_dtype=dtype_value,
        # gloo: batched isend/irecv corrupts activations under PP (see DESIGN.md).
        batch_p2p_comm=torch.cuda.is_available())
    (chunk,) = build_dots_model_chunks(cfg, config, backend=backend)
    chunk = chunk.to(device)
    if hf is not None:
        load_hf_weights(chunk, hf, cfg)
    else:
        from ..training.checkpointing import load_checkpoint

        load_checkpoint([chunk], ckpt, load_rng=False)
    if dtype == "bf16":
        from megatron.core.transformer.module import Float16Module

        chunk = Float16Module(config, chunk)
    chunk.eval()
    return LoadedModel(cfg, config, chunk, ckpt or hf, config_file, device)


def load_hf_weights(chunk: torch.nn.Module, hf_dir: str, cfg: DotsConfig) -> None:
    """Fill this rank's shards from the HF directory, one full tensor at a time."""
    from megatron.core import parallel_state

    from ..convert.hf_mapping import MappingError, hf_sources, to_mcore
    from ..convert.hf_reader import HFCheckpoint
    from ..convert.sharding import load_shards

    padded = cfg.padded_vocab_size(parallel_state.get_tensor_model_parallel_world_size())
    reader = HFCheckpoint(hf_dir)

    def full_tensor(key: str, local_key: str) -> torch.Tensor:
        try:
            return to_mcore(key, [reader.get(s) for s in hf_sources(key)], cfg, padded)
        except MappingError as err:
            raise CheckpointError(hf_dir, str(err)) from None

    try:
        load_shards(chunk, full_tensor)
    except CheckpointError:  # a missing or unreadable tensor, named by the reader
        raise
    except ValueError as err:  # a shard of another shape: config.json and weights disagree
        raise CheckpointError(os.path.join(hf_dir, "config.json"),
                              f"does not match the weights: {err}") from None
    finally:
        reader.close()


def add_layout_options(parser, data_parallel_note: str = "") -> None:
    """The flags `load_model` takes (layout, dtype, expert backend), for the commands that load
    a model under any layout (`analyze`, `eval-long`)."""
    parser.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1,
                        metavar="N", help="tensor parallel size (torchrun; default 1)")
    parser.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int,
                        default=1, metavar="N", help="pipeline parallel size (default 1)")
    parser.add_argument("--expert-model-parallel-size", "--ep", dest="ep", type=int, default=1,
                        metavar="N", help="expert parallel size (default 1); data parallel "
                        "takes the remaining ranks" + data_parallel_note)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="weights and activations (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--expert-backend", default="auto",
                        choices=("auto", "te", "grouped", "sequential"),
                        help="expert implementation (default auto: TE grouped GEMM when "
                        "installed, else torch grouped_mm on GPU, else sequential)")
