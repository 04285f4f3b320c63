"""The two kinds of failure a user sees.

`NetdietError` is bad input: the CLI prints its one-line message and exits 2.
Anything else escaping a command is an internal error (exit 1).
"""
from __future__ import annotations


class NetdietError(Exception):
    """Bad input. The message is one line: what was wrong and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " ").strip())
