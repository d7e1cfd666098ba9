"""The repository database: one LMDB environment under ``.bk/db``.

Every command changes it in one write transaction, so a crash or Ctrl-C leaves the last
committed state; readers never block writers.  Transactions open and close inside one
synchronous call (py-lmdb's thread rule); nothing here awaits.

Named databases (keys and values are bytes):

``meta``     repo facts: format, project/repo id, tip, parent URL, BAM server, journals
``config``   user-settable configuration (``bkr config``)
``objects``  object id -> kind byte + canonical payload (content addressed, see objects.py)
``csets``    cset key -> generation, time and parents: the DAG, loadable without decoding csets
``tags``     tag object id -> (empty); the tag objects themselves live in ``objects``
``fileh``    root key -> cset keys that changed that file (dupsort): per-file history
``bamidx``   BAM oid -> cset keys whose deltas use it (dupsort): what history needs
``index``    path -> working-tree entry (see worktree.py)
``pending``  staged adds/removes/renames (see worktree.py)
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from bkrepo import objects as ob
from bkrepo.errors import FormatError, RepoError
from bkrepo.ids import ObjectId

MAP_SIZE = 1 << 40  # address space only; the file grows with what is stored
DB_NAMES = ("meta", "config", "objects", "csets", "tags", "fileh", "bamidx", "index", "pending")
DUPSORT = ("fileh", "bamidx")
_CSET_HEAD = struct.Struct("<IqB")


def pack_cset_meta(gen: int, time: int, parents: tuple[ObjectId, ...]) -> bytes:
    return _CSET_HEAD.pack(gen, time, len(parents)) + b"".join(parents)


def unpack_cset_meta(value: bytes) -> tuple[int, int, tuple[ObjectId, ...]]:
    gen, time, n = _CSET_HEAD.unpack_from(value)
    base = _CSET_HEAD.size
    parents = tuple(ObjectId(bytes(value[base + 32 * i : base + 32 * i + 32])) for i in range(n))
    return gen, time, parents


_Stored = TypeVar("_Stored", bytes, memoryview)


def _checked(oid: bytes, value: _Stored | None, kind: bytes) -> _Stored:
    """An object's stored value (kind byte + payload, as bytes or a view into the map), which
    history says exists: a missing one, or one of another kind, is a damaged repository."""
    if value is None:
        raise RepoError(f"repository damaged: object {oid.hex()[:16]} is missing")
    if bytes(value[:1]) != kind:
        raise RepoError(f"repository damaged: object {oid.hex()[:16]} has the wrong kind")
    return value


class _TreeCache:
    """Decoded trees by id, least recently used out past a budget of entries.  Safe to share
    across repositories and transactions: an id names one content forever."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self.items: OrderedDict[bytes, list[Any]] = OrderedDict()

    def get(self, oid: bytes) -> list[Any] | None:
        hit = self.items.get(oid)
        if hit is not None:
            self.items.move_to_end(oid)
        return hit

    def put(self, oid: bytes, entries: list[ob.TreeEntry]) -> None:
        self.items[oid] = [entries, None]
        self.size += len(entries) + 1
        while self.size > self.budget and self.items:
            _, (old, _m) = self.items.popitem(last=False)
            self.size -= len(old) + 1


_TREES = _TreeCache(50_000)  # entries: a few MB
_CSETS: OrderedDict[bytes, ob.Cset] = OrderedDict()


