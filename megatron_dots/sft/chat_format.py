"""Chat conversations -> token ids and the assistant loss mask, through a chat template.

Both template choices go through transformers' ``apply_chat_template``: ``"auto"`` uses the
tokenizer's own template; ``"chatml"`` is the documented fallback `CHATML_TEMPLATE`
(``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, generation prompt
``<|im_start|>assistant\\n``). The ids of a conversation are exactly
``apply_chat_template(messages, tokenize=True)``.

Mask convention: a token is trained on (mask True) iff it belongs to an assistant reply: the
reply's content tokens and the template's end-of-turn token after it; never the assistant
header (the generation prompt) nor anything after the end-of-turn token (e.g. the newline of
ChatML). The end-of-turn token is the template's own: the first control token (a special or
added token) it writes after the text of an assistant reply, found once by rendering a probe
conversation (``<|im_end|>`` for ChatML, ``<|endofresponse|>`` for dots.llm1's template,
``<|eot_id|>`` for Llama 3). A template that writes no control token after a reply has no
end-of-turn token: its whole reply span is masked.

Templates with ``{% generation %}`` blocks: the mask is transformers'
``return_assistant_tokens_mask`` with two normalisations: a block ending inside a character of
several tokens takes that character's remaining tokens (transformers stops at its first), and a
block that stops just before the end-of-turn token (the template put it outside the block) is
extended over that token.

Templates without such blocks (prefix rendering): the reply of assistant message i is the
text between ``render(messages[:i], add_generation_prompt=True)`` (for a reply that starts the
conversation: the text of ``render(messages[:1])`` up to the generation prompt before its
content) and ``render(messages[:i+1])``; both must be prefixes of the whole conversation's
text, else the template rewrites earlier turns and is refused. The masked tokens are those
whose characters overlap that text (a token straddling the header and the reply, e.g. the
``\\n\\n`` of a reply that starts with a newline, is masked), cut after the last end-of-turn
token among them.
"""

import hashlib
import os
import re
from typing import List, Optional, Sequence, Tuple

from ..data.tokenizer import TokenizerError, load_tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
TEMPLATES = ("auto", "chatml")
MASK_CONVENTION = "sft-mask-v1"  # part of template_identity(): change it with the rules above
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_REPLY = "probe reply 0123456789"


class ChatTemplateError(TokenizerError):
    """A tokenizer or chat template that cannot give ids and an assistant mask; names the
    tokenizer (directory or file)."""


