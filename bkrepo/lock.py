"""The repository write lock: one writing ``bkr`` process per repository at a time.

An advisory ``flock`` on ``.bk/lock``; the kernel drops it when the holder dies, so a crashed
command never leaves a stale lock.  The holder writes its pid into the file so a waiting
command can say who it is waiting for.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from bkrepo.errors import RepoLocked


class RepoLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, what: str, timeout: float) -> None:
        """Take the lock, waiting up to ``timeout`` seconds for another process to finish."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    who = f"pid {holder}" if holder else "another process"
                    raise RepoLocked(
                        f"{what}: repository is locked by {who}; wait for it to finish and retry"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def try_acquire(self) -> bool:
        """Take the lock only if it is free now (for optional work such as index refresh)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return True

    @staticmethod
    def _holder(fd: int) -> int | None:
        try:
            text = os.pread(fd, 32, 0).decode().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
