"""The data side of SFT: reading conversations, the chat template's ids and assistant loss mask,
the token cache and `sft-preprocess`."""

import json
import os
import shutil

import numpy as np
import pytest

from megatron_dots.data.tokenizer import TokenizerError, train_bpe_tokenizer
from megatron_dots.sft import prepare as prepare_module
from megatron_dots.sft.chat_format import CHATML_TEMPLATE, ChatFormat, ChatTemplateError
from megatron_dots.sft.conversations import ConversationError, ConversationReader
from megatron_dots.sft.prepare import (SFTCacheError, SFTDataset, load_or_prepare,
                                       prepare_sft_data)
from megatron_dots.sft.prepare_cli import build_parser, main

CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|userprompt|>", "<|endofuserprompt|>",
                  "<|response|>", "<|endofresponse|>", "<|system|>", "<|endofsystem|>"]

# Qwen-style ChatML: a default system turn when the conversation has none.
QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _dots_template(generation: bool) -> str:
    """dots.llm1-style turns; with `generation`, the reply (not its end token) is a block."""
    reply = ("{% generation %}{{- message['content'] }}{% endgeneration %}" if generation
             else "{{- message['content'] }}")
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}"
        "{{- '<|system|>' + message['content'] + '<|endofsystem|>' }}"
        "{%- elif message['role'] == 'user' %}"
        "{{- '<|userprompt|>' + message['content'] + '<|endofuserprompt|>' }}"
        "{%- else %}{{- '<|response|>' }}" + reply + "{{- '<|endofresponse|>' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|response|>' }}{%- endif %}")


# Rewrites earlier assistant turns: prefix renderings do not start the whole conversation.
REWRITING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = '(earlier reply)' if message['role'] == 'assistant' and not loop.last "
    "else message['content'] %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is a mixture of experts?"},
     {"role": "assistant", "content": "A layer that routes each token to a few experts."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And times three?"},
     {"role": "assistant", "content": "Twelve.\nThat is all."}],
    [{"role": "user", "content": "Grüße aus Zürich, 你好, Привет 🙂"},
     {"role": "assistant", "content": "Hallo! 你好！ Здравствуйте 🎉"},
     {"role": "user", "content": "  leading and trailing spaces  "},
     {"role": "assistant", "content": "  kept as written  "}],
    [{"role": "assistant", "content": "I speak first."},
     {"role": "user", "content": "Fine."},
     {"role": "assistant", "content": "Thanks."}],
]


def _texts():
    base = ["The quick brown fox jumps over the lazy dog.", "Experts route tokens; a gate "
            "chooses the top six.", "Grüße aus Zürich, 你好世界, Привет мир 🙂🎉",
            "def f(x):\n    return x * 2\n", "user assistant system reply answer question"]
    return [f"{t} {i}" for i in range(40) for t in base]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """name -> tokenizer directory: `plain` (no chat tokens, no template), `chatml_tokens` (chat
    tokens, no template) and one per chat template."""
    from tokenizers import AddedToken, Tokenizer

    root = tmp_path_factory.mktemp("sft-tokenizers")
    plain = train_bpe_tokenizer(_texts(), str(root / "plain"), vocab_size=400)
    chat = str(root / "chatml_tokens")
    shutil.copytree(plain, chat)
    backend = Tokenizer.from_file(os.path.join(chat, "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in CONTROL_TOKENS])
    backend.save(os.path.join(chat, "tokenizer.json"))
    dirs = {"plain": plain, "chatml_tokens": chat}
    for name, template in [("qwen", QWEN_TEMPLATE), ("dots", _dots_template(False)),
                           ("dots_generation", _dots_template(True)),
                           ("rewriting", REWRITING_TEMPLATE)]:
        dirs[name] = str(root / name)
        shutil.copytree(chat, dirs[name])
        config_path = os.path.join(dirs[name], "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["chat_template"] = template
        with open(config_path, "w") as f:
            json.dump(config, f)
    return dirs


@pytest.fixture(scope="module")
def formats(tokenizers):
    return {"chatml": ChatFormat(tokenizers["chatml_tokens"], "chatml"),
            **{name: ChatFormat(tokenizers[name], "auto")
               for name in ("qwen", "dots", "dots_generation")}}


def _hf_ids(chat_format, messages, **kwargs):
    out = chat_format._hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              **kwargs)
    return out


def _runs(mask):
    """(start, end) of each run of True."""
    runs, start = [], None
    for j, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            runs.append((start, j))
            start = None
    return runs


def _write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps({"messages": line})) + "\n")
    return str(path)


