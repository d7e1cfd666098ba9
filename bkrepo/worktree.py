"""The working tree: its index, status, and checkout.

The index has one entry per tracked path of the tip plus files staged by ``add``: the
committed identity and content id, and the ``lstat`` of the working file when it was last
known to match.  ``status`` stats each file and hashes only those whose stat changed, the way
git's index works.  A file not checked out (a ``--checkout none`` clone, or a mount that bkfs
serves) has no stat recorded and is not a change; a file that *was* checked out and has
disappeared is reported missing (``!``) — deleting a file from history takes ``bkr rm``.

On disk (``index`` table, format 2) the index is one record per directory that holds tracked
files or has such a directory below it, keyed by ``/`` and the directory's path (``/``: the
root): its file names and subdirectory names, each file's stat packed the way status compares
it, each file's identity, and optionally the directory's own stat, recorded when its listing
was exactly the names the record expects.  Status therefore loads the index in one pass over
~1 % as many keys as files, checks a directory's files with one comparison of packed bytes,
and does not list a directory whose stat says no name came or went (the idea of git's
untracked cache).  Format 1 (one key per path) is still read; the first write converts it.
The ``index_format`` meta key says which format the table holds.

Staged removals and renames live in ``pending``: ``r<path>`` -> root key (path removed from the
tip), ``m<new path>`` -> old path (renamed).

Racy entries: a file modified within the same clock tick as its recorded stat could keep the
same stat.  An entry is only trusted if its mtime is older than the moment its stat was taken
(minus a margin); others are stored "unverified" and hashed on the next scan.  A directory's
stat is recorded under the same rule.

Updates of the working tree (pull, undo, push into this repo) are journaled: the transaction
that moves the tip records ``update = {from, to}``; the files are then rewritten (temp +
rename) and the journal cleared with the new index.  A crash in between is finished by the
next command that takes the lock (:func:`finish_interrupted_update`).
"""

from __future__ import annotations

import json
import os
import stat as st_
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import starmap
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

from bkrepo import objects as ob
from bkrepo import trees
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
INDEX_FORMAT = "2"
PARALLEL_FILES = 20_000  # a whole-tree status with this many files lstats on two cores

_ENTRY_V1 = struct.Struct("<BcIqqqq16s32s")  # format 1: one value per path
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

    @classmethod
    def from_v1(cls, raw: bytes) -> IndexEntry:
        """An entry of a format-1 index."""
        f, k, mode, size, mt, ino, ct, rk, oid = _ENTRY_V1.unpack(raw)
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


# -- the index on disk: one record per directory -----------------------------------------------
# A record: _HEAD, the file names joined by NUL, the subdirectory names joined by NUL, one
# _STAT per file, one _IDENT per file.  Files expected in the working tree (checked out or
# added) come first, so their names and stats are one prefix of each list.
# flags, the directory's ino/mtime/ctime, files, expected files, name bytes, subdirectory bytes
_HEAD = struct.Struct("<BQqqIIII")
_STAT = struct.Struct("<qqqQI")  # a file's mtime, ctime, size, ino, st_mode (0: untrusted)
_IDENT = struct.Struct("<BcI16s32s")  # flags, kind, mode, root key, id
_DIR_STAT = struct.Struct("<Qqq")  # the directory's ino, mtime, ctime: _HEAD's bytes 1..24
_STAT_KEY = attrgetter("st_mtime_ns", "st_ctime_ns", "st_size", "st_ino", "st_mode")
_DIR_STAT_KEY = attrgetter("st_ino", "st_mtime_ns", "st_ctime_ns")
HAS_DIR_STAT = 1  # record flag: the directory stat is set
OVERLAP = 2  # record flag: a name is both a file and a subdirectory (status reads it the slow way)
EXPECTED = CHECKED_OUT | ADDED  # entry flags of a file that should be in the working tree
_KINDS = {bytes([i]): chr(i) for i in range(128)}  # kind byte -> kind (cheaper than decode)
_new_tuple = tuple.__new__  # IndexEntry without its Python-level __new__: decoding is hot


