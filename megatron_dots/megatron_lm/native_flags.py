"""The native Megatron-LM flags of a dots model (`megatron-dots megatron-lm-args PRESET`).

Every dots.llm1 architecture setting has a Megatron-LM flag, so Megatron-LM's stock
`pretrain_gpt.py` describes the model with these alone; `--spec megatron_dots.megatron_lm.spec
dots_spec` then builds it from our modules. `model_config.dots_config_from_model_config` reads
Megatron-LM's resulting config back into the same DotsConfig (tested against Megatron-LM's own
parser on every supported release).

Vocabulary: `--padded-vocab-size` fixes the embedding rows to the model's (the preset's
vocabulary padded like our checkpoints at the given TP), whatever the tokenizer's size.
Every word is free of spaces and quotes, so `$(megatron-dots megatron-lm-args PRESET)` splits
into the right words in a shell.
"""

from typing import List

from ..config import DotsConfig


def _number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def moe_layer_freq_expression(cfg: DotsConfig) -> str:
    """`--moe-layer-freq` as Megatron-LM's list expression: k dense layers, then MoE."""
    moe = cfg.num_layers - cfg.first_k_dense
    if cfg.first_k_dense == 0:
        return "1"
    return f"([0]*{cfg.first_k_dense}+[1]*{moe})" if moe else f"([0]*{cfg.first_k_dense})"


def megatron_lm_flags(cfg: DotsConfig, tensor_model_parallel_size: int = 1) -> List[str]:
    """The Megatron-LM command-line words (flag, value, ...) that describe `cfg`."""
    if float(int(cfg.rotary_base)) != cfg.rotary_base:
        raise ValueError(f"rotary_base {cfg.rotary_base} is not an integer; Megatron-LM's "
                         "--rotary-base takes an int")
    words = [
        "--num-layers", cfg.num_layers,
        "--hidden-size", cfg.hidden_size,
        "--ffn-hidden-size", cfg.ffn_hidden_size,
        "--num-attention-heads", cfg.num_attention_heads,
        "--group-query-attention", "--num-query-groups", cfg.num_query_groups,
        "--kv-channels", cfg.kv_channels,
        "--max-position-embeddings", cfg.max_position_embeddings,
        "--position-embedding-type", "rope",
        "--rotary-base", int(cfg.rotary_base),
        "--rotary-percent", 1.0,
        "--normalization", "RMSNorm",
        "--norm-epsilon", cfg.norm_epsilon,
        "--qk-layernorm",
        "--swiglu",
        "--disable-bias-linear",
        *(["--add-qkv-bias"] if cfg.attention_bias else []),
        "--untie-embeddings-and-output-weights",
        "--init-method-std", cfg.init_method_std,
        "--hidden-dropout", 0.0,
        "--attention-dropout", 0.0,
        "--num-experts", cfg.num_moe_experts,
        "--moe-ffn-hidden-size", cfg.moe_ffn_hidden_size,
        "--moe-router-topk", cfg.moe_router_topk,
        "--moe-layer-freq", moe_layer_freq_expression(cfg),
        *(["--moe-shared-expert-intermediate-size", cfg.shared_expert_intermediate_size]
          if cfg.num_shared_experts else []),
        "--moe-router-score-function", "sigmoid",
        "--moe-router-enable-expert-bias",
        "--moe-router-bias-update-rate", cfg.bias_update_rate,
        "--moe-router-topk-scaling-factor", cfg.routed_scaling_factor,
        "--moe-router-dtype", "fp32",
        "--moe-router-load-balancing-type", "seq_aux_loss" if cfg.seq_aux_loss_coeff else "none",
        *(["--moe-aux-loss-coeff", cfg.seq_aux_loss_coeff] if cfg.seq_aux_loss_coeff else []),
        "--moe-token-dispatcher-type", "alltoall",
        "--make-vocab-size-divisible-by", cfg.make_vocab_size_divisible_by,
        "--padded-vocab-size", cfg.padded_vocab_size(tensor_model_parallel_size),
    ]
    return [w if isinstance(w, str) else _number(w) for w in words]


def main(argv=None) -> int:
    """`megatron-dots megatron-lm-args PRESET`: print the flags (one line, or one per line)."""
    import argparse
    import sys

    from ..config import PRESETS, DotsConfigError

    parser = argparse.ArgumentParser(
        prog="megatron-dots megatron-lm-args",
        description="Print the native Megatron-LM flags of a dots model, for Megatron-LM's own "
                    "pretrain_gpt.py: python pretrain_gpt.py $(megatron-dots megatron-lm-args "
                    "dots.llm1) --spec megatron_dots.megatron_lm.spec dots_spec ...")
    parser.add_argument("preset", help=f"preset name ({', '.join(sorted(PRESETS))}) or a HF "
                        "model directory / config.json")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="TP",
                        help="the run's TP size; the vocabulary is padded to a multiple of "
                             "--make-vocab-size-divisible-by x TP as in our checkpoints "
                             "(default: 1)")
    parser.add_argument("--lines", action="store_true",
                        help="one word per line (for `mapfile -t`), instead of one line")
    args = parser.parse_args(argv)
    if args.tensor_model_parallel_size < 1:
        parser.error("--tensor-model-parallel-size must be at least 1")
    try:
        cfg = (DotsConfig.preset(args.preset) if args.preset in PRESETS
               else DotsConfig.from_hf_config(args.preset))
        words = megatron_lm_flags(cfg, args.tensor_model_parallel_size)
    except (DotsConfigError, ValueError) as err:
        print(f"megatron-dots megatron-lm-args: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(words) if args.lines else " ".join(words))
    return 0
