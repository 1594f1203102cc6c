"""`megatron-dots compare`: the same tokens through a Megatron checkpoint and an HF model.

The Megatron model is built from the checkpoint's config in one process (TP=PP=EP=1) and
loaded with Megatron-Core dist_checkpointing, as training would; the HF model is loaded with
transformers. Both run in fp32 on CPU (or the GPU when present). Reports the max absolute
logit difference, the mean cosine similarity of the logit rows and top-1 agreement.
"""

from dataclasses import dataclass

import torch

from ..config import DotsConfig
from ..storage.errors import CheckpointError
from ..storage.verify import verify_directory
from .hf_reader import HFCheckpoint
from .mcore_to_hf import open_checkpoint


@dataclass
class Comparison:
    max_abs_diff: float
    cosine: float
    top1_agreement: float
    tokens: int

    def within(self, atol: float, min_cosine: float, min_top1: float) -> bool:
        return (self.max_abs_diff <= atol and self.cosine >= min_cosine
                and self.top1_agreement >= min_top1)


def megatron_logits(ckpt: str, cfg: DotsConfig, tokens: torch.Tensor,
                    device: torch.device) -> torch.Tensor:
    """Logits [b, s, vocab] (padding stripped) of the checkpoint's model (config `cfg`), one
    process."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ..compat.distributed import init_distributed
    from ..model import build_dots_model
    from ..training.checkpointing import load_checkpoint

    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    model = build_dots_model(cfg, params_dtype=torch.float32).to(device)
    load_checkpoint([model], ckpt)
    model.eval()
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens.to(device), positions, None)
    return logits[..., : cfg.vocab_size].float().cpu()


def check_hf_directory(hf_dir: str) -> None:
    """`CheckpointError` naming the file unless `hf_dir` is an intact dots1 HF directory: sizes
    against its manifest, structure, and a config and tensors our reader accepts."""
    verdict = verify_directory(hf_dir, "hf")
    if not verdict.intact:
        raise verdict.damage[0]
    HFCheckpoint(hf_dir).close()


def hf_logits(hf_dir: str, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                     attn_implementation="eager")
    except Exception as err:  # noqa: BLE001 - transformers' errors vary; name the directory
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise CheckpointError(hf_dir, f"transformers cannot load it ({type(err).__name__}: "
                              f"{lines[0] if lines else ''})") from err
    model = model.to(device).eval()
    with torch.no_grad():
        return model(tokens.to(device)).logits.float().cpu()


def compare(ckpt: str, hf_dir: str, batch: int = 2, seq_length: int = 32,
            seed: int = 0) -> Comparison:
    """Run both models on the same random tokens and compare their logits."""
    check_hf_directory(hf_dir)
    cfg = open_checkpoint(ckpt).cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_length), generator=gen)
    ours = megatron_logits(ckpt, cfg, tokens, device)
    theirs = hf_logits(hf_dir, tokens, device)
    if ours.shape != theirs.shape:
        raise ValueError(f"logit shapes differ: Megatron {tuple(ours.shape)}, "
                         f"Hugging Face {tuple(theirs.shape)} (different vocab?)")
    flat_a, flat_b = ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1])
    return Comparison(
        max_abs_diff=(flat_a - flat_b).abs().max().item(),
        cosine=torch.nn.functional.cosine_similarity(flat_a.double(), flat_b.double(),
                                                     dim=-1).mean().item(),
        top1_agreement=(flat_a.argmax(-1) == flat_b.argmax(-1)).float().mean().item(),
        tokens=flat_a.shape[0],
    )