# ---- ids and masks ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen", "dots", "dots_generation"])
def test_ids_are_apply_chat_template(formats, name):
    chat_format = formats[name]
    for messages in CONVERSATIONS:
        ids, mask = chat_format.encode(messages)
        assert ids == list(_hf_ids(chat_format, messages)["input_ids"])
        assert len(mask) == len(ids) and any(mask)


def test_chatml_fallback_renders_the_documented_format(formats):
    chat_format = formats["chatml"]
    hf = chat_format._hf
    for messages in CONVERSATIONS:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        ids, _ = chat_format.encode(messages)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert ids == list(_hf_ids(chat_format, messages, chat_template=CHATML_TEMPLATE)
                           ["input_ids"])
    prompt = hf.apply_chat_template(CONVERSATIONS[0][:1], chat_template=CHATML_TEMPLATE,
                                    tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert chat_format.eot_id == hf.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("name", ["chatml", "qwen"])
def test_chatml_mask_is_the_replies_and_their_end_token(formats, name):
    chat_format = formats[name]
    for messages in CONVERSATIONS:
        ids, mask = chat_format.encode(messages)
        replies = [chat_format._hf.decode(ids[a:b]) for a, b in _runs(mask)]
        assert replies == [m["content"] + "<|im_end|>" for m in messages
                           if m["role"] == "assistant"]


@pytest.mark.parametrize("name", ["chatml", "qwen"])
def test_token_straddling_header_and_reply_is_masked(formats, name):
    """A reply that starts with blanks: the byte-level BPE merges the header's newline and the
    blanks into one token, which holds reply characters and so is trained on."""
    chat_format = formats[name]
    messages = [{"role": "user", "content": "Indent?"},
                {"role": "assistant", "content": "   indented"}]
    ids, mask = chat_format.encode(messages)
    (start, end), = _runs(mask)
    assert chat_format._hf.decode(ids[start:end]) == "\n   indented<|im_end|>"
    assert chat_format._hf.decode(ids[:start]).endswith("<|im_start|>assistant")


def test_generation_blocks_mask_is_transformers_plus_the_end_token(formats):
    """transformers' `assistant_masks` cover the {% generation %} block only; the template puts
    <|endofresponse|> after the block, so our mask adds that one token per reply. transformers
    also ends a block at the first token of its last character, so a reply ending in an emoji
    (several byte-level tokens) loses the others: ours keeps them. The prefix rendering of the
    same template without blocks gives the same mask."""
    blocks, prefix = formats["dots_generation"], formats["dots"]
    eot = blocks._hf.convert_tokens_to_ids("<|endofresponse|>")
    assert blocks.has_generation_blocks and not prefix.has_generation_blocks
    assert blocks.eot_id == prefix.eot_id == eot
    for messages in CONVERSATIONS:
        ids, mask = blocks.encode(messages)
        theirs = [bool(m) for m in _hf_ids(blocks, messages, return_assistant_tokens_mask=True)
                  ["assistant_masks"]]
        expected = list(theirs)
        for _, end in _runs(theirs):
            eot_at = ids.index(eot, end)
            assert eot_at - end <= 3  # 0, or the rest of a last character of several tokens
            expected[end:eot_at + 1] = [True] * (eot_at + 1 - end)
        assert mask == expected
        assert prefix.encode(messages) == (ids, mask)
        replies = [blocks._hf.decode(ids[a:b]) for a, b in _runs(mask)]
        assert replies == [m["content"] + "<|endofresponse|>" for m in messages
                           if m["role"] == "assistant"]


def test_template_that_rewrites_earlier_turns_is_refused(tokenizers):
    chat_format = ChatFormat(tokenizers["rewriting"], "auto")
    ids, mask = chat_format.encode(CONVERSATIONS[0])  # one reply: nothing rewritten
    assert any(mask)
    with pytest.raises(ChatTemplateError) as err:
        chat_format.encode(CONVERSATIONS[1])
    assert tokenizers["rewriting"] in str(err.value) and "loss mask" in str(err.value)


def test_tokenizer_without_template_or_chat_tokens(tokenizers):
    with pytest.raises(ChatTemplateError) as err:
        ChatFormat(tokenizers["plain"], "auto")
    message = str(err.value)
    assert os.path.join(tokenizers["plain"], "tokenizer_config.json") in message
    assert "--dots-chat-template chatml" in message
    with pytest.raises(ChatTemplateError) as err:
        ChatFormat(tokenizers["plain"], "chatml")
    assert tokenizers["plain"] in str(err.value) and "<|im_start|>" in str(err.value)
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        ChatFormat(os.path.join(tokenizers["plain"], "missing"), "chatml")


def test_template_identity(tokenizers, formats):
    identities = {name: f.template_identity() for name, f in formats.items()}
    assert len(set(identities.values())) == len(identities)
    assert ChatFormat(tokenizers["qwen"], "auto").template_identity() == identities["qwen"]


# ---- reading conversations -------------------------------------------------------------------

GOOD = json.dumps({"messages": CONVERSATIONS[0]})
BAD_LINES = [
    ('{"messages": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"text": "hello"}', "no 'messages' key"),
    ('{"messages": "hi"}', "'messages' is a string"),
    (json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),
     "unknown role 'robot' (allowed: system, user, assistant)"),
    (json.dumps({"messages": [{"role": "user", "content": ""}]}), "empty content"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), "content is a number"),
    (json.dumps({"messages": ["hi"]}), "message 0: expected an object"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
]


