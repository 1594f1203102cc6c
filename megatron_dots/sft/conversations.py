"""Chat conversations read from JSONL: one ``{"messages": [{"role", "content"}, ...]}`` object
per line, checked line by line.

Every error is one line naming ``FILE:LINE``. Blank lines are skipped. A conversation without
an assistant turn has nothing to learn from: it is not an error, it is skipped and counted in
`ConversationReader.skipped_no_assistant` (with its line number) for the caller to report.
"""

import hashlib
import json
from typing import Dict, Iterator, List, Tuple

from ..storage.errors import DataFileError

ROLES = ("system", "user", "assistant")
Message = Dict[str, str]


class ConversationError(DataFileError):
    """A conversation file or line that is not a valid chat conversation; `path` is FILE:LINE
    (or FILE for the file as a whole)."""


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_conversation(raw: bytes, where: str) -> List[Message]:
    """The messages of one JSONL line (``{"role", "content"}`` dicts, other keys dropped)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConversationError(where, f"not UTF-8 text ({err.reason} at byte {err.start} of "
                                "the line)") from None
    except json.JSONDecodeError as err:
        raise ConversationError(where, f"not valid JSON ({err.msg} at column {err.colno})") \
            from None
    if not isinstance(record, dict):
        raise ConversationError(where, f"expected a JSON object with a 'messages' list, got "
                                f"{_json_type(record)}")
    messages = record.get("messages")
    if not isinstance(messages, list):
        got = "no 'messages' key" if "messages" not in record else \
            f"'messages' is {_json_type(messages)}"
        raise ConversationError(where, f"expected a 'messages' list, {got}")
    if not messages:
        raise ConversationError(where, "'messages' is empty")
    return [_message(m, k, where) for k, m in enumerate(messages)]


def _message(message, index: int, where: str) -> Message:
    what = f"message {index}"
    if not isinstance(message, dict):
        raise ConversationError(where, f"{what}: expected an object with 'role' and 'content', "
                                f"got {_json_type(message)}")
    role = message.get("role")
    if role not in ROLES:
        shown = repr(role) if "role" in message else "no role"
        raise ConversationError(where, f"{what}: unknown role {shown} (allowed: "
                                f"{', '.join(ROLES)})")
    content = message.get("content")
    if not isinstance(content, str):
        shown = "no content" if "content" not in message else f"content is {_json_type(content)}"
        raise ConversationError(where, f"{what} ({role}): {shown}, expected a non-empty string")
    if not content.strip():
        raise ConversationError(where, f"{what} ({role}): empty content")  # or blanks only
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800")
        raise ConversationError(where, f"{what} ({role}): content holds a lone surrogate "
                                "escape, not valid Unicode") from None
    return {"role": role, "content": content}


class ConversationReader:
    """Iterate ``(line_number, messages)`` over the conversations of `path` that have an
    assistant turn; the others are counted in `skipped_no_assistant` / `skipped_lines`."""

    KEEP_LINES = 10  # line numbers of skipped conversations kept for the report

    def __init__(self, path: str):
        self.path = path
        self.kept = 0
        self.skipped_no_assistant = 0
        self.skipped_lines: List[int] = []  # the first KEEP_LINES
        self.bytes_read = 0
        self.sha256 = hashlib.sha256()  # of every byte read, blank lines included

    def __iter__(self) -> Iterator[Tuple[int, List[Message]]]:
        try:
            handle = open(self.path, "rb")
        except OSError as err:
            raise ConversationError(self.path, f"cannot be read ({err.strerror or err})") \
                from None
        with handle:
            for lineno, raw in enumerate(handle, 1):
                self.bytes_read += len(raw)
                self.sha256.update(raw)
                if not raw.strip():
                    continue
                messages = parse_conversation(raw, f"{self.path}:{lineno}")
                if not any(m["role"] == "assistant" for m in messages):
                    self.skipped_no_assistant += 1
                    if len(self.skipped_lines) < self.KEEP_LINES:
                        self.skipped_lines.append(lineno)
                    continue
                self.kept += 1
                yield lineno, messages
        if self.kept == 0:
            raise ConversationError(self.path, self._nothing_kept())

    def _nothing_kept(self) -> str:
        if self.skipped_no_assistant:
            return (f"no conversation with an assistant turn ({self.skipped_no_assistant} "
                    f"without one, lines {_lines(self.skipped_lines, self.skipped_no_assistant)})")
        return "no conversations (empty file)"


def _lines(lines: List[int], total: int) -> str:
    shown = ", ".join(map(str, lines))
    return shown + (", ..." if total > len(lines) else "")


def read_conversations(path: str) -> Iterator[Tuple[int, List[Message]]]:
    """``(line_number, messages)`` of each conversation with an assistant turn (see
    `ConversationReader` for the count of those skipped)."""
    return iter(ConversationReader(path))
