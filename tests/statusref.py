"""A reference for ``bkr status``: the straightforward walk it did before the index was stored
by directory (one entry per path, every directory listed, every tracked file stat'ed and
compared field by field).  The per-directory fast paths of ``bkrepo.worktree.scan`` must give
exactly its answer; the differential tests in test_t2_status.py check that they do."""

from __future__ import annotations

import bisect
import os
import stat as st_
from pathlib import Path

from bkrepo import objects as ob
from bkrepo.repo import BK_B, Repo, is_repo
from bkrepo.worktree import (
    ADDED,
    CHECKED_OUT,
    Change,
    Ignore,
    IndexEntry,
    WorkState,
    content_matches,
    working_mode,
)


def _in_scope(path: bytes, scope: list[bytes] | None) -> bool:
    return scope is None or any(not s or path == s or path.startswith(s + b"/") for s in scope)


def reference_status(root: Path, scope: list[bytes] | None = None) -> list[str]:
    """What ``bkr status [PATH…]`` must print for the repository at ``root``."""
    with Repo.open(root) as repo, repo.store.read() as txn:
        state = WorkState.load(repo, txn)
        entries = state.entries
        rootb = os.fsencode(repo.root)
        ignore = Ignore.load(repo.root)
        keys = sorted(entries)
        changes: list[Change] = []
        seen: set[bytes] = set()

        def tracked_below(prefix: bytes) -> bool:
            i = bisect.bisect_left(keys, prefix + b"/")
            return i < len(keys) and keys[i].startswith(prefix + b"/")

        def check(p: bytes, e: IndexEntry, st: os.stat_result) -> None:
            seen.add(p)
            old = state.moved.get(p)
            if e.flags & ADDED:
                changes.append(Change(p, "A"))
                return
            clean = (
                e.flags & CHECKED_OUT
                and e.stat_matches(st)
                and (e.kind == ob.K_LINK or working_mode(st) == e.mode)
            ) or content_matches(repo, txn, repo.abspath(p), e, st)
            if clean:
                if old is not None:
                    changes.append(Change(p, "R", old))
            elif old is not None:
                changes.append(Change(p, "R", old, content_changed=True))
            else:
                changes.append(Change(p, "M"))

        stack: list[bytes] = []
        if scope is None or b"" in scope:
            stack = [b""]
        else:
            for s in scope:
                full = rootb + b"/" + s
                e = entries.get(s)
                if e is not None:
                    try:
                        st = os.lstat(full)
                    except FileNotFoundError:
                        continue
                    if st_.S_ISDIR(st.st_mode):
                        stack.append(s)
                    else:
                        check(s, e, st)
                elif os.path.isdir(full) and not os.path.islink(full):
                    stack.append(s)
                elif os.path.lexists(full):
                    changes.append(Change(s, "?"))
        while stack:
            rel = stack.pop()
            try:
                it = os.scandir(rootb + b"/" + rel if rel else rootb)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            with it:
                for de in it:
                    p = rel + b"/" + de.name if rel else de.name
                    e = entries.get(p)
                    if e is not None:
                        st = de.stat(follow_symlinks=False)
                        if st_.S_ISDIR(st.st_mode):
                            stack.append(p)
                        else:
                            check(p, e, st)
                        continue
                    if de.is_dir(follow_symlinks=False):
                        if de.name == BK_B or is_repo(Path(os.fsdecode(de.path))):
                            continue
                        if ignore and ignore.match(p, True) and not tracked_below(p):
                            continue
                        stack.append(p)
                    elif not (ignore and ignore.match(p, False)):
                        changes.append(Change(p, "?"))
        for p, e in entries.items():
            expected = e.flags & (CHECKED_OUT | ADDED) or p in state.moved
            if expected and p not in seen and _in_scope(p, scope):
                changes.append(Change(p, "!", state.moved.get(p)))
        changes += [Change(p, "D") for p in state.removed if _in_scope(p, scope)]
        changes.sort(key=lambda c: c.path)
        return [c.display() for c in changes]
