"""A repository on disk: its layout, identity, lock, revisions and history bookkeeping.

Layout (everything the repo needs is under ``.bk/``, so moving the directory moves the repo)::

    .bk/FORMAT   the on-disk format version, checked before anything else is opened
    .bk/db/      the LMDB database (store.py)
    .bk/bam/     the BAM pool (pool.py)
    .bk/lock     the write lock (lock.py)
    .bk/tmp/     temp files of running commands
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bkrepo import config as cfg
from bkrepo import dag, trees
from bkrepo import objects as ob
from bkrepo.errors import FormatError, NotARepository, PathError, UnknownRevision, UsageError
from bkrepo.ids import ObjectId, Oid, new_random_id
from bkrepo.lock import RepoLock
from bkrepo.pool import Pool
from bkrepo.store import Store, Txn

FORMAT_VERSION = 2  # 2: the index is stored one record per directory (worktree.py)
BK = ".bk"
BK_B = b".bk"
_SIZE = struct.Struct("<Q")


def is_repo(path: Path) -> bool:
    return (path / BK / "FORMAT").is_file()


def find_root(start: Path) -> Path:
    """The repository containing ``start`` (walking up), or NotARepository."""
    p = start.resolve()
    for candidate in (p, *p.parents):
        if is_repo(candidate):
            return candidate
    raise NotARepository(f"{start}: not inside a bkr repository (run 'bkr init' to create one)")


class Repo:
    """An open repository.  Open one with :meth:`open`, :meth:`find` or :meth:`init`."""

    def __init__(self, root: Path, *, readonly: bool = False) -> None:
        self.root = root
        self.bk = root / BK
        fmt = self.bk / "FORMAT"
        try:
            version = int(fmt.read_text().split()[-1])
        except FileNotFoundError:
            raise NotARepository(f"{root}: not a bkr repository") from None
        except (ValueError, IndexError, OSError) as e:
            raise FormatError(f"{root}: unreadable repository format file ({e})") from e
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{root}: repository format {version} is newer than this bkr understands "
                f"({FORMAT_VERSION}); upgrade bkr"
            )
        self.format = version
        self.store = Store(self.bk / "db", readonly=readonly)
        self.pool = Pool(self.bk / "bam")
        self.tmp = self.bk / "tmp"
        self._lock = RepoLock(self.bk / "lock")
        with self.store.read() as txn:
            self.project_id = txn.meta("project_id") or ""
            self.repo_id = txn.meta("repo_id") or ""

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path | str) -> Repo:
        root = Path(root)
        if not root.is_dir():
            raise NotARepository(f"{root}: no such repository")
        return cls(root.resolve())

    @classmethod
    def find(cls, start: Path | str = ".") -> Repo:
        return cls(find_root(Path(start)))

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        project_id: str | None = None,
        bam_threshold: str | None = None,
        config: dict[str, str] | None = None,
    ) -> Repo:
        """Create a repository at ``root`` (which may exist and hold files)."""
        if is_repo(root):
            raise UsageError(f"{root}: already a bkr repository")
        bk = root / BK
        bk.mkdir(parents=True, exist_ok=True)
        for sub in ("db", "bam", "tmp"):
            (bk / sub).mkdir(exist_ok=True)
        store = Store(bk / "db", create=True)
        with store.write() as txn:
            txn.set_meta("format", str(FORMAT_VERSION))
            txn.set_meta("project_id", project_id or new_random_id())
            txn.set_meta("repo_id", new_random_id())
            for k, v in (config or {}).items():
                txn.set_config(k, v)
            if bam_threshold is not None:
                txn.set_config("bam.threshold", bam_threshold)
        store.close()
        # FORMAT last: a directory without it is not a repo, so a crash here leaves no half repo.
        tmp = bk / "FORMAT.tmp"
        tmp.write_text(f"bkrepo {FORMAT_VERSION}\n")
        os.replace(tmp, bk / "FORMAT")
        return cls(root.resolve())

    def close(self) -> None:
        self.unlock()
        self.store.close()

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking -----------------------------------------------------------------------------
    @contextmanager
    def locked(self, what: str) -> Iterator[Repo]:
        """Hold the write lock for a command; finishes any update a crash interrupted first."""
        if self._lock.fd is not None:
            yield self
            return
        self._lock.acquire(what, self.lock_timeout())
        try:
            self._upgrade_format()
            self.pool.cleanup_tmp()
            from bkrepo.worktree import finish_interrupted_update

            finish_interrupted_update(self)
            yield self
        finally:
            self._lock.release()

    def try_lock(self) -> bool:
        if self._lock.fd is not None:
            return True
        if not self._lock.try_acquire():
            return False
        self._upgrade_format()
        return True

    def _upgrade_format(self) -> None:
        """Mark a repository of an older format as this one's before writing to it (under the
        lock), so an older bkr refuses it instead of misreading what this one writes.  Format 1
        differs only in the index, which is read in either format and converted when written."""
        if self.format >= FORMAT_VERSION:
            return
        tmp = self.bk / "FORMAT.tmp"
        with open(tmp, "w") as f:
            f.write(f"bkrepo {FORMAT_VERSION}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.bk / "FORMAT")
        with self.store.write() as txn:
            txn.set_meta("format", str(FORMAT_VERSION))
        self.format = FORMAT_VERSION

    def unlock(self) -> None:
        self._lock.release()

    def lock_timeout(self) -> float:
        env = os.environ.get("BKR_LOCK_TIMEOUT")
        if env:
            return cfg.parse_seconds(env, "BKR_LOCK_TIMEOUT")
        return cfg.parse_seconds(self.config_value("lock.timeout"), "lock.timeout")

    # -- config ------------------------------------------------------------------------------
    def config_value(self, key: str, txn: Txn | None = None) -> str:
        if txn is None:
            with self.store.read() as t:
                return self.config_value(key, t)
        v = txn.config(key)
        return v if v is not None else cfg.KEYS[key].default

    def author(self) -> str:
        return self.config_value("user.name") or cfg.default_author()

    def bam_threshold(self, txn: Txn) -> int | None:
        return cfg.parse_threshold(self.config_value("bam.threshold", txn))

    def bam_patterns(self, txn: Txn) -> list[str]:
        return cfg.patterns(self.config_value("bam.patterns", txn))

    def bam_pools(self, txn: Txn | None = None) -> list[Pool]:
        text = self.config_value("bam.pools", txn)
        out = []
        for p in text.split(os.pathsep):
            if p.strip():
                path = Path(p.strip())
                if not path.is_absolute():
                    path = self.root / path
                out.append(Pool(path / BK / "bam") if is_repo(path) else Pool(path))
        return out

    # -- revisions ---------------------------------------------------------------------------
    def tip(self, txn: Txn) -> ObjectId | None:
        v = txn.meta("tip")
        return ObjectId(bytes.fromhex(v)) if v else None

    def require_tip(self, txn: Txn, what: str) -> ObjectId:
        tip = self.tip(txn)
        if tip is None:
            raise UnknownRevision(f"{what}: the repository has no csets yet")
        return tip

    def tip_tree(self, txn: Txn) -> ObjectId | None:
        tip = self.tip(txn)
        return None if tip is None else txn.cset(tip).tree

    def resolve(self, txn: Txn, rev: str) -> ObjectId:
        """A cset key from a name: ``+`` (tip), a key, a unique key prefix, a tag; ``REV~N``
        walks N first parents back."""
        base, _, back = rev.partition("~")
        key = self._resolve_one(txn, base)
        if back:
            if not back.isdigit():
                raise UnknownRevision(f"bad revision {rev!r}: expected REV~N")
            for _ in range(int(back)):
                parents = txn.cset(key).parents
                if not parents:
                    raise UnknownRevision(f"{rev}: history is not that long")
                key = parents[0]
        return key

    def _resolve_one(self, txn: Txn, rev: str) -> ObjectId:
        if rev in ("+", "tip", "HEAD", ""):
            return self.require_tip(txn, f"revision {rev or '+'}")
        tag = self.tags(txn).get(rev)
        if tag is not None:
            return tag
        r = rev.lower()
        if len(r) >= 4 and all(c in "0123456789abcdef" for c in r):
            even = bytes.fromhex(r[: len(r) // 2 * 2])
            cur = txn.cursor("csets")
            found: list[bytes] = []
            if cur.set_range(even):
                for k in cur.iternext(values=False):
                    k = bytes(k)
                    if not k.startswith(even):
                        break
                    if k.hex().startswith(r):
                        found.append(k)
                        if len(found) > 1:
                            break
            if len(found) == 1:
                return ObjectId(found[0])
            if len(found) > 1:
                raise UnknownRevision(f"revision {rev!r} is ambiguous: give more digits")
        raise UnknownRevision(f"unknown revision {rev!r}: use a cset key, a key prefix, a tag or +")

    def graph(self, txn: Txn) -> dict[ObjectId, dag.Meta]:
        return txn.all_csets()

    # -- tags --------------------------------------------------------------------------------
    def tag_objects(self, txn: Txn) -> list[tuple[ObjectId, ob.Tag]]:
        return [(tid, ob.Tag.decode(txn.get_object(tid, ob.TAG))) for tid in txn.tag_ids()]

    def tags(self, txn: Txn) -> dict[str, ObjectId]:
        """Tag name -> cset; when a name was set more than once the newest tag wins."""
        best: dict[str, tuple[int, bytes, ObjectId]] = {}
        for tid, tag in self.tag_objects(txn):
            cand = (tag.time, tid, tag.target)
            if tag.name not in best or cand > best[tag.name]:
                best[tag.name] = cand
        return {name: v[2] for name, v in best.items() if txn.has_cset(v[2])}

    # -- recording csets ---------------------------------------------------------------------
    def record_cset(self, txn: Txn, key: ObjectId, cset: ob.Cset) -> None:
        """Enter a cset (whose objects are stored) into the DAG and the per-file/BAM indexes."""
        gen = 1
        for p in cset.parents:
            meta = txn.cset_meta(p)
            if meta is None:
                raise FormatError(f"cset {key.hex()[:12]} has a parent this repository lacks")
            gen = max(gen, meta[0] + 1)
        txn.add_cset(key, gen, cset.time, cset.parents)
        for rootkey, ptr in self.cset_deltas(txn, cset):
            txn.index_add("fileh", rootkey, key)
            if ptr is not None:
                txn.index_add("bamidx", ptr.oid, key + _SIZE.pack(ptr.size))

    def unrecord_cset(self, txn: Txn, key: ObjectId) -> None:
        cset = txn.cset(key)
        for rootkey, ptr in self.cset_deltas(txn, cset):
            txn.index_delete("fileh", rootkey, key)
            if ptr is not None:
                txn.index_delete("bamidx", ptr.oid, key + _SIZE.pack(ptr.size))
        txn.delete_cset(key)

    def bam_referenced(self, txn: Txn) -> dict[Oid, int]:
        """Every BAM object a delta of history uses, with its size."""
        out: dict[Oid, int] = {}
        cur = txn.cursor("bamidx")
        for k, v in cur.iternext_nodup(values=True):
            out[Oid(bytes(k))] = _SIZE.unpack_from(bytes(v), 32)[0]
        return out

    def bam_sizes(self, txn: Txn, oids: Iterable[Oid]) -> dict[Oid, int]:
        """The sizes history records for these BAM objects (those it uses)."""
        out: dict[Oid, int] = {}
        for o in oids:
            users = txn.index_values("bamidx", o)
            if users:
                out[o] = _SIZE.unpack_from(users[0], 32)[0]
        return out

    def cset_deltas(self, txn: Txn, cset: ob.Cset) -> Iterator[tuple[bytes, ob.BamPointer | None]]:
        """Files this cset changed (root key, and the BAM pointer of its new content if any).

        In a merge, a file counts only if its entry differs from every parent's: content taken
        unchanged from one side was recorded where it was made.
        """
        first = txn.cset(cset.parents[0]).tree if cset.parents else None
        others = [txn.cset(p).tree for p in cset.parents[1:]]
        for path, old, new in trees.diff(txn, first, cset.tree):
            if others and any(trees.lookup(txn, t, path) == new for t in others):
                continue
            if (
                old is not None
                and new is not None
                and old.rootkey != new.rootkey
                and old.kind != ob.K_COMP
            ):
                yield old.rootkey, None  # another file took this path: the old one went
            entry = new if new is not None else old
            assert entry is not None
            if entry.kind == ob.K_COMP:
                continue
            ptr = txn.pointer(new.id) if new is not None and new.kind == ob.K_BAM else None
            yield entry.rootkey, ptr

    def bam_oids_of(self, txn: Txn, cset: ob.Cset) -> Iterator[Oid]:
        for _, ptr in self.cset_deltas(txn, cset):
            if ptr is not None:
                yield ptr.oid

    # -- paths -------------------------------------------------------------------------------
    def relpath(self, user_path: str) -> bytes:
        """A user's path (relative to the cwd, or absolute) as a repo-relative path."""
        p = Path(os.path.abspath(user_path))
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            raise PathError(f"{user_path}: outside the repository at {self.root}") from None
        parts = rel.parts
        if parts and parts[0] == BK:
            raise PathError(f"{user_path}: inside the repository's metadata directory")
        return os.fsencode(rel.as_posix()) if parts else b""

    def abspath(self, rel: bytes) -> Path:
        return self.root / os.fsdecode(rel)

    def now(self) -> int:
        env = os.environ.get("BKR_DATE")
        return int(env) if env else int(time.time())