def _stat_mode(e: IndexEntry) -> int:
    """The ``st_mode`` of a working file that matches ``e`` by its stat alone, or 0 (which no
    lstat returns) if its stat says nothing: not checked out, added, or recorded racy."""
    if e.flags & ADDED or not e.flags & CHECKED_OUT or e.size < 0:
        return 0
    return (st_.S_IFLNK | 0o777) if e.kind == ob.K_LINK else (st_.S_IFREG | e.mode)


class DirRecord:
    """One directory of the index as stored (see the module docstring for the layout)."""

    __slots__ = ("at", "body", "dir_stat", "names", "overlap", "present", "subdirs")

    def __init__(
        self,
        names: list[bytes],
        present: int,
        subdirs: list[bytes],
        body: bytes,
        at: int,
        dir_stat: bytes | None,
        overlap: bool,
    ) -> None:
        self.names = names  # the files: the first ``present`` should be in the working tree
        self.present = present
        self.subdirs = subdirs  # sorted
        self.body = body  # from offset ``at``: one _STAT per file, then one _IDENT per file
        self.at = at
        self.dir_stat = dir_stat  # packed _DIR_STAT, if recorded
        self.overlap = overlap

    @classmethod
    def decode(cls, raw: bytes) -> DirRecord:
        flags, _ino, _mt, _ct, n, present, nlen, slen = _HEAD.unpack_from(raw)
        pos = _HEAD.size
        names = raw[pos : pos + nlen].split(b"\0") if n else []
        pos += nlen
        subdirs = raw[pos : pos + slen].split(b"\0") if slen else []
        dir_stat = raw[1 : 1 + _DIR_STAT.size] if flags & HAS_DIR_STAT else None
        return cls(names, present, subdirs, raw, pos + slen, dir_stat, bool(flags & OVERLAP))

    @classmethod
    def build(cls, files: dict[bytes, IndexEntry], subdirs: Iterable[bytes]) -> DirRecord:
        """A record (without a directory stat) for files keyed by name."""
        names = sorted(files, key=lambda n: (not files[n].flags & EXPECTED, n))
        ents = [files[n] for n in names]
        subs = sorted(subdirs)
        body = b"".join(
            _STAT.pack(e.mtime_ns, e.ctime_ns, e.size, e.ino, _stat_mode(e)) for e in ents
        ) + b"".join(_IDENT.pack(e.flags, e.kind.encode(), e.mode, e.rootkey, e.id) for e in ents)
        present = sum(1 for e in ents if e.flags & EXPECTED)
        return cls(names, present, subs, body, 0, None, not files.keys().isdisjoint(subs))

    def encode(self) -> bytes:
        names, subs = b"\0".join(self.names), b"\0".join(self.subdirs)
        flags = (HAS_DIR_STAT if self.dir_stat else 0) | (OVERLAP if self.overlap else 0)
        dstat = _DIR_STAT.unpack(self.dir_stat) if self.dir_stat else (0, 0, 0)
        head = _HEAD.pack(flags, *dstat, len(self.names), self.present, len(names), len(subs))
        return head + names + subs + self.body[self.at :]

    def expected_stats(self) -> bytes:
        """The packed stats of the files that should be in the working tree."""
        return self.body[self.at : self.at + self.present * _STAT.size]

    def files(self, prefix: bytes = b"") -> dict[bytes, IndexEntry]:
        """The entries, keyed by ``prefix + name``, in record order (expected files first)."""
        view = memoryview(self.body)
        mid = self.at + len(self.names) * _STAT.size
        return {
            prefix + name: _new_tuple(IndexEntry, (f, _KINDS[k], mode, size, mt, ino, ct, rk, oid))
            for name, (mt, ct, size, ino, _m), (f, k, mode, rk, oid) in zip(
                self.names,
                _STAT.iter_unpack(view[self.at : mid]),
                _IDENT.iter_unpack(view[mid : mid + len(self.names) * _IDENT.size]),
                strict=True,
            )
        }

    def signature(self) -> bytes:
        """What a recorded directory stat vouches for: the names the listing held."""
        return b"\0".join(self.names[: self.present]) + b"/" + b"\0".join(self.subdirs)


