"""Megatron-Core <-> Hugging Face dots1: name/layout mapping and TP/EP sharding."""
