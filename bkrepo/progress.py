"""Progress bars for long transfers: shown only when stderr is a terminal and ``-q`` is off.

The CLI decides (:func:`configure`); library code asks :func:`bar` for a bar and calls
``advance`` — a no-op object when bars are off, so callers never branch on it.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

_enabled = True


def configure(*, quiet: bool) -> None:
    global _enabled
    _enabled = not quiet and sys.stderr.isatty()


class _Null:
    def advance(self, n: int) -> None:
        pass

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Bar:
    def __init__(self, description: str, total: int) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        self.progress.update(self.task, advance=n)

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()


def bar(description: str, total: int) -> Any:
    """A progress bar over ``total`` bytes (a null one when bars are off or the job is small)."""
    if not _enabled or total < (8 << 20):
        return _Null()
    return _Bar(description, total)