def _by_directory(
    entries: dict[bytes, IndexEntry],
) -> dict[bytes, tuple[dict[bytes, IndexEntry], set[bytes]]]:
    """Entries grouped by directory (keyed by name), with each directory's subdirectories;
    every ancestor of a directory with files is included."""
    files: dict[bytes, dict[bytes, IndexEntry]] = {}
    for p, e in entries.items():
        d, _, name = p.rpartition(b"/")
        here = files.get(d)
        if here is None:
            files[d] = here = {}
        here[name] = e
    subdirs: dict[bytes, set[bytes]] = {}
    for d in files:
        while d:
            parent, _, name = d.rpartition(b"/")
            known = subdirs.setdefault(parent, set())
            if name in known:
                break
            known.add(name)
            d = parent
    return {d: (files.get(d, {}), subdirs.get(d, set())) for d in files.keys() | subdirs.keys()}


DirStats = dict[bytes, tuple[bytes, bytes]]  # directory -> (its packed stat, record signature)


def _vouched(d: bytes, rec: DirRecord, fresh: DirStats, old: DirRecord | None) -> bytes | None:
    """The directory stat a rewritten record keeps: one a scan just took, else the one it had,
    as long as the record still names what that stat vouched for."""
    sig = rec.signature()
    got = fresh.get(d)
    if got is not None and got[1] == sig:
        return got[0]
    if old is not None and old.dir_stat is not None and old.signature() == sig:
        return old.dir_stat
    return None


class _Records:
    """Read-modify-write of directory records inside one write transaction, keeping every
    ancestor of a directory with files recorded (and listed as its parent's subdirectory)."""

    def __init__(self, txn: Txn, fresh: DirStats) -> None:
        self.txn = txn
        self.fresh = fresh
        self.written: dict[bytes, DirRecord | None] = {}

    def get(self, d: bytes) -> DirRecord | None:
        raw = self.txn.get("index", b"/" + d)
        return DirRecord.decode(raw) if raw is not None else None

    def update(self, d: bytes, edits: dict[bytes, IndexEntry | None]) -> None:
        old = self.get(d)
        files = old.files() if old else {}
        for name, e in edits.items():
            if e is None:
                files.pop(name, None)
            else:
                files[name] = e
        self.put(d, files, old.subdirs if old else [], old)

    def put(
        self, d: bytes, files: dict[bytes, IndexEntry], subdirs: list[bytes], old: DirRecord | None
    ) -> None:
        parent, _, name = d.rpartition(b"/")
        if not files and not subdirs:
            if old is not None:
                self.txn.delete("index", b"/" + d)
                self.written[d] = None
                if d:
                    p = self.get(parent)
                    if p is not None and name in p.subdirs:
                        self.put(parent, p.files(), [s for s in p.subdirs if s != name], p)
            return
        rec = DirRecord.build(files, subdirs)
        rec.dir_stat = _vouched(d, rec, self.fresh, old)
        self.txn.put("index", b"/" + d, rec.encode())
        self.written[d] = rec
        if old is None and d:
            p = self.get(parent)
            if p is None or name not in p.subdirs:
                self.put(parent, p.files() if p else {}, [*(p.subdirs if p else []), name], p)


