"""The working tree: its index, status, and checkout.

The index (``index`` table) has one entry per tracked path of the tip plus files staged by
``add``: the committed identity and content id, and the ``lstat`` of the working file when it
was last known to match.  ``status`` stats each file and hashes only those whose stat changed,
the way git's index works.  A file not checked out (a ``--checkout none`` clone, or a mount
that bkfs serves) has no stat recorded and is not a change; a file that *was* checked out and
has disappeared is reported missing (``!``) — deleting a file from history takes ``bkr rm``.

Staged removals and renames live in ``pending``: ``r<path>`` -> root key (path removed from the
tip), ``m<new path>`` -> old path (renamed).

Racy entries: a file modified within the same clock tick as its recorded stat could keep the
same stat.  An entry is only trusted if its mtime is older than the moment its stat was taken
(minus a margin); others are stored "unverified" and hashed on the next scan.

Updates of the working tree (pull, undo, push into this repo) are journaled: the transaction
that moves the tip records ``update = {from, to}``; the files are then rewritten (temp +
rename) and the journal cleared with the new index.  A crash in between is finished by the
next command that takes the lock (:func:`finish_interrupted_update`).
"""

from __future__ import annotations

import bisect
import json
import os
import stat as st_
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bkrepo import bamflow, trees
from bkrepo import objects as ob
from bkrepo.config import glob_match
from bkrepo.errors import ObjectCorrupt, ObjectMissing, PathError, WouldLoseWork
from bkrepo.ids import ObjectId
from bkrepo.pool import hash_stream, pid_alive
from bkrepo.repo import BK_B, Repo, is_repo
from bkrepo.store import Txn

CHECKED_OUT = 1  # stat fields describe a working file known to match ``id``
ADDED = 2  # staged by ``add``; not in the tip yet
FORCE_BAM = 4
FORCE_NOBAM = 8
RACY_NS = 50_000_000  # mtimes this close to the stat time are not trusted
BINARY_SNIFF = 8000
IGNORE_FILE = ".bkignore"

_ENTRY = struct.Struct("<BcIqqqq16s32s")
ZERO_ID = bytes(32)


