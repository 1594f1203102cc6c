"""Independent references for the tests: a random tiny HF Dots1ForCausalLM and float64 math."""

import torch

from megatron_dots import DotsConfig
from megatron_dots.convert import hf_mapping


def tiny_config(**overrides) -> DotsConfig:
    """dots-tiny with small-vocab defaults suited to fast CPU tests."""
    return DotsConfig.preset("dots-tiny", **overrides)


def make_hf_model(cfg: DotsConfig, seed: int = 0, bias_scale: float = 0.0):
    """A transformers Dots1ForCausalLM with random, non-trivial weights (fp32, eval mode).

    Norm weights are drawn around 1 and the expert bias (e_score_correction_bias) uniformly in
    [-bias_scale, bias_scale], so every tensor of the mapping matters.
    """
    from transformers import Dots1Config, Dots1ForCausalLM

    hf_cfg = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    gen = torch.Generator().manual_seed(seed)
    model = Dots1ForCausalLM(Dots1Config(**hf_cfg, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.08)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                bias = (torch.rand(module.e_score_correction_bias.shape, generator=gen) * 2 - 1)
                module.e_score_correction_bias.copy_(bias * bias_scale)
    return model


def hf_state_dict(model):
    """On-disk (per-expert) HF state dict of an in-memory transformers model."""
    return hf_mapping.unfuse_hf_experts(model.state_dict())


def mcore_full_state(model, cfg: DotsConfig, tp: int = 1):
    """Full Megatron state dict (sequential backend names) of an HF model."""
    return hf_mapping.hf_to_mcore(hf_state_dict(model), cfg, cfg.padded_vocab_size(tp))


def hf_gate_float64(hidden, weight, bias, topk, scaling):
    """HF Dots1TopkRouter math in float64: (weights [T, k], indices [T, k])."""
    scores = torch.sigmoid(hidden.double() @ weight.double().t())
    chosen = torch.topk(scores + bias.double(), k=topk, dim=-1).indices
    weights = scores.gather(1, chosen)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * scaling
    return weights, chosen