class _Entries(dict[bytes, IndexEntry]):
    """The decoded index, noting whether it was changed other than through
    :meth:`WorkState.set` (then the stored records no longer describe it)."""

    touched = False

    def __setitem__(self, key: bytes, value: IndexEntry) -> None:
        self.touched = True
        super().__setitem__(key, value)

    def __delitem__(self, key: bytes) -> None:
        self.touched = True
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self.touched = True
        return super().pop(*args)

    def popitem(self) -> tuple[bytes, IndexEntry]:
        self.touched = True
        return super().popitem()

    def clear(self) -> None:
        self.touched = True
        super().clear()

    def update(self, *args: Any, **kw: Any) -> None:
        self.touched = True
        super().update(*args, **kw)

    def setdefault(self, key: bytes, default: Any = None) -> Any:
        self.touched = True
        return super().setdefault(key, default)


def _link_dir(dirs: dict[bytes, DirRecord], d: bytes) -> None:
    """A new directory record: make sure its ancestors list it (in memory)."""
    while d:
        parent, _, name = d.rpartition(b"/")
        rec = dirs.get(parent)
        if rec is not None and name in rec.subdirs:
            return
        files, subs = (rec.files(), rec.subdirs) if rec else ({}, [])
        dirs[parent] = DirRecord.build(files, [*subs, name])
        if rec is not None:
            return
        d = parent


def _unlink_dir(dirs: dict[bytes, DirRecord], d: bytes) -> None:
    """A directory record gone: drop it from its parent, and the parent if now empty."""
    while d:
        parent, _, name = d.rpartition(b"/")
        rec = dirs.get(parent)
        if rec is None or name not in rec.subdirs:
            return
        subs = [s for s in rec.subdirs if s != name]
        if rec.names or subs:
            dirs[parent] = DirRecord.build(rec.files(), subs)
            return
        del dirs[parent]
        d = parent