@pytest.mark.parametrize("line,expected", BAD_LINES)
def test_bad_lines_name_file_and_line(tmp_path, formats, line, expected):
    path = _write_jsonl(tmp_path / "chat.jsonl", [GOOD, "", line, GOOD])
    out = tmp_path / "cache"
    with pytest.raises(ConversationError) as err:
        prepare_sft_data(path, formats["chatml"], str(out), progress=False)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and expected in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["chat.jsonl"]  # nothing left behind


def test_non_utf8_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(ConversationError, match=f"^{path}:2: not UTF-8"):
        list(ConversationReader(str(path)))


def test_conversations_without_assistant_are_skipped_and_counted(tmp_path, formats):
    user_only = [{"role": "user", "content": "Anyone there?"}]
    path = _write_jsonl(tmp_path / "chat.jsonl",
                        [CONVERSATIONS[0], user_only, CONVERSATIONS[1], "", user_only])
    dataset = prepare_sft_data(path, formats["chatml"], str(tmp_path / "cache"), progress=False)
    assert len(dataset) == 2
    assert dataset.meta["skipped_no_assistant"] == 2
    assert dataset.meta["skipped_no_assistant_lines"] == [2, 5]


@pytest.mark.parametrize("lines,expected", [([], "no conversations (empty file)"),
                                            (["", "  "], "no conversations (empty file)"),
                                            ([[{"role": "user", "content": "hi"}]],
                                             "no conversation with an assistant turn")])
def test_file_without_conversations(tmp_path, formats, lines, expected):
    path = _write_jsonl(tmp_path / "chat.jsonl", lines)
    with pytest.raises(ConversationError) as err:
        prepare_sft_data(path, formats["chatml"], str(tmp_path / "cache"), progress=False)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_template_refusal_names_the_line(tmp_path, tokenizers):
    path = _write_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0], CONVERSATIONS[1]])
    with pytest.raises(ConversationError) as err:
        prepare_sft_data(path, ChatFormat(tokenizers["rewriting"]), str(tmp_path / "cache"),
                         progress=False)
    assert str(err.value).startswith(f"{path}:2: {tokenizers['rewriting']}: ")
    assert not (tmp_path / "cache").exists()


# ---- the cache -------------------------------------------------------------------------------

