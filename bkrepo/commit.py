"""Staging (add, rm, mv) and commit.

``commit`` without paths records every change to tracked files plus everything staged; with
paths, only changes at or under them.  The BAM decision for a new file is made when it is
first committed (as BitKeeper decides at check-in): forced by ``add --bam/--no-bam``, else
``bam.patterns``, else binary and at least ``bam.threshold``.  It holds for the file's life.
"""

from __future__ import annotations

import os
import stat as st_
import time
from dataclasses import dataclass
from pathlib import Path

from bkrepo import config as cfg
from bkrepo import objects as ob
from bkrepo import trees
from bkrepo.errors import NothingToCommit, PathError, UsageError, WouldLoseWork
from bkrepo.ids import ObjectId, new_root_key
from bkrepo.repo import BK_B, Repo, is_repo
from bkrepo.store import Txn
from bkrepo.worktree import (
    ADDED,
    FORCE_BAM,
    FORCE_NOBAM,
    ZERO_ID,
    Change,
    Ignore,
    IndexEntry,
    WorkState,
    is_binary,
    remove_file,
    scan,
    tracked_under,
    working_mode,
)


# -- add ---------------------------------------------------------------------------------------
def add(repo: Repo, paths: list[str], *, bam: bool | None = None) -> list[bytes]:
    """Stage new files (directories are walked, skipping ignored names and nested repos; a
    path inside a nested repo is refused: that repo tracks it)."""
    flags = ADDED if bam is None else ADDED | (FORCE_BAM if bam else FORCE_NOBAM)
    with repo.locked("add"):
        with repo.store.read() as txn:
            state = WorkState.load(repo, txn)
        ignore = Ignore.load(repo.root)
        added: list[bytes] = []
        for user_path in paths:
            rel = repo.relpath(user_path)
            full = repo.abspath(rel)
            if not os.path.lexists(full):
                raise PathError(f"add: {user_path}: no such file or directory")
            nested = _nested_repo(repo, rel)
            if nested is not None:
                raise PathError(
                    f"add: {user_path}: inside the nested repository {os.fsdecode(nested)}; "
                    "add it there"
                )
            if os.path.isdir(full) and not os.path.islink(full):
                candidates = list(_walk_untracked(repo, rel, state, ignore))
            else:
                candidates = [] if rel in state.entries else [rel]
            for p in candidates:
                seed = f"{time.time_ns()}".encode()
                rk = new_root_key(repo.project_id, p, seed)
                state.set(p, IndexEntry(flags, ob.K_FILE, 0, -1, 0, 0, 0, rk, ZERO_ID))
                added.append(p)
        with repo.store.write() as txn:
            state.save(txn, state.tree)
        return added


def _nested_repo(repo: Repo, rel: bytes) -> bytes | None:
    """The nested repository at or above ``rel`` (below the root), if there is one."""
    parts = rel.split(b"/") if rel else []
    for i in range(1, len(parts) + 1):
        prefix = b"/".join(parts[:i])
        if is_repo(repo.abspath(prefix)):
            return prefix
    return None


def _walk_untracked(repo: Repo, rel: bytes, state: WorkState, ignore: Ignore) -> list[bytes]:
    out: list[bytes] = []
    root = os.fsencode(repo.root)
    stack = [rel]
    while stack:
        d = stack.pop()
        with os.scandir(root + b"/" + d if d else root) as it:
            for de in it:
                p = d + b"/" + de.name if d else de.name
                if de.is_dir(follow_symlinks=False):
                    if de.name == BK_B or is_repo(repo.abspath(p)):
                        continue
                    if not ignore.match(p, True):
                        stack.append(p)
                elif (
                    p not in state.entries
                    and not ignore.match(p, False)
                    and (de.is_file(follow_symlinks=False) or de.is_symlink())
                ):
                    out.append(p)
    return sorted(out)


# -- rm ----------------------------------------------------------------------------------------
def rm(repo: Repo, paths: list[str], *, force: bool = False, keep: bool = False) -> list[bytes]:
    """Stage removals; working files go too (their content is safe in history), unless
    ``keep``.  Files with uncommitted changes are refused unless ``force``."""
    with repo.locked("rm"):
        with repo.store.read() as txn:
            state = WorkState.load(repo, txn)
            targets: list[bytes] = []
            for user_path in paths:
                rel = repo.relpath(user_path)
                found = list(tracked_under(state, rel))
                if not found:
                    raise PathError(f"rm: {user_path}: not a tracked file")
                targets.extend(found)
            if not force:
                dirty = [
                    c.path
                    for c in scan(repo, txn, state, targets, untracked=False).changes
                    if c.code in ("M",) or (c.code == "R" and c.content_changed)
                ]
                if dirty:
                    raise WouldLoseWork(
                        "rm", [os.fsdecode(p) for p in dirty], "commit them first or use rm -f"
                    )
        for p in targets:
            e = state.entries[p]
            if e.flags & ADDED:
                state.set(p, None)  # un-add: the file stays, untracked
                continue
            old = state.moved.pop(p, None)
            state.removed[old if old is not None else p] = e.rootkey
            state.set(p, None)
            if not keep:
                remove_file(repo, p)
        with repo.store.write() as txn:
            state.save(txn, state.tree)
        return targets