# -- the loaded working state ------------------------------------------------------------------
class WorkState:
    """The index and pending operations, loaded in one read.

    ``entries`` (path -> entry) is built on first use: status works from the directory records
    and decodes only the directories it has to look into."""

    def __init__(
        self,
        records: dict[bytes, DirRecord] | None,
        entries: dict[bytes, IndexEntry] | None,
        removed: dict[bytes, bytes],
        moved: dict[bytes, bytes],
        tree: ObjectId | None,
        *,
        stale: bool = False,
        serial: str = "",
    ) -> None:
        self._records = records
        self._entries = _Entries(entries) if entries is not None else None
        self.removed = removed  # tip path -> root key
        self.moved = moved  # new path -> tip path
        self.tree = tree  # the tip tree this index describes
        self.changed: dict[bytes, IndexEntry | None] = {}
        self.stale = stale  # not stored in this form (rebuilt from the tree, or format 1)
        self.serial = serial  # the index's write count when loaded

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
        serial = txn.meta("index_serial") or ""
        removed: dict[bytes, bytes] = {}
        moved: dict[bytes, bytes] = {}
        for k, v in txn.cursor("pending"):
            k, v = bytes(k), bytes(v)
            if k[:1] == b"r":
                removed[k[1:]] = v
            elif k[:1] == b"m":
                moved[k[1:]] = v
        if recorded == (tree.hex() if tree else ""):
            if txn.meta("index_format") == INDEX_FORMAT:
                records = {bytes(k[1:]): DirRecord.decode(bytes(v)) for k, v in txn.cursor("index")}
                return cls(records, None, removed, moved, tree, serial=serial)
            entries = {bytes(k): IndexEntry.from_v1(bytes(v)) for k, v in txn.cursor("index")}
            return cls(None, entries, removed, moved, tree, stale=True, serial=serial)
        # No index for this tip yet (e.g. after `clone --checkout none`): every file is there,
        # none checked out.  Staged work cannot exist without an index, so pending is empty.
        entries = {}
        if tree is not None:
            entries = {
                p: entry_from_tree(e) for p, e in trees.walk(txn, tree) if e.kind in ob.LEAF_KINDS
            }
        return cls(None, entries, {}, {}, tree, stale=True, serial=serial)

    @property
    def entries(self) -> _Entries:
        """Every entry by path (decoded on first use)."""
        if self._entries is None:
            entries = _Entries()
            for d, rec in (self._records or {}).items():
                entries.update(rec.files(d + b"/" if d else b""))
            for p, e in self.changed.items():
                if e is None:
                    dict.pop(entries, p, None)
                else:
                    dict.__setitem__(entries, p, e)
            entries.touched = False
            self._entries = entries
        return self._entries

    def dirs(self) -> dict[bytes, DirRecord]:
        """The index by directory, as status reads it: the stored records, with the directories
        of entries changed through :meth:`set` rebuilt; all rebuilt from ``entries`` if the
        dict itself was changed."""
        if self._records is None or (self._entries is not None and self._entries.touched):
            return {
                d: DirRecord.build(files, subs)
                for d, (files, subs) in _by_directory(self.entries).items()
            }
        if not self.changed:
            return self._records
        dirs = dict(self._records)
        by_dir: dict[bytes, dict[bytes, IndexEntry | None]] = {}
        for p, e in self.changed.items():
            d, _, name = p.rpartition(b"/")
            by_dir.setdefault(d, {})[name] = e
        for d, edits in by_dir.items():
            rec = dirs.get(d)
            files = rec.files() if rec else {}
            for name, e in edits.items():
                if e is None:
                    files.pop(name, None)
                else:
                    files[name] = e
            subs = rec.subdirs if rec else []
            if not files and not subs:
                dirs.pop(d, None)
                _unlink_dir(dirs, d)
            else:
                dirs[d] = DirRecord.build(files, subs)
                if rec is None:
                    _link_dir(dirs, d)
        return dirs

    def set(self, path: bytes, entry: IndexEntry | None) -> None:
        if self._entries is not None:
            if entry is None:
                dict.pop(self._entries, path, None)
            else:
                dict.__setitem__(self._entries, path, entry)
        self.changed[path] = entry

    def save(
        self,
        txn: Txn,
        tree: ObjectId | None,
        *,
        full: bool = False,
        dir_stats: DirStats | None = None,
    ) -> None:
        """Write the directories of changed entries (or everything) and the pending table; mark
        the index current.  ``dir_stats`` are directory stats a scan took (see :func:`scan`)."""
        fresh = dir_stats or {}
        if full or self.stale:
            old: dict[bytes, DirRecord] = {}
            if txn.meta("index_format") == INDEX_FORMAT:
                old = {bytes(k[1:]): DirRecord.decode(bytes(v)) for k, v in txn.cursor("index")}
            txn.clear("index")
            built = {}
            for d, (files, subs) in _by_directory(self.entries).items():
                rec = built[d] = DirRecord.build(files, subs)
                rec.dir_stat = _vouched(d, rec, fresh, old.get(d))
                txn.put("index", b"/" + d, rec.encode())
            txn.set_meta("index_format", INDEX_FORMAT)
            self._records = built
            self.entries.touched = False
        else:
            by_dir: dict[bytes, dict[bytes, IndexEntry | None]] = {}
            for p, e in self.changed.items():
                d, _, name = p.rpartition(b"/")
                by_dir.setdefault(d, {})[name] = e
            records = _Records(txn, fresh)
            for d, edits in by_dir.items():
                records.update(d, edits)
            for d in fresh.keys() - by_dir.keys():
                records.update(d, {})
            if self._records is not None:
                for d, rec in records.written.items():
                    if rec is None:
                        self._records.pop(d, None)
                    else:
                        self._records[d] = rec
        txn.clear("pending")
        for p, rk in self.removed.items():
            txn.put("pending", b"r" + p, rk)
        for new, old_path in self.moved.items():
            txn.put("pending", b"m" + new, old_path)
        self.tree = tree
        txn.set_meta("index_tree", tree.hex() if tree else "")
        self.serial = str(int(txn.meta("index_serial") or 0) + 1)
        txn.set_meta("index_serial", self.serial)
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
class Change(NamedTuple):
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


