"""Errors of checkpoint conversion: each names the file (and key or field) that is wrong."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, incomplete or does not fit the dots layout."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