class Txn:
    """A transaction with typed helpers over the named databases."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]) -> None:
        self.txn = txn
        self.dbs = dbs

    # -- meta and config -------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        v = self.txn.get(key.encode(), db=self.dbs["meta"])
        return None if v is None else bytes(v).decode(errors="surrogateescape")

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.txn.delete(key.encode(), db=self.dbs["meta"])
        else:
            # values may be paths (parent, BAM server): any bytes, as os.fsdecode gives them
            self.txn.put(key.encode(), value.encode(errors="surrogateescape"), db=self.dbs["meta"])

    def config(self, key: str) -> str | None:
        v = self.txn.get(key.encode(), db=self.dbs["config"])
        return None if v is None else bytes(v).decode(errors="surrogateescape")

    def set_config(self, key: str, value: str | None) -> None:
        if value is None:
            self.txn.delete(key.encode(), db=self.dbs["config"])
        else:
            self.txn.put(
                key.encode(), value.encode(errors="surrogateescape"), db=self.dbs["config"]
            )

    def all_config(self) -> dict[str, str]:
        return {
            bytes(k).decode(): bytes(v).decode(errors="surrogateescape")
            for k, v in self.txn.cursor(db=self.dbs["config"])
        }

    # -- objects -----------------------------------------------------------------------------
    def get_raw(self, oid: bytes) -> bytes | None:
        v = self.txn.get(oid, db=self.dbs["objects"])
        return None if v is None else bytes(v)

    def get_object(self, oid: bytes, kind: bytes) -> bytes:
        """The payload of an object that history says exists; a missing one is a damaged repo."""
        return bytes(_checked(oid, self.txn.get(oid, db=self.dbs["objects"]), kind)[1:])

    def has_object(self, oid: bytes) -> bool:
        return self.txn.get(oid, db=self.dbs["objects"]) is not None

    def put_object(self, kind: bytes, payload: bytes) -> ObjectId:
        oid = ob.obj_id(kind, payload)
        self.txn.put(oid, kind + payload, db=self.dbs["objects"], overwrite=False)
        return oid

    def put_raw(self, oid: bytes, raw: bytes) -> bool:
        """Store a verified raw object (kind byte + payload); False if it was already there."""
        return bool(self.txn.put(oid, raw, db=self.dbs["objects"], overwrite=False))

    def delete_object(self, oid: bytes) -> None:
        self.txn.delete(oid, db=self.dbs["objects"])

    def tree(self, oid: bytes) -> list[ob.TreeEntry]:
        """A tree's entries, sorted by name (callers must not change the list: trees are
        immutable and content addressed, so decoded ones are shared through a cache)."""
        hit = _TREES.get(oid)
        if hit is not None:
            return hit[0]
        entries = ob.decode_tree(self.get_object(oid, ob.TREE))
        _TREES.put(bytes(oid), entries)
        return entries

    def put_tree(self, entries: list[ob.TreeEntry]) -> ObjectId:
        """Store a tree; its decoded form goes straight into the shared cache (whoever reads
        it next, e.g. the diff that indexes a new cset, need not decode it)."""
        ordered = sorted(entries, key=lambda e: e.name)
        oid = self.put_object(ob.TREE, ob.encode_tree(ordered))
        if _TREES.get(oid) is None:
            _TREES.put(bytes(oid), ordered)
        return oid

    def tree_map(self, oid: bytes) -> dict[bytes, ob.TreeEntry]:
        """A tree's entries by name (shared like :meth:`tree`; do not change it)."""
        hit = _TREES.get(oid)
        if hit is None:
            self.tree(oid)
            hit = _TREES.get(oid)
            assert hit is not None
        if hit[1] is None:
            hit[1] = {e.name: e for e in hit[0]}
        return hit[1]

    def cset(self, key: bytes) -> ob.Cset:
        """A cset (immutable and content addressed: decoded ones are shared, like trees)."""
        hit = _CSETS.get(key)
        if hit is not None:
            _CSETS.move_to_end(key)
            return hit
        cset = ob.Cset.decode(self.get_object(key, ob.CSET))
        _CSETS[bytes(key)] = cset
        if len(_CSETS) > 20_000:
            _CSETS.popitem(last=False)
        return cset

    def pointer(self, oid: bytes) -> ob.BamPointer:
        return ob.BamPointer.decode(self.get_object(oid, ob.BAMP))

    def blob(self, oid: bytes) -> bytes:
        return self.get_object(oid, ob.BLOB)

    # -- the cset DAG ------------------------------------------------------------------------
    def has_cset(self, key: bytes) -> bool:
        return self.txn.get(key, db=self.dbs["csets"]) is not None

    def cset_meta(self, key: bytes) -> tuple[int, int, tuple[ObjectId, ...]] | None:
        v = self.txn.get(key, db=self.dbs["csets"])
        return None if v is None else unpack_cset_meta(bytes(v))

    def add_cset(self, key: bytes, gen: int, time: int, parents: tuple[ObjectId, ...]) -> None:
        self.txn.put(key, pack_cset_meta(gen, time, parents), db=self.dbs["csets"])

    def delete_cset(self, key: bytes) -> None:
        self.txn.delete(key, db=self.dbs["csets"])

    def all_csets(self) -> dict[ObjectId, tuple[int, int, tuple[ObjectId, ...]]]:
        return {
            ObjectId(bytes(k)): unpack_cset_meta(bytes(v))
            for k, v in self.txn.cursor(db=self.dbs["csets"])
        }

    def cset_count(self) -> int:
        return int(self.txn.stat(self.dbs["csets"])["entries"])

    # -- tags --------------------------------------------------------------------------------
    def tag_ids(self) -> list[ObjectId]:
        return [
            ObjectId(bytes(k)) for k in self.txn.cursor(db=self.dbs["tags"]).iternext(values=False)
        ]

    def add_tag(self, kind_payload: bytes) -> ObjectId:
        tid = self.put_object(ob.TAG, kind_payload)
        self.txn.put(tid, b"", db=self.dbs["tags"])
        return tid

    def delete_tag(self, tid: bytes) -> None:
        self.txn.delete(tid, db=self.dbs["tags"])

    # -- dupsort indexes ---------------------------------------------------------------------
    def index_add(self, db: str, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[db], dupdata=True)

    def index_delete(self, db: str, key: bytes, value: bytes) -> None:
        self.txn.delete(key, value, db=self.dbs[db])

    def index_values(self, db: str, key: bytes) -> list[bytes]:
        cur = self.txn.cursor(db=self.dbs[db])
        if not cur.set_key(key):
            return []
        return [bytes(v) for v in cur.iternext_dup()]

    def index_keys(self, db: str) -> Iterator[bytes]:
        cur = self.txn.cursor(db=self.dbs[db])
        for k in cur.iternext_nodup(values=False):
            yield bytes(k)

    # -- generic access for the working-tree modules ------------------------------------------
    def cursor(self, db: str) -> lmdb.Cursor:
        return self.txn.cursor(db=self.dbs[db])

    def get(self, db: str, key: bytes) -> bytes | None:
        v = self.txn.get(key, db=self.dbs[db])
        return None if v is None else bytes(v)

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[db])

    def delete(self, db: str, key: bytes) -> None:
        self.txn.delete(key, db=self.dbs[db])

    def clear(self, db: str) -> None:
        self.txn.drop(self.dbs[db], delete=False)