def test_prepared_cache_round_trips(tmp_path, formats):
    chat_format = formats["qwen"]
    path = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    dataset = prepare_sft_data(path, chat_format, str(tmp_path / "cache"), progress=False)
    assert len(dataset) == len(CONVERSATIONS)
    encoded = [chat_format.encode(m) for m in CONVERSATIONS]
    for i, (ids, mask) in enumerate(encoded):
        tokens, loss_mask = dataset.sample(i)
        assert tokens.dtype == np.int64 and loss_mask.dtype == bool
        assert tokens.tolist() == ids and loss_mask.tolist() == mask
    assert dataset.lengths.tolist() == [len(ids) for ids, _ in encoded]
    meta = dataset.meta
    assert meta["tokens"] == sum(len(ids) for ids, _ in encoded)
    assert meta["assistant_tokens"] == sum(sum(mask) for _, mask in encoded)
    assert meta["max_length"] == max(len(ids) for ids, _ in encoded)
    assert meta["template_identity"] == chat_format.template_identity()
    assert meta["eot_id"] == chat_format.eot_id and meta["skipped_no_assistant"] == 0
    assert sorted(os.listdir(tmp_path / "cache")) == ["loss_mask.npy", "meta.json",
                                                      "offsets.npy", "tokens.npy"]
    with pytest.raises(FileExistsError):
        prepare_sft_data(path, chat_format, str(tmp_path / "cache"), progress=False)


def test_load_or_prepare_reuses_the_cache(tmp_path, tokenizers, monkeypatch):
    path = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS[:2])
    first = load_or_prepare(path, tokenizers["qwen"], progress=False)
    assert os.path.dirname(first.path) == str(tmp_path / ".sft-cache")
    assert os.path.basename(first.path).startswith("chat-")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "prepare_sft_data", no_tokenizing)
        again = load_or_prepare(path, tokenizers["qwen"], progress=False)
    assert again.path == first.path and again.sample(1)[0].tolist() == \
        first.sample(1)[0].tolist()

    other_template = load_or_prepare(path, tokenizers["qwen"], "chatml", progress=False)
    _write_jsonl(path, CONVERSATIONS[:3])
    changed = load_or_prepare(path, tokenizers["qwen"], progress=False)
    assert len({first.path, other_template.path, changed.path}) == 3 and len(changed) == 3
    root = tmp_path / "elsewhere"
    assert os.path.dirname(load_or_prepare(path, tokenizers["qwen"], cache_root=str(root),
                                           progress=False).path) == str(root)


def test_damaged_cache_names_the_file(tmp_path, formats):
    path = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    cache = str(tmp_path / "cache")
    prepare_sft_data(path, formats["chatml"], cache, progress=False)
    tokens = os.path.join(cache, "tokens.npy")
    with open(tokens, "r+b") as f:
        f.truncate(os.path.getsize(tokens) - 8)
    with pytest.raises(SFTCacheError) as err:
        SFTDataset(cache)
    assert str(err.value).startswith(f"{tokens}: ")

    prepare_sft_data(path, formats["chatml"], cache, progress=False, overwrite=True)
    mask = os.path.join(cache, "loss_mask.npy")
    np.save(mask, np.load(mask)[:-1])
    with pytest.raises(SFTCacheError, match=f"^{mask}: .* entries for"):
        SFTDataset(cache)
    os.remove(os.path.join(cache, "meta.json"))
    with pytest.raises(SFTCacheError, match="meta.json: missing"):
        SFTDataset(cache)


# ---- the command line ------------------------------------------------------------------------

def test_cli_prints_counts(tmp_path, tokenizers, capsys):
    user_only = [{"role": "user", "content": "Anyone there?"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS + [user_only])
    out = str(tmp_path / "out")
    assert main(["--input", path, "--tokenizer", tokenizers["chatml_tokens"], "--output", out,
                 "--chat-template", "chatml", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    meta = SFTDataset(out).meta
    assert f"{len(CONVERSATIONS)} conversations kept" in printed
    assert "1 skipped without an assistant turn (lines 5)" in printed
    assert f"{meta['tokens']} tokens, {meta['assistant_tokens']} assistant tokens" in printed
    assert f"longest conversation {meta['max_length']} tokens" in printed


def test_cli_errors(tmp_path, tokenizers, capsys):
    path = _write_jsonl(tmp_path / "chat.jsonl", [GOOD, '{"messages": [{"role": "bot"}]}'])
    out = str(tmp_path / "out")
    base = ["--input", path, "--output", out, "--no-progress"]
    assert main(base + ["--tokenizer", tokenizers["qwen"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2: ") and "unknown role 'bot'" in err
    assert not os.path.exists(out)
    assert main(base + ["--tokenizer", tokenizers["plain"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "tokenizer_config.json" in err and "chatml" in err


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, action.option_strings