class ChatFormat:
    """Tokenize conversations with a chat template and mask the assistant replies."""

    def __init__(self, tokenizer_dir: str, template: str = "auto"):
        if template not in TEMPLATES:
            raise ValueError(f"chat template {template!r}: expected one of {', '.join(TEMPLATES)}")
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.path = tokenizer_dir
        if self.tokenizer.kind != "hf":
            raise ChatTemplateError(tokenizer_dir, "chat templates need a Hugging Face tokenizer "
                                    "directory, not a sentencepiece model file")
        self._hf = self.tokenizer._backend
        self.template_name = template
        self.template = self._own_template() if template == "auto" else self._chatml_template()
        self.has_generation_blocks = bool(GENERATION_BLOCK.search(self.template))
        self._control_ids = frozenset(self._hf.all_special_ids) | frozenset(
            self._hf.added_tokens_decoder)
        self.eot_id = self._find_eot_id()

    # ---- the template ------------------------------------------------------------------------

    def _own_template(self) -> str:
        config = os.path.join(self.path, "tokenizer_config.json")
        if not self._hf.chat_template:
            raise ChatTemplateError(config, "the tokenizer has no chat_template: pass "
                                    "--dots-chat-template chatml to use the documented ChatML "
                                    "fallback (<|im_start|>role\\ncontent<|im_end|>\\n)")
        try:
            return self._hf.get_chat_template()
        except ValueError as err:  # several named templates and none called "default"
            raise ChatTemplateError(config, f"cannot choose a chat template: {err}") from None

    def _chatml_template(self) -> str:
        added = self._hf.get_added_vocab()
        missing = [t for t in CHATML_TOKENS
                   if t not in added or self._hf.encode(t, add_special_tokens=False) != [added[t]]]
        if missing:
            raise ChatTemplateError(self.path, f"the ChatML fallback template needs "
                                    f"{' and '.join(CHATML_TOKENS)} as single special or added "
                                    f"tokens; this tokenizer lacks {' and '.join(missing)}")
        return CHATML_TEMPLATE

    def _find_eot_id(self) -> Optional[int]:
        """The first control token the template writes after an assistant reply's text."""
        probe = [{"role": "user", "content": "probe question"},
                 {"role": "assistant", "content": _PROBE_REPLY}]
        try:
            text = self._apply(probe, tokenize=False)
        except ChatTemplateError as err:
            raise ChatTemplateError(self.path, f"{err.message} (a probe of one user and one "
                                    "assistant turn)") from None
        at = text.rfind(_PROBE_REPLY)
        if at < 0:
            return None
        after = self._hf(text[at + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]
        return next((int(i) for i in after if i in self._control_ids), None)

    @property
    def pad_id(self) -> int:
        """An id for padding (never trained on): the tokenizer's pad, else eos, else eot."""
        for candidate in (self._hf.pad_token_id, self._hf.eos_token_id, self.eot_id):
            if candidate is not None:
                return int(candidate)
        raise ChatTemplateError(self.path, "the tokenizer has no pad, eos or end-of-turn token "
                                "to pad with")

    def template_identity(self) -> str:
        """A hash of the mask convention, the template text and the tokenizer's files: equal
        identities give equal `encode` results."""
        digest = hashlib.sha256()
        for part in (MASK_CONVENTION, self.template_name, self.template):
            digest.update(part.encode("utf-8") + b"\0")
        for name in TOKENIZER_FILES:
            path = os.path.join(self.path, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
        return digest.hexdigest()

    # ---- encoding ----------------------------------------------------------------------------

    def encode(self, messages: Sequence[dict]) -> Tuple[List[int], List[bool]]:
        """Ids of the whole conversation (``apply_chat_template(messages, tokenize=True)``) and
        the assistant loss mask (see the module docstring)."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.has_generation_blocks:
            return self._encode_with_blocks(messages)
        out = self._apply(messages, tokenize=True, return_dict=True)
        ids = [int(i) for i in out["input_ids"]]
        spans = _char_spans(out, len(ids))
        text = self._apply(messages, tokenize=False)
        mask = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            reply_start = self._reply_start(messages, i, text)
            reply_end = len(text) if i + 1 == len(messages) else self._prefix_length(
                messages[:i + 1], False, text, f"the first {i + 1} messages")
            start = next((j for j, (_, e) in enumerate(spans) if e > reply_start), len(ids))
            end = next((j for j, (b, _) in enumerate(spans) if b >= reply_end), len(ids))
            if end <= start:
                raise ChatTemplateError(self.path, f"the {self.template_name!r} chat template "
                                        f"renders assistant message {i} as no tokens: the loss "
                                        "mask cannot be computed")
            end = self._cut_after_eot(ids, start, end)
            mask[start:end] = [True] * (end - start)
        return ids, mask

    def _cut_after_eot(self, ids: List[int], start: int, end: int) -> int:
        """The end of span [start, end) cut after its last end-of-turn token (if any)."""
        for j in range(end - 1, start - 1, -1):
            if ids[j] == self.eot_id:
                return j + 1
        return end

    def _reply_start(self, messages: List[dict], i: int, text: str) -> int:
        """Where assistant message i's reply starts in the conversation's `text`."""
        if i > 0:
            return self._prefix_length(messages[:i], True, text,
                                       f"the first {i} messages with the generation prompt")
        first = self._apply(messages[:1], tokenize=False)
        self._prefix_length(messages[:1], False, text, "the first message", rendered=first)
        prompt = self._generation_prompt()
        at = first.find(prompt + messages[0]["content"])
        if at < 0:
            raise ChatTemplateError(self.path, f"the {self.template_name!r} chat template does "
                                    "not write its generation prompt before the content of an "
                                    "assistant turn that starts a conversation: the loss mask "
                                    "cannot be computed")
        return at + len(prompt)

    def _generation_prompt(self) -> str:
        """The text ``add_generation_prompt=True`` appends (e.g. ``<|im_start|>assistant\\n``)."""
        probe = [{"role": "user", "content": "probe question"}]
        plain = self._apply(probe, tokenize=False)
        prompted = self._apply(probe, tokenize=False, add_generation_prompt=True)
        if prompted == plain or not prompted.startswith(plain):
            raise ChatTemplateError(self.path, f"the {self.template_name!r} chat template has no "
                                    "generation prompt (add_generation_prompt appends nothing): "
                                    "the assistant header cannot be told from the reply")
        return prompted[len(plain):]

    def _prefix_length(self, messages: List[dict], add_generation_prompt: bool, text: str,
                       what: str, rendered: Optional[str] = None) -> int:
        """len(render(messages)), once it is known to start the whole conversation's `text`."""
        if rendered is None:
            rendered = self._apply(messages, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
        if not text.startswith(rendered):
            instead = ", or --dots-chat-template chatml" if self.template_name == "auto" else ""
            raise ChatTemplateError(self.path, f"the {self.template_name!r} chat template renders "
                                    f"{what} differently from the start of the whole "
                                    "conversation (it rewrites earlier turns): the assistant "
                                    "loss mask cannot be computed by prefix rendering; use a "
                                    f"template with {{% generation %}} blocks{instead}")
        return len(rendered)

    def _encode_with_blocks(self, messages: List[dict]) -> Tuple[List[int], List[bool]]:
        out = self._apply(messages, tokenize=True, return_dict=True,
                          return_assistant_tokens_mask=True)
        ids = [int(i) for i in out["input_ids"]]
        mask = [bool(m) for m in out["assistant_masks"]]
        for start, end in _runs(mask):
            end = _to_character_end(out, end, len(ids))
            if end < len(ids) and ids[end] == self.eot_id and ids[end - 1] != self.eot_id:
                end += 1  # the block stops just before the end-of-turn token
            mask[start:end] = [True] * (end - start)
        return ids, mask

    def _apply(self, messages: List[dict], **kwargs):
        try:
            return self._hf.apply_chat_template(messages, chat_template=self.template, **kwargs)
        except Exception as err:  # jinja2 TemplateError, raise_exception() in the template
            if isinstance(err, TokenizerError):
                raise
            reason = " ".join(str(err).split())  # one line
            raise ChatTemplateError(self.path, f"the {self.template_name!r} chat template "
                                    f"refuses the conversation ({type(err).__name__}: "
                                    f"{reason})") from None


def _runs(mask: List[bool]) -> List[Tuple[int, int]]:
    """(start, end) of each run of True in `mask`."""
    runs, start = [], None
    for j, value in enumerate(list(mask) + [False]):
        if value and start is None:
            start = j
        elif not value and start is not None:
            runs.append((start, j))
            start = None
    return runs


def _char_spans(encoding, length: int) -> List[Tuple[int, int]]:
    """[start, end) characters of each token (empty for a token without characters)."""
    if encoding.encodings:  # a fast tokenizer: its offsets at once
        return [tuple(span) for span in encoding.encodings[0].offsets]
    spans = [encoding.token_to_chars(j) for j in range(length)]
    return [(span.start, span.end) if span is not None else (0, 0) for span in spans]


def _to_character_end(encoding, end: int, length: int) -> int:
    """Extend a block [.., end) over the tokens that hold the rest of its last character.

    transformers ends a generation block at the first token of its last character; with a
    byte-level BPE a character of several tokens (an emoji, many CJK characters) continues in
    the next ones, which belong to the block too.
    """
    last = encoding.token_to_chars(end - 1)
    while end < length and last is not None:
        span = encoding.token_to_chars(end)
        if span is None or span.start >= last.end:
            break
        end += 1
    return end
