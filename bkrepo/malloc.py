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

import contextlib
import ctypes
import os
import sys
from collections.abc import Mapping
from pathlib import Path

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


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with glibc's allocator asking for transparent huge pages
    (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), or None when ``environ`` already decides
    (GLIBC_TUNABLES names ``glibc.malloc.hugetlb``, whatever the value: ``=0`` is how to opt
    out) or the kernel has them off.

    Why: after a moment of idleness, on this kind of VM, a request costs in proportion to
    the memory pages it touches (caches and TLB are cold): ``bkr serve`` answered a BAM Range
    request after 0.3 s idle in 11.6 ms instead of 17.0 ms (a slow hour), for a few MB more
    RSS.  Python's small objects stay in its own allocator: moving them to glibc's heap too
    (``PYTHONMALLOC=malloc``, which a user may still set) answered in 8.1 ms but cost a
    metadata-heavy clone 20 % more server CPU (docs/performance.md)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    try:
        if "[never]" in THP_ENABLED.read_text():
            return None
    except OSError:
        return None
    tunables = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
    return {**environ, "GLIBC_TUNABLES": tunables}


def restart_on_huge_pages() -> None:
    """Execute this same command again (same pid, arguments and descriptors) in the
    environment of :func:`huge_page_env`, unless it already is.  glibc reads its tunables
    only at start, hence the restart: call it first thing in a long-running command, before
    it opens or prints anything.  Returns when nothing is to be done (then or after the
    restart), or when the restart cannot be made (the command goes on without)."""
    env = huge_page_env(os.environ)
    if env is None or not sys.executable or len(sys.orig_argv) < 2:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):  # the interpreter cannot be run again: go on as is
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
