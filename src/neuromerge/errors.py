"""The one exception type users see: a one-line message naming the file/tensor and the problem."""

from __future__ import annotations


class NeuromergeError(Exception):
    """A user-facing error. The CLI prints ``neuromerge: error: <message>`` and exits non-zero."""

    def __init__(self, message: str) -> None:
        # Keep it to one line: multi-line causes (pydantic, yaml) are folded by the caller.
        super().__init__(" ".join(str(message).split()))


class ConfigError(NeuromergeError):
    """The merge configuration or a method parameter is invalid."""


class InputError(NeuromergeError):
    """An input checkpoint is missing, unreadable, corrupt or incompatible."""


class OutputError(NeuromergeError):
    """The output location cannot be written as asked."""