# -- mv ----------------------------------------------------------------------------------------
def mv(repo: Repo, src: str, dst: str) -> list[tuple[bytes, bytes]]:
    """Rename a tracked file or a directory of them; history follows (root keys stay)."""
    with repo.locked("mv"):
        with repo.store.read() as txn:
            state = WorkState.load(repo, txn)
        s = repo.relpath(src)
        d = repo.relpath(dst)
        if not s:
            raise PathError("mv: cannot move the repository root")
        dfull = repo.abspath(d)
        if dfull.is_dir() and not dfull.is_symlink():
            d = (d + b"/" if d else b"") + s.rsplit(b"/", 1)[-1]
            dfull = repo.abspath(d)
        moving = list(tracked_under(state, s))
        if not moving:
            raise PathError(f"mv: {src}: not a tracked file or directory")
        if d == s or d.startswith(s + b"/"):
            raise PathError(f"mv: cannot move {src} into itself")
        if os.path.lexists(dfull):
            raise PathError(f"mv: {dst}: already exists")
        pairs = [(p, d + p[len(s) :]) for p in moving]
        for _old, new in pairs:
            if new in state.entries:
                raise PathError(f"mv: {os.fsdecode(new)}: already tracked")
        sfull = repo.abspath(s)
        if os.path.lexists(sfull):
            dfull.parent.mkdir(parents=True, exist_ok=True)
            os.rename(sfull, dfull)
        for old, new in pairs:
            e = state.entries[old]
            state.set(old, None)
            state.set(new, e)
            if e.flags & ADDED:
                continue
            origin = state.moved.pop(old, old)
            if origin != new:
                state.moved[new] = origin
        with repo.store.write() as txn:
            state.save(txn, state.tree)
        return pairs


# -- commit ------------------------------------------------------------------------------------
@dataclass
class CommitResult:
    key: ObjectId
    changes: list[Change]
    warnings: list[str]


def commit(repo: Repo, message: str, paths: list[str] | None = None) -> CommitResult:
    check_message(message)
    with repo.locked("commit"):
        pending = pending_changes(repo, None if not paths else [repo.relpath(p) for p in paths])
        if not pending.changes:
            raise NothingToCommit("commit: nothing to commit (use 'bkr add' for new files)")
        key = record(repo, pending, message)
        return CommitResult(key, pending.changes, pending.warnings)


def check_message(message: str) -> None:
    if not message.strip():
        raise UsageError("commit: an empty comment is not allowed; use -m MESSAGE")


@dataclass
class Pending:
    """What a commit would record: the working state and the changes in scope."""

    state: WorkState
    changes: list[Change]
    warnings: list[str]


def pending_changes(repo: Repo, scope: list[bytes] | None) -> Pending:
    """The changes a commit of ``scope`` (repo-relative paths; None: everything) would
    record, checked to be committable (caller holds the lock)."""
    with repo.store.read() as txn:
        state = WorkState.load(repo, txn)
        for rel in scope or []:
            if not _known(repo, state, rel):
                raise PathError(f"commit: {os.fsdecode(rel)}: no such file or directory")
        result = scan(repo, txn, state, scope, untracked=False)
    changes = [c for c in result.changes if c.code in "MADR"]
    warnings = [
        f"{os.fsdecode(c.path)} is missing: 'bkr rm' it to delete it from history, "
        "or 'bkr get' it to restore it"
        for c in result.changes
        if c.code == "!"
    ]
    if scope is not None:
        # a rename is committed whole when either of its names is named
        for new, old in state.moved.items():
            if any(_under(old, s) for s in scope) and not any(c.path == new for c in changes):
                changes.extend(c for c in scan_one(repo, state, new) if c.code == "R")
    for c in changes:
        if c.code in "AMR" and not os.path.lexists(repo.abspath(c.path)):
            raise PathError(f"commit: {os.fsdecode(c.path)}: file vanished")
    return Pending(state, changes, warnings)


