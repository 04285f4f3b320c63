"""Progress bars on stderr (rich). Quiet when stderr is not a terminal unless NETDIET_PROGRESS=1."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_enabled() -> bool:
    flag = os.environ.get("NETDIET_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


class progress_bar:
    """`bar = progress_bar(100, "train"); bar.advance(); bar.close()` — a no-op when disabled."""

    def __init__(self, total: int, description: str) -> None:
        self._progress = None
        if not progress_enabled():
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress:
            self._progress.advance(self._task, n)

    def close(self) -> None:
        if self._progress:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "progress_bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
