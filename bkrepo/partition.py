"""Partition: split a standalone repository into a product with component repositories.

The semantics are BitKeeper's (seeds/004, ``bk partition``), done in one pass over history
instead of clone + csetprune:

- The **partition point** is the source's tip (or, with ``-@``, the point of the earlier
  partition).  Each file belongs, for its whole life, to the component whose directory holds
  it at the partition point (the innermost one when components nest, such as ``src`` and
  ``src/gnu``), else to the product.  A file that moved between components before the point
  looks as if it always lived where it is at the point: in older csets it appears at that
  path of its component (or, if another file holds that path then, under ``.bk-moved/`` with
  its old path).
- Files deleted before the point are pruned from all history (``--keep-deleted`` keeps
  them in the component of their last path); ``-P PRUNELIST`` removes the files it names
  first (a root key; a path: every file that ever had it; ``DIR/``: every file that ever
  lived below it).
- Each component's history is the source's csets that changed its files, with the same
  author, time and comment; csets that change nothing of a component are left out of it,
  merges are kept where they join lines.  The product gets a cset for every source cset that
  changed anything that survives, recording the component csets it includes (nested.py) and
  the product's own files; tags go to the product.
- Keys are a pure function of the input: the same source, components file and options give
  identical keys everywhere, and the project ids are derived from them too.  ``-@ URL``
  partitions a superset of the earlier input the same way, so the result syncs with the
  first one.
- BAM data is not copied: keys stay the same, so the repositories name the source's BAM
  server (when it has one) and hardlink what the source's pool holds.
- Everything is checked before anything is written: a file that moved between components
  after the partition point, a file whose path collides with a component's, a components
  file naming a directory that is not there, an input that is not a superset for ``-@``.
  The result is built in a hidden sibling directory and renamed into place at the end, so a
  failure leaves nothing behind.

``-j N`` builds components in N worker processes (fresh interpreters: an LMDB environment
never crosses a fork); the product is built last, from their keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bkrepo import bamflow, dag, nested, trees
from bkrepo import config as cfg
from bkrepo import objects as ob
from bkrepo.errors import BkError, UsageError
from bkrepo.ids import ObjectId
from bkrepo.repo import Repo
from bkrepo.store import Txn

MOVED = b".bk-moved"  # where a file that moved between components waits in older csets
RECORD_VERSION = 1
BATCH = 5000  # source csets per write transaction (each commit is an fsync)
PRODUCT_OWNER = b""  # the product, in owner maps (component paths are never empty)


class PartitionError(BkError):
    """The input cannot be partitioned as asked; nothing was written."""


@dataclass(frozen=True)
class Result:
    path: Path
    components: int
    product_csets: int


@dataclass
class Spec:
    """What to partition and how: from the components file and options, or the record of an
    earlier partition (``-@``)."""

    components: list[bytes]
    attach: list[tuple[bytes, str]]
    prune: list[str]
    keep_deleted: bool
    point: ObjectId | None = None  # None: the source's tip
    product_project: str | None = None


@dataclass
class Plan:
    """The analysis of the source, done before anything is written."""

    source: Path
    source_project: str
    point: ObjectId
    order: list[tuple[ObjectId, ob.Cset]]  # every cset of the source, parents first
    comps: list[bytes]  # components that get files, sorted
    owner_of: dict[bytes, bytes]  # root key -> owner (PRODUCT_OWNER or a component path)
    target: dict[bytes, bytes]  # root key -> its path at the point (for moved files)
    cross: set[bytes]  # root keys that sat outside their owner in some cset
    starts: dict[bytes, dict[bytes, bytes]]  # component -> cset -> its directory's tree id
    changes: dict[ObjectId, list[tuple[bytes, bytes, ob.TreeEntry | None]]] = field(
        default_factory=dict
    )  # per cset, moves of cross files against the first parent: (root key, path, entry)


# -- the inputs --------------------------------------------------------------------------------
def read_components(path: str) -> tuple[list[bytes], list[tuple[bytes, str]]]:
    """A components file: one directory per line, ``#`` comments, blank lines; ``PATH|URL``
    lines name repositories to attach after the split."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"partition: {path}: {e.strerror}") from None
    comps: list[bytes] = []
    attach: list[tuple[bytes, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where, sep, url = line.partition("|")
        rel = _clean_path(where.strip(), f"{path}:{n}")
        if sep:
            if not url.strip():
                raise UsageError(f"partition: {path}:{n}: PATH|URL needs a URL")
            attach.append((rel, url.strip()))
        elif rel not in comps:
            comps.append(rel)
    if not comps and not attach:
        raise UsageError(f"partition: {path} lists no component")
    return sorted(comps), attach


def _clean_path(text: str, where: str) -> bytes:
    p = text.removeprefix("./").strip("/") if not text.startswith("/") else None
    if p is None:
        raise UsageError(f"partition: {where}: {text!r} is absolute; give a path in the repository")
    parts = p.split("/")
    if not p or any(x in ("", ".", "..") or x == ".bk" for x in parts):
        raise UsageError(f"partition: {where}: {text!r} is not a path inside the repository")
    return os.fsencode(p)


def read_prune_list(path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"partition: {path}: {e.strerror}") from None
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line.removeprefix("./"))
    return out


def _spec_from_reference(url: str) -> tuple[Spec, dict[str, Any]]:
    from bkrepo.transport import open_peer

    peer = open_peer(url, what="partition")
    try:
        info = peer.info()
    finally:
        peer.close()
    rec = info.partition
    if not info.product or not rec:
        raise UsageError(f"partition: {url} was not made by 'bkr partition' (no partition record)")
    if rec.get("version") != RECORD_VERSION:
        raise UsageError(
            f"partition: {url} was partitioned by another version of bkr "
            f"(record {rec.get('version')}); upgrade bkr"
        )
    spec = Spec(
        components=[os.fsencode(c) for c in rec["components"]],
        attach=[],
        prune=list(rec["prune"]),
        keep_deleted=bool(rec["keep_deleted"]),
        point=ObjectId(bytes.fromhex(rec["point"])),
        product_project=rec["product_project"],
    )
    return spec, rec


# -- analysis ----------------------------------------------------------------------------------
def _subtree(txn: Txn, root: bytes, path: bytes) -> bytes | None:
    """The id of the directory at ``path`` in a tree, or None."""
    tid: bytes | None = root
    for part in path.split(b"/"):
        e = txn.tree_map(tid).get(part) if tid is not None else None
        tid = e.id if e is not None and e.kind == ob.K_DIR else None
    return tid


def _owner(comps: list[bytes], path: bytes) -> bytes:
    best = PRODUCT_OWNER
    for c in comps:
        if (path == c or path.startswith(c + b"/")) and len(c) > len(best):
            best = c
    return best


def analyse(src: Repo, spec: Spec) -> Plan:
    """Classify every file and find every reason to refuse, reading history once."""
    with src.store.read() as txn:
        tip = src.require_tip(txn, "partition")
        graph = src.graph(txn)
        point = spec.point or tip
        if point not in graph:
            raise PartitionError(
                f"partition: {src.root} is not a superset of the earlier partition's input: it "
                f"lacks its partition point {point.hex()[:12]}; pull that history in first"
            )
        order = dag.oldest_first(graph, dag.ancestors(graph, [tip]))
        before = dag.ancestors(graph, [point])
        pp_tree = txn.cset(point).tree
        at_point: dict[bytes, bytes] = {}  # root key -> path at the point
        for p, e in trees.walk(txn, pp_tree):
            if e.kind in ob.LEAF_KINDS:
                at_point[e.rootkey] = p
        missing = []
        for c in spec.components:
            e = trees.lookup(txn, pp_tree, c)
            if e is None or e.kind != ob.K_DIR:
                missing.append(os.fsdecode(c))
        if missing and spec.point is None:
            raise PartitionError(
                f"partition: the components file names {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not a directory at the partition "
                "point; remove the line or create the directory"
            )
        for where, _url in spec.attach:
            if trees.lookup(txn, pp_tree, where) is not None:
                raise PartitionError(
                    f"partition: {os.fsdecode(where)} is to be attached but the repository "
                    "has it already; attach elsewhere"
                )
        first_path: dict[bytes, bytes] = {}
        last_before: dict[bytes, bytes] = {}
        paths_before: dict[bytes, set[bytes]] = {}
        paths_after: dict[bytes, set[bytes]] = {}
        all_changes: dict[ObjectId, list[tuple[bytes, bytes, ob.TreeEntry | None]]] = {}
        decoded: list[tuple[ObjectId, ob.Cset]] = []
        starts: dict[bytes, dict[bytes, bytes]] = {c: {} for c in spec.components}
        for k in order:
            cset = txn.cset(k)
            decoded.append((k, cset))
            for c, at in starts.items():
                sub = _subtree(txn, cset.tree, c)
                if sub is not None:
                    at[k] = sub
            parent = txn.cset(cset.parents[0]).tree if cset.parents else None
            pre = k in before
            rows: list[tuple[bytes, bytes, ob.TreeEntry | None]] = []
            for path, old, new in trees.diff(txn, parent, cset.tree):
                if old is not None and old.kind in ob.LEAF_KINDS:
                    rows.append((old.rootkey, path, None))
                if new is None or new.kind not in ob.LEAF_KINDS:
                    continue
                rk = new.rootkey
                rows.append((rk, path, new))
                first_path.setdefault(rk, path)
                (paths_before if pre else paths_after).setdefault(rk, set()).add(path)
                if pre:
                    last_before[rk] = path
            all_changes[k] = rows
    pruned = _pruned(spec.prune, first_path, paths_before, paths_after)
    comps = spec.components
    owner_of: dict[bytes, bytes] = {}
    target: dict[bytes, bytes] = {}
    for rk in first_path:
        if rk in pruned:
            continue
        if rk in at_point:
            path = at_point[rk]
        elif rk in last_before:  # deleted before the point
            if not spec.keep_deleted:
                continue
            path = last_before[rk]
        else:  # born after the point (an incremental partition)
            path = first_path[rk]
        owner_of[rk] = _owner(comps, path)
        target[rk] = path
    moved_after: list[str] = []
    collide: list[str] = []
    cross: set[bytes] = set()
    for rk, o in owner_of.items():
        for p in paths_after.get(rk, ()):
            if _owner(comps, p) != o:
                moved_after.append(f"{os.fsdecode(target[rk])} (at {os.fsdecode(p)})")
        for p in paths_before.get(rk, ()):
            if _owner(comps, p) != o:
                cross.add(rk)
        for p in paths_before.get(rk, set()) | paths_after.get(rk, set()):
            if _owner(comps, p) == o and any(c == p or c.startswith(p + b"/") for c in comps):
                collide.append(os.fsdecode(p))
    if moved_after:
        raise PartitionError(
            "partition: at least one file moved between components after the partition point: "
            f"{', '.join(sorted(moved_after)[:5])}; move it back, or copy it to its new place "
            "as a new file and remove the old one"
        )
    if collide:
        raise PartitionError(
            "partition: a file's path collides with a component: "
            f"{', '.join(sorted(set(collide))[:5])}; prune it (-P) or choose other components"
        )
    used = {o for o in owner_of.values() if o != PRODUCT_OWNER}
    changes = {k: [row for row in rows if row[0] in cross] for k, rows in all_changes.items()}
    return Plan(
        source=src.root,
        source_project=src.project_id,
        point=point,
        order=decoded,
        starts=starts,
        comps=sorted(c for c in comps if c in used),
        owner_of=owner_of,
        target=target,
        cross=cross,
        changes={k: v for k, v in changes.items() if v},
    )


def _pruned(
    prune: list[str],
    first_path: dict[bytes, bytes],
    before: dict[bytes, set[bytes]],
    after: dict[bytes, set[bytes]],
) -> set[bytes]:
    """Root keys a prune list names: 32 hex digits name a root key; a path names every file
    that ever had it, and a path ending in ``/`` every file that ever lived below it."""
    out: set[bytes] = set()
    exact: set[bytes] = set()
    dirs: list[bytes] = []
    for item in prune:
        if len(item) == 32 and all(c in "0123456789abcdef" for c in item):
            out.add(bytes.fromhex(item))
        elif item.endswith("/"):
            dirs.append(os.fsencode(item))
        else:
            exact.add(os.fsencode(item))
    if exact or dirs:
        for rk in first_path:
            seen = before.get(rk, set()) | after.get(rk, set())
            if seen & exact or any(s.startswith(d) for s in seen for d in dirs):
                out.add(rk)
    return out


# -- building one repository -------------------------------------------------------------------
@dataclass
class Job:
    """Everything a worker needs to build one owner's repository."""

    source: str
    dest: str
    owner: bytes  # PRODUCT_OWNER or a component path
    comps: list[bytes]
    order: list[tuple[ObjectId, ob.Cset]]  # every source cset, parents first
    owner_of: dict[bytes, bytes]
    target: dict[bytes, bytes]
    changes: dict[bytes, list[tuple[bytes, bytes, ob.TreeEntry | None]]]  # cross files of owner
    project_id: str
    starts: dict[bytes, bytes] = field(default_factory=dict)  # cset -> its directory's tree
    comp_maps: dict[bytes, dict[bytes, tuple[bytes, int] | None]] = field(default_factory=dict)
    comp_projects: dict[bytes, str] = field(default_factory=dict)


@dataclass
class Built:
    owner: bytes
    mapping: dict[bytes, tuple[bytes, int] | None]  # source cset -> (key, time) here, or None
    csets: int


def build(job: Job, src: Repo) -> Built:
    """Write one owner's repository: its filtered history, in source order."""
    dest = Repo.init(Path(job.dest), project_id=job.project_id)
    try:
        with src.store.read() as stxn:
            builder = _Builder(job, stxn)
            for i in range(0, len(job.order), BATCH):
                with dest.store.write() as dtxn:
                    for k, cset in job.order[i : i + BATCH]:
                        builder.step(dest, dtxn, k, cset)
            with dest.store.write() as dtxn:
                tip = builder.tip
                dtxn.set_meta("tip", tip.hex() if tip else None)
        return Built(job.owner, builder.mapping, builder.count)
    finally:
        dest.close()


class _Builder:
    """The filter: source trees to this owner's trees (memoised per source subtree), plus the
    moved files put where the partition point has them, plus (product) component entries."""

    def __init__(self, job: Job, stxn: Txn) -> None:
        self.job = job
        self.stxn = stxn
        o = job.owner
        self.start = o  # the directory whose subtree becomes this repo's root
        self.skip = {
            c for c in job.comps if c != o and (o == PRODUCT_OWNER or c.startswith(o + b"/"))
        }
        self.memo: dict[tuple[bytes, bytes], tuple[ObjectId, int] | None] = {}
        self.copied: set[bytes] = set()
        self.mapping: dict[bytes, tuple[bytes, int] | None] = {}
        self.graph: dict[ObjectId, dag.Meta] = {}
        self.trees_of: dict[ObjectId, ObjectId] = {}
        self.cross_at: dict[bytes, dict[bytes, tuple[bytes, ob.TreeEntry]]] = {}
        self.base_at: dict[bytes, tuple[ObjectId, int] | None] = {}
        self.tip: ObjectId | None = None
        self.count = 0

    def _entries(self, tid: bytes) -> dict[bytes, ob.TreeEntry]:
        return self.stxn.tree_map(tid)

    def _copy(self, dtxn: Txn, e: ob.TreeEntry) -> None:
        if e.id in self.copied:
            return
        self.copied.add(e.id)
        raw = self.stxn.get_raw(e.id)
        assert raw is not None
        dtxn.put_raw(e.id, raw)
        if e.kind == ob.K_BAM:
            chunks = self.stxn.pointer(e.id).chunks
            craw = self.stxn.get_raw(chunks)
            assert craw is not None
            dtxn.put_raw(chunks, craw)

    def _filter(self, dtxn: Txn, tid: bytes, prefix: bytes) -> tuple[ObjectId, int] | None:
        key = (tid, prefix)
        if key in self.memo:
            return self.memo[key]
        out: list[ob.TreeEntry] = []
        mtime = 0
        for e in self._entries(tid).values():
            if e.kind == ob.K_DIR:
                sub = prefix + e.name
                if sub in self.skip:
                    continue
                r = self._filter(dtxn, e.id, sub + b"/")
                if r is not None:
                    out.append(ob.TreeEntry(e.name, ob.K_DIR, trees.DIR_MODE, 0, r[1], b"", r[0]))
                    mtime = max(mtime, r[1])
            elif e.kind in ob.LEAF_KINDS and self.job.owner_of.get(e.rootkey) == self.job.owner:
                if e.id not in self.copied:
                    self._copy(dtxn, e)
                out.append(e)
                mtime = max(mtime, e.mtime)
        result = None
        if out:
            result = (dtxn.put_tree(out), mtime)
        self.memo[key] = result
        return result

    def _unchanged(self, k: ObjectId, first: ObjectId | None) -> bool:
        """The fast path for a cset that changed nothing of this owner: it maps to what its
        parent maps to.  (The product also needs its components unchanged.)"""
        if first is None or first not in self.mapping:
            return False
        if self.job.owner == PRODUCT_OWNER:
            for m in self.job.comp_maps.values():
                if m.get(k) != m.get(first):
                    return False
        self.mapping[k] = self.mapping[first]
        return True

    def _relative(self, path: bytes) -> bytes:
        return path[len(self.start) + 1 :] if self.start else path

    def step(self, dest: Repo, dtxn: Txn, k: ObjectId, cset: ob.Cset) -> None:
        job = self.job
        first = cset.parents[0] if cset.parents else None
        # the moved (cross) files of this owner present in this cset, by root key: the first
        # parent's, changed as the diff against it says (shared when nothing changed)
        state = self.cross_at.get(first, {}) if first is not None else {}
        rows = job.changes.get(k)
        if rows:
            state = dict(state)
            for rk, path, entry in rows:
                if entry is None:
                    if state.get(rk, (path,))[0] == path:
                        state.pop(rk, None)
                else:
                    state[rk] = (path, entry)
        self.cross_at[k] = state
        start: bytes | None = cset.tree
        if self.start:
            start = job.starts.get(k)
        base = (
            self._filter(dtxn, start, self.start + b"/" if self.start else b"") if start else None
        )
        prev = self.base_at.get(first) if first is not None else None
        self.base_at[k] = base
        if len(cset.parents) == 1 and base == prev and not rows and self._unchanged(k, first):
            return
        if (
            job.owner == PRODUCT_OWNER
            and len(cset.parents) == 1
            and base == prev
            and not rows
            and self.mapping.get(first) is not None
        ):
            # only components moved: edit the parent's product tree
            pkey = ObjectId(self.mapping[first][0])  # type: ignore[index]
            edits = self._comp_edits(k, first)
            self._record(dest, dtxn, k, cset, [pkey], edits, self.trees_of[pkey])
            return
        edits: dict[bytes, ob.TreeEntry | None] = {}
        for rk, (path, entry) in sorted(state.items()):
            if _owner(job.comps, path) == job.owner:
                continue  # where it belongs: the filter has it
            self._copy(dtxn, entry)
            want = self._relative(job.target[rk])
            if want in edits or _taken(dtxn, base[0] if base else None, want):
                want = MOVED + b"/" + path
            edits[want] = entry
        if job.owner == PRODUCT_OWNER:
            edits.update(self._comp_edits(k, None))
        tree: ObjectId | None = base[0] if base else None
        if edits:
            tree = trees.apply_edits(dtxn, tree, edits)
        parents: list[ObjectId] = []
        for p in cset.parents:
            m = self.mapping.get(p)
            if m is not None and ObjectId(m[0]) not in parents:
                parents.append(ObjectId(m[0]))
        parents = [
            p
            for p in parents
            if not any(q != p and dag.is_ancestor(self.graph, p, q) for q in parents)
        ]
        if not parents and tree is None:
            self.mapping[k] = None
            return
        if tree is None:
            tree = trees.empty_tree(dtxn)
        self._record(dest, dtxn, k, cset, parents, {}, tree)

    def _comp_edits(self, k: ObjectId, first: ObjectId | None) -> dict[bytes, ob.TreeEntry | None]:
        """The product's component entries at source cset ``k`` (only those that differ from
        ``first``'s, when given)."""
        out: dict[bytes, ob.TreeEntry | None] = {}
        for c, m in sorted(self.job.comp_maps.items()):
            now = m.get(k)
            if now is not None and (first is None or now != m.get(first)):
                out[c + b"/" + nested.COMP] = nested.comp_entry(
                    ObjectId(now[0]), now[1], self.job.comp_projects[c]
                )
        return out

    def _record(
        self,
        dest: Repo,
        dtxn: Txn,
        k: ObjectId,
        cset: ob.Cset,
        parents: list[ObjectId],
        edits: dict[bytes, ob.TreeEntry | None],
        tree: ObjectId,
    ) -> None:
        """This owner's cset for source cset ``k`` (``edits`` applied to ``tree``), or, when
        it would change nothing, the one its parent maps to."""
        if edits:
            tree = trees.apply_edits(dtxn, tree, edits)
        if len(parents) == 1 and self.trees_of[parents[0]] == tree:
            p = parents[0]
            self.mapping[k] = (p, self.graph[p][1])  # nothing of this owner changed
            return
        new = ob.Cset(tuple(parents), tree, cset.author, cset.time, cset.comment)
        key = dtxn.put_object(ob.CSET, new.encode())
        dest.record_cset(dtxn, key, new)
        gen = 1 + max((self.graph[p][0] for p in parents), default=0)
        self.graph[key] = (gen, cset.time, tuple(parents))
        self.trees_of[key] = tree
        self.mapping[k] = (key, cset.time)
        self.tip = key
        self.count += 1


def _taken(txn: Txn, tree: bytes | None, path: bytes) -> bool:
    """Is ``path`` (or a file on the way to it) in use in a tree?"""
    if tree is None:
        return False
    if trees.lookup(txn, tree, path) is not None:
        return True
    parent = path.rpartition(b"/")[0]
    while parent:
        e = trees.lookup(txn, tree, parent)
        if e is not None and e.kind != ob.K_DIR:
            return True
        parent = parent.rpartition(b"/")[0]
    return False


def _run(job: Job) -> Built:
    """Worker entry point with ``-j`` (module level, so a spawned process can find it): the
    worker opens the source itself, read-only."""
    with Repo(Path(job.source), readonly=True) as src:
        return build(job, src)


# -- the command -------------------------------------------------------------------------------
def product_project_id(record: dict[str, Any]) -> str:
    """The product's project id: a pure function of what was partitioned and how."""
    basis = {k: record[k] for k in ("source_project", "point", "components", "prune")}
    basis["keep_deleted"] = record["keep_deleted"]
    return hashlib.sha256(b"partition\0" + ob.canonical_json(basis)).hexdigest()[:32]


def partition(
    src_arg: str,
    dest_arg: str,
    *,
    components_file: str | None,
    reference: str | None,
    prune_file: str | None = None,
    keep_deleted: bool = False,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Result:
    say = progress or (lambda _msg: None)
    if jobs < 1:
        raise UsageError("partition: -j needs a number of jobs, at least 1")
    dest = Path(dest_arg).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"partition: destination {dest} exists; give a new directory")
    src = Repo.open(src_arg)
    try:
        with src.store.read() as txn:
            if nested.is_product_txn(txn) or txn.meta("component"):
                raise UsageError(
                    f"partition: {src.root} is part of a nested collection; partition only "
                    "works on standalone repositories"
                )
        if reference is not None:
            spec, old = _spec_from_reference(reference)
            if old["source_project"] != src.project_id:
                raise UsageError(
                    f"partition: {reference} is a partition of another project than {src_arg}"
                )
        else:
            assert components_file is not None
            comps, attach = read_components(components_file)
            prune = read_prune_list(prune_file) if prune_file else []
            spec = Spec(comps, attach, prune, keep_deleted)
        say("partition: reading history")
        plan = analyse(src, spec)
        record: dict[str, Any] = {
            "version": RECORD_VERSION,
            "source_project": plan.source_project,
            "point": plan.point.hex(),
            "components": [os.fsdecode(c) for c in spec.components],
            "prune": spec.prune,
            "keep_deleted": spec.keep_deleted,
        }
        record["product_project"] = spec.product_project or product_project_id(record)
        tmp = dest.parent / f".{dest.name}.bkpartition-{os.getpid()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            built = _build_all(src, plan, spec, record, tmp, jobs, say)
            _finish(src, plan, spec, record, tmp, built, say)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Result(dest, len(plan.comps) + len(spec.attach), built[PRODUCT_OWNER].csets)
    finally:
        src.close()


def _job(src: Repo, plan: Plan, comps: list[bytes], owner: bytes, dest: Path, project: str) -> Job:
    mine = {rk for rk in plan.cross if plan.owner_of[rk] == owner}
    changes = {
        bytes(k): [row for row in rows if row[0] in mine]
        for k, rows in plan.changes.items()
        if any(row[0] in mine for row in rows)
    }
    return Job(
        source=str(src.root),
        dest=str(dest),
        owner=owner,
        comps=comps,
        order=plan.order,
        owner_of=plan.owner_of,
        target=plan.target,
        changes=changes,
        project_id=project,
        starts=plan.starts.get(owner, {}),
    )


def _build_all(
    src: Repo,
    plan: Plan,
    spec: Spec,
    record: dict[str, Any],
    tmp: Path,
    jobs: int,
    say: Callable[[str], None],
) -> dict[bytes, Built]:
    product_project = record["product_project"]
    projects = {c: nested.component_project_id(product_project, c) for c in plan.comps}
    work = [
        _job(src, plan, spec.components, c, tmp / os.fsdecode(c), projects[c]) for c in plan.comps
    ]
    built: dict[bytes, Built] = {}
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for b in pool.map(_run, work):
                built[b.owner] = b
                say(f"partition: component {os.fsdecode(b.owner)}: {b.csets} cset(s)")
    else:
        for j in work:
            b = build(j, src)
            built[b.owner] = b
            say(f"partition: component {os.fsdecode(b.owner)}: {b.csets} cset(s)")
    pj = _job(src, plan, spec.components, PRODUCT_OWNER, tmp, product_project)
    pj.comp_maps = {c: built[c].mapping for c in plan.comps}
    pj.comp_projects = projects
    built[PRODUCT_OWNER] = build(pj, src)
    say(f"partition: product: {built[PRODUCT_OWNER].csets} cset(s)")
    return built


def _finish(
    src: Repo,
    plan: Plan,
    spec: Spec,
    record: dict[str, Any],
    tmp: Path,
    built: dict[bytes, Built],
    say: Callable[[str], None],
) -> None:
    """Settings, BAM data, tags and marks of the new repositories; then attachments and the
    working files."""
    from bkrepo.transfer import checkout_tip

    with src.store.read() as txn:
        config = {k: v for k, v in txn.all_config().items() if k in cfg.COPIED_ON_CLONE}
        checkout = src.config_value("checkout", txn)
        ref = bamflow.get_server(txn)
        tags = src.tag_objects(txn)
    server = ref if ref is not None and not ref.is_self else None
    product = Repo(tmp)
    with product:
        for owner in [*plan.comps, PRODUCT_OWNER]:
            repo = product if owner == PRODUCT_OWNER else Repo(tmp / os.fsdecode(owner))
            try:
                with repo.store.write() as txn:
                    for k, v in {**config, "checkout": checkout}.items():
                        txn.set_config(k, v)
                    bamflow.set_server(txn, server)
                    if owner == PRODUCT_OWNER:
                        nested.mark_product(txn)
                        txn.set_meta("partition", json.dumps(record, sort_keys=True))
                        txn.set_meta("here", json.dumps([nested.ALL]))
                        _copy_tags(txn, tags, built[PRODUCT_OWNER].mapping)
                    else:
                        txn.set_meta("component", os.fsdecode(owner))
                _link_bam(src, repo)
            finally:
                if repo is not product:
                    repo.close()
        for where, url in spec.attach:
            say(f"partition: attaching {url} at {os.fsdecode(where)}")
            with src.store.read() as txn:
                point = txn.cset(plan.point)
            nested.attach(
                product,
                url,
                str(product.abspath(where)),
                f"attach {os.fsdecode(where)}",
                when=(point.author, point.time),
            )
        if checkout == "get":
            say("partition: writing the working files")
            for owner in [PRODUCT_OWNER, *plan.comps]:
                if owner == PRODUCT_OWNER:
                    checkout_tip(product, src, True)
                    continue
                with Repo(tmp / os.fsdecode(owner)) as comp:
                    checkout_tip(comp, src, True)


def _copy_tags(
    txn: Txn, tags: list[tuple[ObjectId, ob.Tag]], mapping: dict[bytes, tuple[bytes, int] | None]
) -> None:
    for _tid, t in tags:
        m = mapping.get(t.target)
        if m is not None:
            txn.add_tag(ob.Tag(t.name, ObjectId(m[0]), t.author, t.time).encode())


def _link_bam(src: Repo, repo: Repo) -> None:
    """What the source's pool holds of the BAM data this repository's history uses, by
    hardlink (verified copies across filesystems)."""
    with repo.store.read() as txn:
        oids = repo.bam_referenced(txn)
    for oid in sorted(oids):
        if src.pool.has(oid) and not repo.pool.has(oid):
            repo.pool.copy_from(src.pool, oid, hardlink=True)