class Scan(NamedTuple):
    changes: list[Change]
    refreshed: dict[bytes, IndexEntry]
    dir_stats: DirStats  # directories whose listing was exact


def _in_scope(path: bytes, scope: list[bytes] | None) -> bool:
    if scope is None:
        return True
    return any(not s or path == s or path.startswith(s + b"/") for s in scope)


def _dir_in_scope(d: bytes, scope: list[bytes] | None) -> bool:
    """Could a file directly in directory ``d`` be in scope?"""
    if scope is None:
        return True
    return any(
        not s or d == s or d.startswith(s + b"/") or s.rpartition(b"/")[0] == d for s in scope
    )


def _listed_subdirs(rec: DirRecord, names: list[bytes], is_root: bool) -> list[bytes] | None:
    """The record's subdirectories among a directory's names, if those names are only the
    record's: every file expected there is, and nothing else is (but ``.bk`` at the root).
    None if the directory must be read entry by entry."""
    if rec.overlap:
        return None
    got = set(names)
    if is_root:
        got.discard(BK_B)
    elif BK_B in got:
        return None
    present = rec.names[: rec.present]
    if not got.issuperset(present):
        return None
    got.difference_update(present)
    if not got.issubset(rec.subdirs):
        return None
    return list(got)


def _differ(root: bytes, dirs: dict[bytes, DirRecord], batch: list[bytes]) -> list[bytes]:
    """The directories of ``batch`` where an expected file's packed lstat differs from the
    record (or a file is gone): all the per-file work of a status of an unchanged tree, done
    by C loops (map over os.lstat, one bytes comparison per directory).

    Unless another thread could be using the working directory, it changes into each
    directory and stats bare names (restoring the working directory after): the kernel then
    resolves one path component per file instead of the whole path (~15 % of its time)."""
    try:
        here = None if _threads_running() else os.open(".", os.O_RDONLY)
    except OSError:
        here = None
    out = []
    try:
        for rel in batch:
            rec = dirs[rel]
            names = rec.names[: rec.present]
            path = root + b"/" + rel if rel else root
            try:
                if here is not None:
                    os.chdir(path)
                    stats = map(os.lstat, names)
                else:
                    stats = map(os.lstat, map((path + b"/").__add__, names))
                got = b"".join(starmap(_STAT.pack, map(_STAT_KEY, stats)))
            except OSError:
                got = b""
            if got != rec.expected_stats():
                out.append(rel)
    finally:
        if here is not None:
            os.fchdir(here)
            os.close(here)
    return out


