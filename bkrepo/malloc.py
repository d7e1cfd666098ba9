"""Keeping glibc's allocator from paying for fresh pages on every large buffer.

Both long-running processes, ``bkr serve`` and the bkfs daemon, make and free MiB-sized
buffers all the time (a chunk, a body message, a socket read of up to 1 MiB).  Left alone,
glibc gives a buffer above its (moving) mmap threshold a mapping of its own, serves threads
from arenas of their own, and trims the heap's top back to the kernel whenever more than its
trim threshold is free there; each way the next buffer faults in fresh zeroed pages, 256 per
MiB.  In the daemon that cost ~0.8 s of system time per GiB read on this kind of VM; in
``bkr serve`` every request grew the heap by a MiB and shrank it again (seen with strace).
A fixed mmap threshold above the largest buffer, a trim threshold that keeps a few MiB
of freed heap, and two arenas make every buffer reuse memory that is already mapped.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt(3) parameters


def tame(mmap_threshold: int = 2 << 20, trim_threshold: int = 8 << 20) -> None:
    """Set the thresholds for this process (call once, early).  A no-op outside glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own habits
