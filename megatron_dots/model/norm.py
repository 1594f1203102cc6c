"""`DotsRMSNorm`: RMSNorm for the TE-free path, sequence-parallel aware.

Megatron-Core's torch fallback (`WrappedTorchNorm`) refuses sequence parallelism; this norm
accepts it by marking its weight `sequence_parallel` so `finalize_model_grads` sums the weight
gradient over the tensor-parallel group (as it does for TE norms). The arithmetic matches
Hugging Face's `Dots1RMSNorm`: normalise in fp32, cast back, then scale. The normalisation is
`torch.nn.functional.rms_norm` (torch's fused kernel where it has one; on CPU the same operations
as the written-out formula, bit for bit).
"""

import torch
import torch.nn.functional as F


class DotsRMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension with a learnt scale."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.config = config
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
