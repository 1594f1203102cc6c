"""`SAVE/hf_assets/` of an SFT run: the tokenizer it trained with, carrying the chat template
it used (the tokenizer's own, or the ChatML fallback written in), so that `megatron-dots convert
mcore-to-hf --ckpt SAVE` exports a directory that chats through transformers'
`apply_chat_template` + `generate` without further files. A `generation_config.json` of the
starting checkpoint's own `hf_assets/` (what `convert hf-to-mcore` keeps) is carried over."""

import os
import shutil
from typing import Optional

from ..convert.hf_to_mcore import HF_ASSETS
from ..storage.atomic import atomic_directory


def save_chat_assets(save_dir: str, chat_format, start_checkpoint: Optional[str] = None) -> str:
    """Write `save_dir/hf_assets/` (replacing it); returns its path."""
    target = os.path.join(save_dir, HF_ASSETS)
    tokenizer = chat_format.tokenizer._backend
    tokenizer.chat_template = chat_format.template
    os.makedirs(save_dir, exist_ok=True)
    with atomic_directory(target, overwrite=True) as tmp:
        if start_checkpoint:
            generation = os.path.join(start_checkpoint, HF_ASSETS, "generation_config.json")
            if os.path.isfile(generation):
                shutil.copy(generation, tmp)
        tokenizer.save_pretrained(tmp)
    return target