def _stats_differ(
    root: bytes, dirs: dict[bytes, DirRecord], batch: list[bytes], *, parallel: bool
) -> set[bytes]:
    """:func:`_differ` of ``batch``; with many files, half of the directories are checked by a
    forked child, so the lstat calls run on two cores (git's preload-index does the same with
    threads; Python threads would take turns on the GIL).  Only in a process without other
    threads; the child runs nothing but the lstat loop and leaves by ``os._exit``.  If the
    child fails, its half is checked here."""
    files = sum(dirs[d].present for d in batch) if parallel else 0
    if files < PARALLEL_FILES or (os.cpu_count() or 1) < 2 or _threads_running():
        return set(_differ(root, dirs, batch))
    theirs, ours = batch[0::2], batch[1::2]
    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(rfd)
        os.close(wfd)
        return set(_differ(root, dirs, batch))
    if pid == 0:  # the child
        code = 1
        try:
            os.close(rfd)
            index = {d: i for i, d in enumerate(theirs)}
            found = [index[d] for d in _differ(root, dirs, theirs)]
            data = struct.pack(f"<I{len(found)}I", len(found), *found)
            while data:
                data = data[os.write(wfd, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        out = set(_differ(root, dirs, ours))
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, wstatus = os.waitpid(pid, 0)
    data = b"".join(chunks)
    n = struct.unpack_from("<I", data)[0] if len(data) >= 4 else -1
    if os.waitstatus_to_exitcode(wstatus) != 0 or len(data) != 4 + 4 * n:
        return out | set(_differ(root, dirs, theirs))
    return out | {theirs[i] for i in struct.unpack_from(f"<{n}I", data, 4)}


def _threads_running() -> bool:
    threading = sys.modules.get("threading")
    return threading is not None and threading.active_count() > 1


def scan(
    repo: Repo,
    txn: Txn,
    state: WorkState,
    scope: list[bytes] | None = None,
    *,
    untracked: bool = True,
) -> Scan:
    """Compare the working tree with the index; hash only what stat says may have changed.

    Directory by directory, the cheapest way that is exact: a directory whose stat is the one
    recorded when its listing was exactly the record's names is not listed; one whose listing
    holds just the record's names is not read entry by entry; its files are lstat'ed and their
    packed stats compared with the record's in one comparison.  Only a directory where one of
    these differs is walked file by file (and only files whose stat differs are hashed)."""
    root = os.fsencode(repo.root)
    dirs = state.dirs()
    moved = state.moved
    moved_dirs = {p.rpartition(b"/")[0] for p in moved}
    changes: list[Change] = []
    refreshed: dict[bytes, IndexEntry] = {}
    dir_stats: DirStats = {}
    seen: set[bytes] = set()  # files check() looked at
    done: set[bytes] = set()  # directories whose every file was found unchanged
    visited: set[bytes] = set()
    decoded: dict[bytes, dict[bytes, IndexEntry]] = {}
    # (directory, from a listing of the record's names: its type and nested-repo check to do)
    stack: list[tuple[bytes, bool]] = []
    compare: list[bytes] = []  # directories whose names are the record's: compare their files
    ignore: list[Ignore] = []  # loaded on first use

    def ignored(p: bytes, is_dir: bool) -> bool:
        if not ignore:
            ignore.append(Ignore.load(repo.root))
        return bool(ignore[0]) and ignore[0].match(p, is_dir)

    def files_of(d: bytes) -> dict[bytes, IndexEntry]:
        files = decoded.get(d)
        if files is None:
            rec = dirs.get(d)
            files = decoded[d] = rec.files(d + b"/" if d else b"") if rec else {}
        return files

    def check(p: bytes, e: IndexEntry, st: os.stat_result) -> None:
        if p in seen:
            return
        seen.add(p)
        old = moved.get(p)
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

    def untracked_file(p: bytes) -> None:
        if untracked and not ignored(p, False):
            changes.append(Change(p, "?"))

    def read_dir(rel: bytes, full: bytes) -> None:
        """The directory entry by entry."""
        rec = dirs.get(rel)
        files = files_of(rel)
        subdirs = set(rec.subdirs) if rec else set()
        prefix = rel + b"/" if rel else b""
        try:
            it = os.scandir(full)
        except OSError:
            return
        with it:
            for de in it:
                name = de.name
                p = prefix + name
                e = files.get(p)
                if e is not None:
                    st = de.stat(follow_symlinks=False)
                    if st_.S_ISDIR(st.st_mode):
                        stack.append((p, False))  # a tracked file replaced by a directory
                    else:
                        check(p, e, st)
                    continue
                if de.is_dir(follow_symlinks=False):
                    if name == BK_B or is_repo(Path(os.fsdecode(de.path))):
                        continue
                    if name not in subdirs and (not untracked or ignored(p, True)):
                        continue
                    stack.append((p, False))
                else:
                    untracked_file(p)

    def check_files(rel: bytes) -> None:
        """The expected files of a directory whose names are the record's, one by one."""
        rec = dirs[rel]
        files = files_of(rel)
        for p in list(files)[: rec.present]:
            try:
                st = os.lstat(root + b"/" + p)
            except OSError:
                continue  # missing: reported below
            if st_.S_ISDIR(st.st_mode):
                stack.append((p, False))
            else:
                check(p, files[p], st)

    def visit(rel: bytes, listed: bool) -> None:
        full = root + b"/" + rel if rel else root
        try:
            dst = os.lstat(full)
        except OSError:
            return
        if not st_.S_ISDIR(dst.st_mode):
            if listed:
                untracked_file(rel)  # a tracked directory replaced by a file or symlink
            return
        rec = dirs.get(rel)
        dkey = _DIR_STAT.pack(*_DIR_STAT_KEY(dst))
        if rec is not None and not rec.overlap and rec.dir_stat == dkey:
            subdirs: list[bytes] | None = rec.subdirs
        else:
            try:
                names = os.listdir(full)
            except OSError:
                return
            if listed and rel and BK_B in names and is_repo(Path(os.fsdecode(full))):
                return  # a nested repository: its files are its own
            subdirs = _listed_subdirs(rec, names, not rel) if rec is not None else None
            if subdirs is None:
                read_dir(rel, full)
                return
            assert rec is not None
            if (
                len(subdirs) == len(rec.subdirs)
                and max(dst.st_mtime_ns, dst.st_ctime_ns) < time.time_ns() - RACY_NS
            ):
                dir_stats[rel] = (dkey, rec.signature())
        prefix = rel + b"/" if rel else b""
        stack.extend((prefix + s, True) for s in subdirs)
        if rel in moved_dirs:
            check_files(rel)
        elif rec.present:
            compare.append(rel)
        else:
            done.add(rel)

    if scope is None or b"" in scope:
        stack.append((b"", False))
    else:
        for s in scope:
            full = root + b"/" + s
            e = files_of(s.rpartition(b"/")[0]).get(s)
            if e is not None:
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                if st_.S_ISDIR(st.st_mode):
                    stack.append((s, False))
                else:
                    check(s, e, st)
            elif os.path.isdir(full) and not os.path.islink(full):
                stack.append((s, False))
            elif untracked and os.path.lexists(full):
                changes.append(Change(s, "?"))

    while stack or compare:
        while stack:
            rel, listed = stack.pop()
            if rel not in visited:
                visited.add(rel)
                visit(rel, listed)
        batch, compare = compare, []
        differ = _stats_differ(root, dirs, batch, parallel=scope is None)
        for rel in batch:
            if rel in differ:
                check_files(rel)
            else:
                done.add(rel)

    for d, rec in dirs.items():
        if d in done or not (rec.present or d in moved_dirs) or not _dir_in_scope(d, scope):
            continue
        for p, e in files_of(d).items():
            if p in seen or not _in_scope(p, scope):
                continue
            if e.flags & EXPECTED or p in moved:
                changes.append(Change(p, "!", moved.get(p)))
    for p in state.removed:
        if _in_scope(p, scope):
            changes.append(Change(p, "D"))
    changes.sort(key=lambda c: c.path)
    return Scan(changes, refreshed, dir_stats)


def refresh_index(repo: Repo, state: WorkState, result: Scan) -> None:
    """Store what a scan learned (file and directory stats; an index in the old format or not
    stored yet, written in the current one), if no other process is writing: a pure speed-up."""
    if not (result.refreshed or result.dir_stats or state.changed or state.stale):
        return
    if not repo.try_lock():
        return
    try:
        with repo.store.write() as txn:
            if (repo.tip_tree(txn) or None) != state.tree:
                return
            if (txn.meta("index_serial") or "") != state.serial:
                return  # another command wrote the index since it was loaded
            for p, e in result.refreshed.items():
                state.set(p, e)
            state.save(txn, state.tree, dir_stats=result.dir_stats)
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
class UpdatePlan(NamedTuple):
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
    from bkrepo import bamflow  # not at the top: status never fetches

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
