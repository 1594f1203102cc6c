"""Chat data for the SFT tests: a tiny byte-level BPE tokenizer with ChatML special tokens and
a chat template, and conversations whose user turns are noise and whose replies are fixed."""

import json
import os
import random

from megatron_dots.data.tokenizer import train_bpe_tokenizer

REPLY = "The answer is always forty two."
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone "
         "cloud green blue seven three quick slow north south").split()

# Qwen-style ChatML: what a real HF tokenizer directory carries in tokenizer_config.json.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer(path: str, vocab_size: int, template: str = CHATML_TEMPLATE) -> str:
    """A BPE tokenizer of at most `vocab_size` ids with <|im_start|> / <|im_end|> as special
    tokens and `template` (None: none) as its chat template."""
    from transformers import AutoTokenizer

    texts = [REPLY] * 20 + [" ".join(WORDS)] * 20 + ["user assistant system"] * 10
    base = train_bpe_tokenizer(texts, path + ".base", vocab_size=vocab_size - 2)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    assert len(tokenizer) <= vocab_size
    return path


def noise_conversation(rng: random.Random, turns: int = 1):
    """User turns of random words (noise), assistant replies always REPLY."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "Be brief."})
    for _ in range(turns):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
        messages.append({"role": "user", "content": " ".join(words)})
        messages.append({"role": "assistant", "content": REPLY})
    return {"messages": messages}


def write_conversations(path: str, count: int, seed: int = 0, max_turns: int = 2) -> str:
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        for _ in range(count):
            handle.write(json.dumps(noise_conversation(rng, rng.randint(1, max_turns))) + "\n")
    return path