class IndexEntry(NamedTuple):
    flags: int
    kind: str
    mode: int
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    rootkey: bytes
    id: bytes

    def pack(self) -> bytes:
        return _ENTRY.pack(
            self.flags,
            self.kind.encode(),
            self.mode,
            self.size,
            self.mtime_ns,
            self.ino,
            self.ctime_ns,
            self.rootkey,
            self.id,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> IndexEntry:
        f, k, mode, size, mt, ino, ct, rk, oid = _ENTRY.unpack(raw)
        return cls(f, k.decode(), mode, size, mt, ino, ct, rk, oid)

    def with_stat(self, st: os.stat_result, stat_time_ns: int) -> IndexEntry:
        """Checked out, with the file's stat recorded unless it is too recent to trust."""
        if st.st_mtime_ns >= stat_time_ns - RACY_NS:
            return self._replace(
                flags=self.flags | CHECKED_OUT, size=-1, mtime_ns=0, ino=0, ctime_ns=0
            )
        return self._replace(
            flags=self.flags | CHECKED_OUT,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ino=st.st_ino,
            ctime_ns=st.st_ctime_ns,
        )

    def not_checked_out(self) -> IndexEntry:
        return self._replace(
            flags=self.flags & ~CHECKED_OUT, size=-1, mtime_ns=0, ino=0, ctime_ns=0
        )

    def stat_matches(self, st: os.stat_result) -> bool:
        return (
            self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ino == st.st_ino
            and self.ctime_ns == st.st_ctime_ns
        )


def entry_from_tree(e: ob.TreeEntry) -> IndexEntry:
    return IndexEntry(0, e.kind, e.mode, -1, 0, 0, 0, e.rootkey, e.id)


# -- ignore rules ------------------------------------------------------------------------------
class Ignore:
    """``.bkignore`` at the root: one glob per line, ``#`` comments.  A pattern without ``/``
    matches a name at any depth; with ``/`` it matches the path from the root (a leading ``/``
    is optional); a trailing ``/`` matches directories only.  ``*`` and ``?`` never match
    ``/``; ``**`` does (:func:`bkrepo.config.glob_match`).  ``.bk`` is always ignored."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.names: list[tuple[str, bool]] = []
        self.paths: list[tuple[str, bool]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            if "/" in line:
                self.paths.append((line.lstrip("/"), dir_only))
            else:
                self.names.append((line, dir_only))

    @classmethod
    def load(cls, root: Path) -> Ignore:
        try:
            return cls((root / IGNORE_FILE).read_text(errors="surrogateescape").splitlines())
        except FileNotFoundError:
            return cls([])

    def __bool__(self) -> bool:
        return bool(self.names or self.paths)

    def match(self, path: bytes, is_dir: bool) -> bool:
        spath = path.decode("utf-8", "surrogateescape")
        name = spath.rsplit("/", 1)[-1]
        for pat, dir_only in self.names:
            if (is_dir or not dir_only) and glob_match(name, pat):
                return True
        for pat, dir_only in self.paths:
            if (is_dir or not dir_only) and glob_match(spath, pat):
                return True
        return False


# -- the loaded working state ------------------------------------------------------------------
@dataclass
class WorkState:
    """The index and pending operations, loaded in one read."""

    entries: dict[bytes, IndexEntry]
    removed: dict[bytes, bytes]  # tip path -> root key
    moved: dict[bytes, bytes]  # new path -> tip path
    tree: ObjectId | None  # the tip tree this index describes
    changed: dict[bytes, IndexEntry | None] = field(default_factory=dict)
    stale: bool = False  # rebuilt from the tree: save writes it whole

    @classmethod
    def load(cls, repo: Repo, txn: Txn) -> WorkState:
        """The working state.  While an update a crash cut short is pending (the journal, see
        :func:`finish_interrupted_update`), the index still describes the tree it started from."""
        tree = repo.tip_tree(txn)
        journal = txn.meta("update")
        if journal:
            start = json.loads(journal)["from"]
            tree = ObjectId(bytes.fromhex(start)) if start else None
        recorded = txn.meta("index_tree")
        removed: dict[bytes, bytes] = {}
        moved: dict[bytes, bytes] = {}
        for k, v in txn.cursor("pending"):
            k, v = bytes(k), bytes(v)
            if k[:1] == b"r":
                removed[k[1:]] = v
            elif k[:1] == b"m":
                moved[k[1:]] = v
        if recorded == (tree.hex() if tree else ""):
            entries = {bytes(k): IndexEntry.unpack(bytes(v)) for k, v in txn.cursor("index")}
            return cls(entries, removed, moved, tree)
        # No index for this tip yet (e.g. after `clone --checkout none`): every file is there,
        # none checked out.  Staged work cannot exist without an index, so pending is empty.
        entries = {}
        if tree is not None:
            entries = {
                p: entry_from_tree(e) for p, e in trees.walk(txn, tree) if e.kind in ob.LEAF_KINDS
            }
        return cls(entries, {}, {}, tree, stale=True)

    def set(self, path: bytes, entry: IndexEntry | None) -> None:
        if entry is None:
            self.entries.pop(path, None)
        else:
            self.entries[path] = entry
        self.changed[path] = entry

    def save(self, txn: Txn, tree: ObjectId | None, *, full: bool = False) -> None:
        """Write changed entries (or everything) and the pending table; mark the index current."""
        if full or self.stale:
            txn.clear("index")
            for p, e in self.entries.items():
                txn.put("index", p, e.pack())
        else:
            for p, e in self.changed.items():
                if e is None:
                    txn.delete("index", p)
                else:
                    txn.put("index", p, e.pack())
        txn.clear("pending")
        for p, rk in self.removed.items():
            txn.put("pending", b"r" + p, rk)
        for new, old in self.moved.items():
            txn.put("pending", b"m" + new, old)
        self.tree = tree
        txn.set_meta("index_tree", tree.hex() if tree else "")
        self.changed.clear()
        self.stale = False


# -- reading working files ---------------------------------------------------------------------
def is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF)


def working_mode(st: os.stat_result) -> int:
    return 0o777 if st_.S_ISLNK(st.st_mode) else st.st_mode & 0o777


def content_matches(repo: Repo, txn: Txn, path: Path, e: IndexEntry, st: os.stat_result) -> bool:
    """Does the working file hold the content (and kind and mode) the entry names?"""
    if e.flags & ADDED:
        return False
    if st_.S_ISLNK(st.st_mode):
        if e.kind != ob.K_LINK:
            return False
        return ob.obj_id(ob.BLOB, os.fsencode(os.readlink(path))) == e.id
    if not st_.S_ISREG(st.st_mode) or e.kind == ob.K_LINK:
        return False
    if working_mode(st) != e.mode:
        return False
    if e.kind == ob.K_BAM:
        ptr = txn.pointer(e.id)
        if ptr.size != st.st_size:
            return False
        with open(path, "rb", buffering=0) as f:
            return hash_stream(f, chunks=False).oid == ptr.oid
    return ob.obj_id(ob.BLOB, path.read_bytes()) == e.id


# -- status ------------------------------------------------------------------------------------
@dataclass
class Change:
    path: bytes
    code: str  # M modified, A added, D removed, R renamed, ! missing, ? untracked
    old_path: bytes | None = None
    content_changed: bool = False

    def display(self) -> str:
        p = os.fsdecode(self.path)
        if self.code == "R":
            flag = "RM" if self.content_changed else "R "
            return f"{flag} {os.fsdecode(self.old_path or b'')} -> {p}"
        return f"{self.code}  {p}"


@dataclass
class Scan:
    changes: list[Change]
    refreshed: dict[bytes, IndexEntry]


def _in_scope(path: bytes, scope: list[bytes] | None) -> bool:
    if scope is None:
        return True
    return any(not s or path == s or path.startswith(s + b"/") for s in scope)


def scan(
    repo: Repo,
    txn: Txn,
    state: WorkState,
    scope: list[bytes] | None = None,
    *,
    untracked: bool = True,
) -> Scan:
    """Compare the working tree with the index; hash only what stat says may have changed."""
    root = os.fsencode(repo.root)
    entries = state.entries
    ignore = Ignore.load(repo.root)
    sorted_keys: list[bytes] | None = None
    changes: list[Change] = []
    refreshed: dict[bytes, IndexEntry] = {}
    seen: set[bytes] = set()

    def has_tracked_below(prefix: bytes) -> bool:
        nonlocal sorted_keys
        if sorted_keys is None:
            sorted_keys = sorted(entries)
        i = bisect.bisect_left(sorted_keys, prefix + b"/")
        return i < len(sorted_keys) and sorted_keys[i].startswith(prefix + b"/")

    def check(p: bytes, e: IndexEntry, st: os.stat_result) -> None:
        seen.add(p)
        old = state.moved.get(p)
        if e.flags & ADDED:
            changes.append(Change(p, "A"))
            return
        if (
            e.flags & CHECKED_OUT
            and e.stat_matches(st)
            and (e.kind == ob.K_LINK or working_mode(st) == e.mode)
        ):
            if old is not None:
                changes.append(Change(p, "R", old))
            return
        now = time.time_ns()
        if content_matches(repo, txn, repo.abspath(p), e, st):
            refreshed[p] = e.with_stat(st, now)
            if old is not None:
                changes.append(Change(p, "R", old))
            return
        if old is not None:
            changes.append(Change(p, "R", old, content_changed=True))
        else:
            changes.append(Change(p, "M"))

    starts: list[bytes] = []
    if scope is None or b"" in scope:
        starts = [b""]
    else:
        for s in scope:
            full = root + b"/" + s
            e = entries.get(s)
            if e is not None:
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                if st_.S_ISDIR(st.st_mode):
                    starts.append(s)
                else:
                    check(s, e, st)
            elif os.path.isdir(full) and not os.path.islink(full):
                starts.append(s)
            elif untracked and os.path.lexists(full):
                changes.append(Change(s, "?"))

    stack = list(starts)
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(root + b"/" + rel if rel else root)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with it:
            for de in it:
                name = de.name
                p = rel + b"/" + name if rel else name
                e = entries.get(p)
                if e is not None:
                    st = de.stat(follow_symlinks=False)
                    if st_.S_ISDIR(st.st_mode):
                        stack.append(p)  # a tracked file replaced by a directory: missing below
                    else:
                        check(p, e, st)
                    continue
                if de.is_dir(follow_symlinks=False):
                    if name == BK_B or is_repo(Path(os.fsdecode(de.path))):
                        continue
                    if ignore and ignore.match(p, True) and not has_tracked_below(p):
                        continue
                    stack.append(p)
                elif untracked and not (ignore and ignore.match(p, False)):
                    changes.append(Change(p, "?"))

    for p, e in entries.items():
        if p in seen or not _in_scope(p, scope):
            continue
        if e.flags & (CHECKED_OUT | ADDED) or p in state.moved:
            changes.append(Change(p, "!", state.moved.get(p)))
    for p in state.removed:
        if _in_scope(p, scope):
            changes.append(Change(p, "D"))
    changes.sort(key=lambda c: c.path)
    return Scan(changes, refreshed)


def refresh_index(repo: Repo, state: WorkState, result: Scan) -> None:
    """Store stats learned by a scan, if no other process is writing (a pure speed-up)."""
    if not result.refreshed and not state.changed:
        return
    if not repo.try_lock():
        return
    try:
        with repo.store.write() as txn:
            if (repo.tip_tree(txn) or None) != state.tree:
                return
            for p, e in result.refreshed.items():
                state.set(p, e)
            state.save(txn, state.tree)
    finally:
        repo.unlock()


# -- writing working files ---------------------------------------------------------------------
def write_entry(repo: Repo, txn: Txn, path: bytes, e: ob.TreeEntry) -> os.stat_result:
    """Write one file of history into the working tree (temp + rename) and return its stat."""
    dest = repo.abspath(path)
    _make_parents(repo, dest.parent)
    if e.kind == ob.K_LINK:
        tmp = dest.with_name(f".{dest.name}.bkr-tmp{os.getpid()}")
        if os.path.lexists(tmp):
            tmp.unlink()
        os.symlink(os.fsdecode(txn.blob(e.id)), tmp)
        os.replace(tmp, dest)
    elif e.kind == ob.K_BAM:
        ptr = txn.pointer(e.id)
        if not repo.pool.has(ptr.oid):
            raise ObjectMissing(
                f"{os.fsdecode(path)}: BAM data {ptr.oid.hex()[:16]}… is not in the local pool "
                "and this repository has no BAM server to fetch it from"
            )
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise PathError(f"{os.fsdecode(path)}: a directory is in the way")
        try:
            repo.pool.copy_out(ptr.oid, dest, e.mode)
        except ObjectCorrupt as err:
            raise ObjectCorrupt(f"{os.fsdecode(path)}: {err}") from None
    else:
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise PathError(f"{os.fsdecode(path)}: a directory is in the way")
        tmp = dest.with_name(f".{dest.name}.bkr-tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = txn.blob(e.id)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, e.mode)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    return os.lstat(dest)


def _make_parents(repo: Repo, d: Path) -> None:
    if d.is_dir():
        return
    p = d
    while p != repo.root and not p.exists():
        p = p.parent
    if p != repo.root and not p.is_dir():
        raise PathError(f"{p.relative_to(repo.root)}: a file is in the way of a directory")
    d.mkdir(parents=True, exist_ok=True)


def remove_file(repo: Repo, path: bytes) -> None:
    full = repo.abspath(path)
    try:
        full.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return
    d = full.parent
    while d != repo.root:
        try:
            d.rmdir()
        except OSError:
            break
        d = d.parent


# -- updating the tree to another revision -----------------------------------------------------
@dataclass
class UpdatePlan:
    """What moving the working tree from one tree to another will do."""

    old_tree: ObjectId | None
    new_tree: ObjectId | None
    changes: list[trees.Change]


def plan_update(
    repo: Repo, txn: Txn, state: WorkState, new_tree: ObjectId | None, what: str
) -> UpdatePlan:
    """Check that moving to ``new_tree`` loses no uncommitted work; raise WouldLoseWork if it
    would (naming the files); otherwise return the plan."""
    changes = [c for c in trees.diff(txn, state.tree, new_tree) if not _is_comp(c)]
    touched = [c[0] for c in changes]
    pending = set(state.moved) | set(state.moved.values()) | set(state.removed)
    pending |= {p for p, e in state.entries.items() if e.flags & ADDED}
    blocked = sorted({os.fsdecode(p) for p in touched if p in pending})
    if touched:
        result = scan(repo, txn, state, touched, untracked=True)
        for ch in result.changes:
            if ch.code in ("M", "R", "A", "?") or (ch.code == "!" and ch.path in pending):
                blocked.append(os.fsdecode(ch.path))
        state_refresh = result.refreshed
        for p, e in state_refresh.items():
            state.entries[p] = e
    for p, _old, new in changes:
        if new is not None:
            # a new directory where an untracked file sits, or a file below a tracked path
            parent = p.rpartition(b"/")[0]
            while parent:
                full = repo.abspath(parent)
                if os.path.lexists(full) and not full.is_dir() and parent not in state.entries:
                    blocked.append(os.fsdecode(parent))
                parent = parent.rpartition(b"/")[0]
    if blocked:
        raise WouldLoseWork(
            what, set(blocked), "commit them, or move them out of the way, and retry"
        )
    return UpdatePlan(state.tree, new_tree, changes)


def _is_comp(change: trees.Change) -> bool:
    """A product's record of a component: the component's own repository owns its files."""
    _p, old, new = change
    return (old is not None and old.kind == ob.K_COMP) or (
        new is not None and new.kind == ob.K_COMP
    )


def apply_update(
    repo: Repo, txn: Txn, state: WorkState, plan: UpdatePlan, checkout_new: bool
) -> None:
    """Rewrite the working files a plan names and update the index in memory (the caller saves).

    Files that were checked out are rewritten; files that were not stay unmaterialised;
    new files are written only when ``checkout_new`` (the repo's checkout mode is ``get``).
    A renamed file that was checked out is checked out under its new name.
    """
    writes = update_writes(repo, state, plan, checkout_new)
    fetch_bam_for(repo, txn, writes, "update")
    for p, old, new in plan.changes:
        if new is None and old is not None:
            if os.path.lexists(repo.abspath(p)):
                remove_file(repo, p)
            state.set(p, None)
    written = {p for p, _ in writes}
    for p, _old, new in plan.changes:
        if new is not None and new.kind in ob.LEAF_KINDS and p not in written:
            state.set(p, entry_from_tree(new))  # not checked out before: leave it that way
    for p, new in writes:
        now = time.time_ns()
        st = write_entry(repo, txn, p, new)
        state.set(p, entry_from_tree(new).with_stat(st, now))
    state.tree = plan.new_tree


def update_writes(
    repo: Repo, state: WorkState, plan: UpdatePlan, checkout_new: bool
) -> list[tuple[bytes, ob.TreeEntry]]:
    """The files an update writes: those checked out before (under their new name if they
    moved), and new files when the checkout mode is ``get``."""
    was_out: set[bytes] = set()
    old_keys: set[bytes] = set()
    for p, old, _new in plan.changes:
        if old is not None:
            old_keys.add(old.rootkey)
            ie = state.entries.get(p)
            if (ie is not None and ie.flags & CHECKED_OUT) or os.path.lexists(repo.abspath(p)):
                was_out.add(old.rootkey)
    writes = []
    for p, _old, new in plan.changes:
        if new is None or new.kind not in ob.LEAF_KINDS:
            continue
        if new.rootkey in was_out or (new.rootkey not in old_keys and checkout_new):
            writes.append((p, new))
    return writes


def fetch_bam_for(
    repo: Repo, txn: Txn, entries: list[tuple[bytes, ob.TreeEntry]], what: str
) -> None:
    """Bring the BAM data of files about to be written into the pool, in one batch."""
    needed = {}
    for p, e in entries:
        if e.kind == ob.K_BAM:
            needed[txn.pointer(e.id).oid] = os.fsdecode(p)
    if needed:
        bamflow.ensure_local(repo, needed, what, paths=needed)


def begin_update(txn: Txn, plan: UpdatePlan) -> None:
    txn.set_meta(
        "update",
        json.dumps(
            {
                "from": plan.old_tree.hex() if plan.old_tree else "",
                "to": plan.new_tree.hex() if plan.new_tree else "",
            }
        ),
    )


def run_update(repo: Repo, plan: UpdatePlan, state: WorkState) -> None:
    """Second half of a journaled update: write the files, then save the index and clear the
    journal in one transaction."""
    checkout_new = repo.config_value("checkout") == "get"
    with repo.store.read() as rtxn:
        apply_update(repo, rtxn, state, plan, checkout_new)
    with repo.store.write() as txn:
        state.save(txn, plan.new_tree)
        txn.set_meta("update", None)


def finish_interrupted_update(repo: Repo) -> None:
    """Complete a working-tree update that a crash cut short (called under the lock)."""
    with repo.store.read() as txn:
        journal = txn.meta("update")
    if not journal:
        return
    j = json.loads(journal)
    old = ObjectId(bytes.fromhex(j["from"])) if j["from"] else None
    new = ObjectId(bytes.fromhex(j["to"])) if j["to"] else None
    with repo.store.read() as txn:
        state = WorkState.load(repo, txn)
        # The index still describes ``old``; files already rewritten will be found to match.
        state.tree = old
        plan = UpdatePlan(old, new, [c for c in trees.diff(txn, old, new) if not _is_comp(c)])
        _remove_dead_temps(repo, [p for p, _, _ in plan.changes])
        checkout_new = repo.config_value("checkout", txn) == "get"
        apply_update(repo, txn, state, plan, checkout_new)
    with repo.store.write() as txn:
        state.save(txn, new, full=True)
        txn.set_meta("update", None)


def _remove_dead_temps(repo: Repo, paths: Iterable[bytes]) -> None:
    """Temp files (``.NAME.bkr-tmpPID``) that a killed writer left next to these paths."""
    by_dir: dict[Path, set[str]] = {}
    for p in paths:
        full = repo.abspath(p)
        by_dir.setdefault(full.parent, set()).add(f".{full.name}.bkr-tmp")
    for d, prefixes in by_dir.items():
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            head, sep, pid = n.rpartition(".bkr-tmp")
            if sep and head + sep in prefixes and pid.isdigit() and not pid_alive(int(pid)):
                (d / n).unlink(missing_ok=True)


def checkout_all(repo: Repo, txn: Txn, tree: ObjectId | None, state: WorkState) -> None:
    """Materialise every file of ``tree`` into an empty working tree (clone --checkout get)."""
    if tree is None:
        return
    for p, e in trees.walk(txn, tree):
        if e.kind not in ob.LEAF_KINDS:
            continue
        now = time.time_ns()
        st = write_entry(repo, txn, p, e)
        state.set(p, entry_from_tree(e).with_stat(st, now))


def tracked_under(state: WorkState, rel: bytes) -> Iterator[bytes]:
    """Index paths at or under ``rel`` (b'' means everything)."""
    for p in state.entries:
        if not rel or p == rel or p.startswith(rel + b"/"):
            yield p
