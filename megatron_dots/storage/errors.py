"""Errors of damaged, missing or unfitting checkpoint and data files: each names the file (and
the key, field or line) that is wrong."""


class FileError(ValueError):
    """One file is wrong: the message is ``PATH: reason`` (`path` and `reason` kept apart)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class CheckpointError(FileError):
    """A checkpoint file that is missing, incomplete or does not fit the dots layout."""


class DataFileError(FileError):
    """A dataset, JSONL or tokenizer file that is damaged or not what it claims to be."""


def last_line(err: BaseException) -> str:
    """The last non-blank line of an exception's message (where PyTorch's checkpoint reader
    puts the cause after its traceback text), or its type name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
