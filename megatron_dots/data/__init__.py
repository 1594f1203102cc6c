"""Data preparation: tokenizers, and JSONL -> Megatron indexed datasets (preprocess)."""

from .preprocess import DatasetStats, PreprocessError, PreprocessResult, preprocess
from .tokenizer import DotsTokenizer, TokenizerError, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DatasetStats", "DotsTokenizer", "PreprocessError", "PreprocessResult", "TokenizerError",
    "load_tokenizer", "preprocess", "train_bpe_tokenizer",
]