class _Env:
    """One LMDB environment and its database handles, shared by every Store of that path in
    this process: LMDB forbids opening an environment twice in one process (py-lmdb refuses
    with "already open in this process"), and a process does need one repository twice —
    a clone of a repo that is its own BAM server opens the source as peer and as server."""

    def __init__(self, env: lmdb.Environment, dbs: dict[str, lmdb._Database], readonly: bool):
        self.env = env
        self.dbs = dbs
        self.readonly = readonly
        self.users = 1


_ENVS: dict[str, _Env] = {}
_ENVS_LOCK = threading.Lock()


def _open_env(path: Path, readonly: bool, create: bool) -> _Env:
    try:
        env = lmdb.open(
            os.fsencode(path),  # bytes: a path need not be valid UTF-8
            subdir=True,
            map_size=MAP_SIZE,
            max_dbs=len(DB_NAMES) + 2,
            readonly=readonly,
            create=create,
            max_readers=512,
        )
    except lmdb.Error as e:
        raise FormatError(f"cannot open repository database {path}: {e}") from e
    dbs: dict[str, lmdb._Database] = {}
    try:
        if readonly:
            # No txn argument: py-lmdb aborts a read transaction at its end, which would close
            # handles opened inside it; without one it opens them so they stay valid.
            for name in DB_NAMES:
                dbs[name] = env.open_db(name.encode(), create=False, dupsort=name in DUPSORT)
        else:
            with env.begin(write=True) as txn:
                for name in DB_NAMES:
                    dbs[name] = env.open_db(name.encode(), txn=txn, dupsort=name in DUPSORT)
    except lmdb.Error as e:
        env.close()
        raise FormatError(f"cannot open repository database {path}: {e}") from e
    return _Env(env, dbs, readonly)


class Store:
    """The LMDB environment of one repository (shared with other Stores of the same path in
    this process; closed when the last one closes)."""

    def __init__(self, path: Path, *, readonly: bool = False, create: bool = False) -> None:
        self.path = path
        self._key = os.path.realpath(path)
        with _ENVS_LOCK:
            shared = _ENVS.get(self._key)
            if shared is not None and shared.readonly and not readonly:
                raise FormatError(
                    f"cannot open repository database {path} for writing: this process has it "
                    "open read-only"
                )
            if shared is None:
                shared = _ENVS[self._key] = _open_env(path, readonly, create)
            else:
                shared.users += 1
        self._shared: _Env | None = shared
        self.env = shared.env
        self.dbs = shared.dbs

    @contextmanager
    def read(self) -> Iterator[Txn]:
        with self.env.begin(buffers=False) as txn:
            yield Txn(txn, self.dbs)

    def object_part(self, oid: bytes, kind: bytes, start: int, end: int) -> tuple[int, bytes]:
        """Bytes ``[start, end)`` of an object's payload, and the payload's length, without
        copying the rest out of the map (a 10 GiB file's chunk list is 1.3 MB; verifying a
        chunk needs 32 bytes of it).  A missing object or one of another kind is a damaged
        repository."""
        with self.env.begin(buffers=True) as txn:
            v = _checked(oid, txn.get(oid, db=self.dbs["objects"]), kind)
            return len(v) - 1, bytes(v[1 + start : 1 + end])

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """A write transaction: committed when the block ends normally, aborted on any error."""
        with self.env.begin(write=True) as txn:
            yield Txn(txn, self.dbs)

    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _ENVS_LOCK:
            shared.users -= 1
            if shared.users == 0:
                del _ENVS[self._key]
                shared.env.close()
