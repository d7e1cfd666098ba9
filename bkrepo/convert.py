"""``bkr bam convert SIZE``: turn binary files stored in history into BAM files.

A file converts when its first revision is binary and at least SIZE bytes; then every revision
of it becomes BAM (its bytes move to the pool; history keeps pointers).  History is rewritten
oldest first, and because every id is a function of content, two repositories converting at
the same size get identical keys and can keep syncing.  The project id changes to a value
derived from the old one and the size, so converted and unconverted clones refuse to sync.

Conversions only shrink: a later convert must use a smaller size than the last one.  The
working files keep their bytes; only their index entries change kind.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from bkrepo import dag, trees
from bkrepo import objects as ob
from bkrepo.errors import BamError, WouldLoseWork
from bkrepo.ids import ObjectId
from bkrepo.pool import hash_stream
from bkrepo.repo import Repo
from bkrepo.store import Txn
from bkrepo.worktree import CHECKED_OUT, WorkState, entry_from_tree, scan

CONVERTED_KEY = "bam.converted"  # the size of the last conversion; travels with clones


@dataclass
class ConvertResult:
    files: int
    csets: int
    project_id: str


def converted_project_id(project_id: str, size: int) -> str:
    """The project id after a conversion at ``size``: clones converting alike agree and can
    sync.  The chunk size pointers get is part of it: a conversion by a bkr that records
    other chunk sizes makes other keys, so it must not pass for the same project."""
    tag = f"{project_id}:bam-convert:{size}:chunks-{ob.CHUNK_SIZE}"
    return hashlib.sha256(tag.encode()).hexdigest()[:32]


def convert(repo: Repo, size: int) -> ConvertResult:
    with repo.locked("bam convert"):
        with repo.store.read() as txn:
            last = txn.config(CONVERTED_KEY)
            if last is not None and size >= int(last):
                raise BamError(
                    f"bam convert: BAM size must be less than {last} (conversions only shrink)"
                )
            tip = repo.tip(txn)
            if tip is None:
                raise BamError("bam convert: the repository has no csets")
            state = WorkState.load(repo, txn)
            dirty = [c for c in scan(repo, txn, state, untracked=False).changes if c.code != "!"]
            if dirty:
                raise WouldLoseWork(
                    "bam convert",
                    [c.path.decode(errors="replace") for c in dirty],
                    "commit them first",
                )
            graph = repo.graph(txn)
            order = dag.oldest_first(graph, dag.ancestors(graph, [tip]))
            chosen = _choose(txn, order, size)
        if not chosen:
            return ConvertResult(0, 0, repo.project_id)
        with repo.store.write() as txn:
            conv = _Converter(repo, txn, chosen)
            mapping: dict[ObjectId, ObjectId] = {}
            for key in order:
                c = txn.cset(key)
                nc = ob.Cset(
                    parents=tuple(mapping[p] for p in c.parents),
                    tree=conv.tree(c.tree),
                    author=c.author,
                    time=c.time,
                    comment=c.comment,
                )
                mapping[key] = txn.put_object(ob.CSET, nc.encode())
            tags = repo.tag_objects(txn)
            for db in ("csets", "fileh", "bamidx", "tags"):
                txn.clear(db)
            for key in order:
                nk = mapping[key]
                repo.record_cset(txn, nk, txn.cset(nk))
            for _tid, t in tags:
                if t.target in mapping:
                    txn.add_tag(ob.Tag(t.name, mapping[t.target], t.author, t.time).encode())
            new_tip = mapping[tip]
            txn.set_meta("tip", new_tip.hex())
            new_project = converted_project_id(repo.project_id, size)
            txn.set_meta("project_id", new_project)
            txn.set_config(CONVERTED_KEY, str(size))
            new_tree = txn.cset(new_tip).tree
            # Same bytes, new kind: keep each entry's checkout state and stat.
            for p, e in trees.walk(txn, new_tree):
                old = state.entries.get(p)
                if e.kind in ob.LEAF_KINDS and old is not None and old.rootkey in chosen:
                    fresh = entry_from_tree(e)
                    if old.flags & CHECKED_OUT:
                        fresh = fresh._replace(
                            flags=old.flags,
                            size=old.size,
                            mtime_ns=old.mtime_ns,
                            ino=old.ino,
                            ctime_ns=old.ctime_ns,
                        )
                    state.set(p, fresh)
            state.save(txn, new_tree)
        repo.project_id = new_project
        return ConvertResult(len(chosen), len(order), new_project)


def _choose(txn: Txn, order: list[ObjectId], size: int) -> set[bytes]:
    """Root keys of files whose first revision is a binary blob of at least ``size`` bytes."""
    seen: set[bytes] = set()
    chosen: set[bytes] = set()
    for key in order:
        c = txn.cset(key)
        first = txn.cset(c.parents[0]).tree if c.parents else None
        for _path, _old, new in trees.diff(txn, first, c.tree):
            if new is None or new.kind not in ob.LEAF_KINDS or new.rootkey in seen:
                continue
            seen.add(new.rootkey)
            if new.kind == ob.K_FILE and new.size >= size and b"\0" in txn.blob(new.id)[:8000]:
                chosen.add(new.rootkey)
    return chosen


class _Converter:
    """Rewrites trees (memoised by id) and blobs (to pool objects + pointers)."""

    def __init__(self, repo: Repo, txn: Txn, chosen: set[bytes]) -> None:
        self.repo = repo
        self.txn = txn
        self.chosen = chosen
        self.trees: dict[bytes, ObjectId] = {}
        self.pointers: dict[bytes, ObjectId] = {}

    def tree(self, tid: ObjectId) -> ObjectId:
        done = self.trees.get(tid)
        if done is not None:
            return done
        out = []
        for e in self.txn.tree(tid):
            if e.kind == ob.K_DIR:
                e = e._replace(id=self.tree(ObjectId(e.id)))
            elif e.kind == ob.K_FILE and e.rootkey in self.chosen:
                e = e._replace(kind=ob.K_BAM, id=self.pointer(e.id))
            out.append(e)
        new = self.txn.put_object(ob.TREE, ob.encode_tree(out))
        self.trees[tid] = new
        return new

    def pointer(self, blob_id: bytes) -> ObjectId:
        done = self.pointers.get(blob_id)
        if done is not None:
            return done
        data = self.txn.blob(blob_id)
        hashed = hash_stream(io.BytesIO(data), chunk_size=ob.CHUNK_SIZE)
        self.repo.pool.receive(hashed.oid, io.BytesIO(data), where="bam convert")
        ptr, chunk_list = hashed.pointer()
        self.txn.put_object(ob.CHNK, chunk_list)
        pid = self.txn.put_object(ob.BAMP, ptr.encode())
        self.pointers[blob_id] = pid
        return pid
