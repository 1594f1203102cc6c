"""Supervised fine-tuning on chat conversations (`megatron-dots sft`, `sft-preprocess`).

`conversations` reads the JSONL, `chat_format` tokenizes with the chat template and marks the
assistant tokens, `prepare` caches token ids and loss masks, `batching` orders the samples and
builds variable-length micro-batches, `feed` gives them to the training loop
(`training.loop.train`, shared with pretraining), `assets` keeps the tokenizer and template
with the checkpoints, `arguments` / `main` / `prepare_cli` are the commands.
"""
