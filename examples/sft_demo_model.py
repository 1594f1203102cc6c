"""Supervised fine-tuning of the demo's model into a (very small) assistant, on CPU, in a few
minutes: the whole SFT path of `megatron-dots sft`.

    megatron-dots demo --out DEMO
    python examples/sft_demo_model.py DEMO [--steps 150]

1. conversations (DEMO/sft/chat.jsonl): "What does json.dumps do?" -> the first sentence of its
   docstring, for the functions and classes of the modules the demo pretrained on;
2. a copy of the demo's tokenizer with a chat template (DEMO/sft/tokenizer): `User: ...` /
   `Assistant: ...` turns, each ended by the tokenizer's <|endoftext|> (the demo's 512-token
   vocabulary has no room for ChatML tokens);
3. `megatron-dots sft --pretrained-checkpoint DEMO/ckpt --save DEMO/sft/ckpt ...`: loss on the
   assistant tokens only, length-grouped variable-length micro-batches;
4. `megatron-dots convert mcore-to-hf` (the checkpoint carries the tokenizer and template) and
   answers from transformers' `generate` with `apply_chat_template`, next to the docstrings.
"""

import argparse
import importlib
import inspect
import json
import os
import random
import sys

TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}<|endoftext|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
QUESTIONS = ("What does {name} do?", "Explain {name}.", "What is {name} for?")


def first_sentence(doc: str, limit: int = 160) -> str:
    text = " ".join(doc.split())
    end = text.find(". ")
    text = text[:end + 1] if 0 < end < limit else text[:limit]
    return text.strip()


def conversations(seed: int = 0):
    """One conversation per documented public function / class of the demo's corpus modules."""
    from megatron_dots.demo import _CORPUS_MODULES

    rng = random.Random(seed)
    out = []
    for module_name in _CORPUS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(inspect.getmembers(module)):
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 20:
                continue
            question = rng.choice(QUESTIONS).format(name=f"{module_name}.{name}")
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": first_sentence(doc)}]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", help="the --out directory of `megatron-dots demo`")
    parser.add_argument("--steps", type=int, default=150, help="SFT steps (default 150)")
    parser.add_argument("--seq-length", type=int, default=128, help="longest conversation")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_dots.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_dots.sft.main import main as sft_main

    work = os.path.join(args.demo, "sft")
    os.makedirs(work, exist_ok=True)
    chats = conversations()
    data = os.path.join(work, "chat.jsonl")
    with open(data, "w", encoding="utf-8") as handle:
        for chat in chats:
            handle.write(json.dumps(chat) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.demo, "tokenizer"),
                                              local_files_only=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(os.path.join(work, "tokenizer"))
    print(f"[1/3] {len(chats)} conversations -> {data}", flush=True)

    flags = ["--dots-model", "dots-tiny", "--data-path", data,
             "--tokenizer-model", os.path.join(work, "tokenizer"),
             "--pretrained-checkpoint", os.path.join(args.demo, "ckpt"),
             "--save", os.path.join(work, "ckpt"), "--load", os.path.join(work, "ckpt"),
             "--seq-length", str(args.seq_length), "--micro-batch-size", "8",
             "--global-batch-size", "16", "--train-iters", str(args.steps),
             "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine",
             "--lr-warmup-iters", str(max(1, args.steps // 10)),
             "--dots-sft-length-grouped", "--dots-sft-pad-multiple", "16",
             "--log-interval", str(max(1, args.steps // 6)), "--split", "95,5,0",
             "--eval-interval", str(args.steps), "--eval-iters", "2",
             "--data-cache-path", os.path.join(work, "cache")]
    print(f"[2/3] megatron-dots sft {' '.join(flags)}", flush=True)
    if sft_main(flags) != 0:
        return 1
    hf_dir = convert_mcore_to_hf(os.path.join(work, "ckpt"), os.path.join(work, "hf"),
                                 overwrite=True, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).float().eval()
    print(f"[3/3] exported to {hf_dir}; answers (greedy, transformers generate):")
    for chat in chats[:: max(1, len(chats) // 4)][:4]:
        question, expected = chat["messages"][0]["content"], chat["messages"][1]["content"]
        prompt = tokenizer.apply_chat_template([chat["messages"][0]], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:],
                                  skip_special_tokens=True).strip()
        print(f"  User: {question}\n  Assistant: {answer}\n  (docstring: {expected})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
