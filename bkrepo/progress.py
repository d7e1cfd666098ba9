"""Progress bars for long transfers: shown only when stderr is a terminal and ``-q`` is off.

The CLI decides (:func:`configure`); library code asks :func:`bar` for a bar and calls
``advance`` (bytes moved) and ``grow`` (bytes learned to be coming) — no-ops on the null bar
when bars are off, so callers never branch on it.  A bar is drawn on stderr, never stdout
(which may carry data: ``send -``, ``get -p``), once its total reaches :data:`MIN_BYTES`:
a download learns its objects' sizes from the answers as they arrive, so its total grows.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, BinaryIO

MIN_BYTES = 8 << 20  # smaller transfers are over before a bar would help

_enabled = True


def configure(*, quiet: bool) -> None:
    global _enabled
    _enabled = not quiet and sys.stderr.isatty()


class _Null:
    def advance(self, n: int) -> None:
        pass

    def grow(self, n: int) -> None:
        pass

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Bar:
    """Bytes done out of a total that may grow; thread-safe (transfer workers report)."""

    def __init__(self, description: str, total: int) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self.lock = threading.Lock()
        self.progress: Any = None
        self.task: Any = None
        self.closed = False

    def _start_if_long(self) -> None:
        if self.progress is not None or self.closed or self.total < MIN_BYTES:
            return
        from rich.console import Console
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
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task(self.description, total=self.total, completed=self.done)
        self.progress.start()

    def grow(self, n: int) -> None:
        with self.lock:
            self.total += n
            if self.progress is not None:
                self.progress.update(self.task, total=self.total)
            else:
                self._start_if_long()

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.progress is not None:
                self.progress.update(self.task, completed=self.done)

    def __enter__(self) -> _Bar:
        with self.lock:
            self._start_if_long()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.closed = True
            if self.progress is not None:
                self.progress.stop()


def bar(description: str, total: int = 0) -> Any:
    """A progress bar over ``total`` bytes (more may be added with ``grow``); a null one when
    bars are off."""
    return _Bar(description, total) if _enabled else _Null()


class Metered:
    """A binary file whose reads advance a bar (BAM data sent inside a record stream)."""

    def __init__(self, f: BinaryIO, bar: Any) -> None:
        self.f = f
        self.bar = bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.advance(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)  # type: ignore[attr-defined]
        self.bar.advance(n or 0)
        return int(n or 0)
