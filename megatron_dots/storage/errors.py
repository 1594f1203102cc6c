"""Errors of damaged, missing or unfitting checkpoint and data files: each names the file (and
the key, field or line) that is wrong."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, incomplete or does not fit the dots layout."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class DataFileError(ValueError):
    """A dataset, JSONL or tokenizer file that is damaged or not what it claims to be."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message