def record(
    repo: Repo,
    pending: Pending,
    message: str,
    extra: dict[bytes, ob.TreeEntry | None] | None = None,
    when: tuple[str, int] | None = None,
) -> ObjectId:
    """Record pending changes, plus ``extra`` tree edits (a product's component entries), as
    one new cset in one transaction (caller holds the lock).  ``when``: the author and time
    to record instead of the user and now (partition's deterministic csets)."""
    with repo.store.write() as txn:
        return _record(repo, txn, pending.state, pending.changes, message, extra, when)


def _known(repo: Repo, state: WorkState, rel: bytes) -> bool:
    if os.path.lexists(repo.abspath(rel)) or any(True for _ in tracked_under(state, rel)):
        return True
    return any(_under(p, rel) for p in (*state.removed, *state.moved.values()))


def _under(p: bytes, scope: bytes) -> bool:
    return not scope or p == scope or p.startswith(scope + b"/")


def scan_one(repo: Repo, state: WorkState, path: bytes) -> list[Change]:
    with repo.store.read() as txn:
        return scan(repo, txn, state, [path], untracked=False).changes


def _record(
    repo: Repo,
    txn: Txn,
    state: WorkState,
    changes: list[Change],
    message: str,
    extra: dict[bytes, ob.TreeEntry | None] | None = None,
    when: tuple[str, int] | None = None,
) -> ObjectId:
    author, now = when if when is not None else (repo.author(), repo.now())
    tip = repo.tip(txn)
    threshold = repo.bam_threshold(txn)
    globs = repo.bam_patterns(txn)
    edits: dict[bytes, ob.TreeEntry | None] = dict(extra or {})
    for c in changes:
        if c.code == "D":
            edits.setdefault(c.path, None)
            state.removed.pop(c.path, None)
            continue
        if c.code == "R":
            assert c.old_path is not None
            edits.setdefault(c.old_path, None)
            state.moved.pop(c.path, None)
        e = state.entries[c.path]
        full = repo.abspath(c.path)
        stat_time = time.time_ns()
        st = os.lstat(full)
        if c.code == "R" and not c.content_changed:
            old = trees.lookup(txn, state.tree, c.old_path) if state.tree else None  # type: ignore[arg-type]
            assert old is not None
            edits[c.path] = old
            continue
        kind = _kind_for(repo, c.path, full, st, e, threshold, globs)
        if kind == ob.K_LINK:
            target = os.fsencode(os.readlink(full))
            oid = txn.put_object(ob.BLOB, target)
            size = len(target)
        elif kind == ob.K_BAM:
            hashed = repo.pool.ingest_file(full)
            ptr, chunk_list = hashed.pointer()
            txn.put_object(ob.CHNK, chunk_list)
            oid = txn.put_object(ob.BAMP, ptr.encode())
            size = hashed.size
        else:
            data = full.read_bytes()
            oid = txn.put_object(ob.BLOB, data)
            size = len(data)
        mode = working_mode(st)
        edits[c.path] = ob.TreeEntry(b"", kind, mode, size, now, e.rootkey, oid)
        new_entry = IndexEntry(0, kind, mode, -1, 0, 0, 0, e.rootkey, oid)
        # Record the stat taken before reading only if the file still matches what we stored.
        st2 = os.lstat(full)
        if (st2.st_size, st2.st_mtime_ns, st2.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino):
            new_entry = new_entry.with_stat(st, stat_time)
        state.set(c.path, new_entry)
    new_tree = trees.apply_edits(txn, state.tree, edits)
    cset = ob.Cset(
        parents=(tip,) if tip else (),
        tree=new_tree,
        author=author,
        time=now,
        comment=message,
    )
    key = txn.put_object(ob.CSET, cset.encode())
    repo.record_cset(txn, key, cset)
    txn.set_meta("tip", key.hex())
    state.save(txn, new_tree)
    return key


def _kind_for(
    repo: Repo,
    path: bytes,
    full: Path,
    st: os.stat_result,
    e: IndexEntry,
    threshold: int | None,
    globs: list[str],
) -> str:
    if st_.S_ISLNK(st.st_mode):
        return ob.K_LINK
    if not st_.S_ISREG(st.st_mode):
        raise PathError(f"commit: {os.fsdecode(path)}: not a regular file or symlink")
    if not e.flags & ADDED and e.kind in (ob.K_FILE, ob.K_BAM):
        return e.kind  # BAM or not for the file's whole life
    if e.flags & FORCE_BAM:
        return ob.K_BAM
    if e.flags & FORCE_NOBAM:
        return ob.K_FILE
    if globs and cfg.matches_any(os.fsdecode(path), globs):
        return ob.K_BAM
    if threshold is not None and st.st_size >= threshold and is_binary(full):
        return ob.K_BAM
    return ob.K_FILE
