"""Models and domains for the analysis tests: a planted-routing dots model, random tiny models,
token-range domains as indexed datasets, and the HF reference loss."""

import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path


def write_token_range_dataset(prefix: str, low: int, high: int, documents: int = 30,
                              seed: int = 0) -> str:
    """PREFIX.bin/.idx of documents (12..90 tokens) whose ids lie in [low, high)."""
    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=numpy.uint16)
    for _ in range(documents):
        doc = rng.integers(low, high, size=int(rng.integers(12, 90)))
        builder.add_item(torch.from_numpy(doc.astype(numpy.int64)))
        builder.end_document()
    builder.finalize(get_idx_path(prefix))
    return prefix


def plant_routing(model, cfg, a_experts=(0, 1), b_experts=(2, 3)) -> None:
    """Make `model` (transformers Dots1ForCausalLM) route tokens of the lower half of the
    vocabulary (domain A) to `a_experts` and of the upper half (domain B) to `b_experts` in
    every MoE layer, exactly.

    Attention and every MLP / expert output are zeroed, so the residual stream stays the token
    embedding in every layer; embedding dimension 0 is +1 for A tokens and -1 for B tokens (the
    rest is noise of 1e-2), and the routers' weights read only that dimension: +20 for A's
    experts, -20 for B's, 0 for the others. After the RMSNorm the gate logits are of order +-100,
    so the sigmoid scores are 1 for the domain's experts, ~0 for the other domain's and 0.5 for
    the rest; the expert bias is zero.
    """
    half = cfg.vocab_size // 2
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.copy_(torch.randn(embed.shape, generator=gen) * 1e-2)
        embed[:half, 0] = 1.0
        embed[half:, 0] = -1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            if not hasattr(mlp, "gate"):  # dense layer
                mlp.down_proj.weight.zero_()
                continue
            mlp.experts.down_proj.zero_()  # transformers 5: fused [E, H, I] parameter
            mlp.shared_experts.down_proj.weight.zero_()
            weight = mlp.gate.weight
            weight.zero_()
            weight[list(a_experts), 0] = 20.0
            weight[list(b_experts), 0] = -20.0
            mlp.gate.e_score_correction_bias.zero_()


def zero_shared_experts(model) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "shared_experts"):
                layer.mlp.shared_experts.down_proj.weight.zero_()


def zero_routed_experts(model) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.down_proj.zero_()


def hf_windows_loss(model, windows) -> float:
    """Mean next-token cross entropy of the HF model over every predicted position of the
    windows (each window on its own), in float64 accumulation."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.as_tensor(numpy.asarray(window), dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count
