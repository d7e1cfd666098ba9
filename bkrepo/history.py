"""Reading and rewriting history: log, tag, undo, get and diff."""

from __future__ import annotations

import difflib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from bkrepo import dag, trees
from bkrepo import objects as ob
from bkrepo.errors import ObjectMissing, PathError, UnknownRevision, UsageError, WouldLoseWork
from bkrepo.ids import ObjectId
from bkrepo.repo import Repo
from bkrepo.store import Txn
from bkrepo.worktree import (
    CHECKED_OUT,
    WorkState,
    begin_update,
    entry_from_tree,
    fetch_bam_for,
    plan_update,
    run_update,
    scan,
    write_entry,
)


# -- log ---------------------------------------------------------------------------------------
@dataclass
class LogEntry:
    key: ObjectId
    cset: ob.Cset
    tags: list[str]
    files: list[str] = field(default_factory=list)


def cset_files(txn: Txn, cset: ob.Cset) -> list[str]:
    """``A/M/D/R`` lines for what a cset changed against its first parent."""
    first = txn.cset(cset.parents[0]).tree if cset.parents else None
    olds: dict[bytes, tuple[bytes, ob.TreeEntry]] = {}
    news: dict[bytes, tuple[bytes, ob.TreeEntry]] = {}
    for path, old, new in trees.diff(txn, first, cset.tree):
        if (old or new).kind == ob.K_COMP:  # type: ignore[union-attr]
            continue  # a product's record of a component (nested.component_files)
        if old is not None:
            olds[old.rootkey or path] = (path, old)
        if new is not None:
            news[new.rootkey or path] = (path, new)
    lines = []
    for rk in olds.keys() | news.keys():
        o, n = olds.get(rk), news.get(rk)
        if o and n:
            if o[0] != n[0]:
                flag = "RM" if not o[1].same_content(n[1]) else "R "
                lines.append((n[0], f"{flag} {os.fsdecode(o[0])} -> {os.fsdecode(n[0])}"))
            else:
                lines.append((n[0], f"M  {os.fsdecode(n[0])}"))
        elif n:
            lines.append((n[0], f"A  {os.fsdecode(n[0])}"))
        elif o:
            lines.append((o[0], f"D  {os.fsdecode(o[0])}"))
    return [text for _, text in sorted(lines)]


def log(
    repo: Repo, rev: str | None = None, path: str | None = None, verbose: bool = False
) -> Iterator[LogEntry]:
    with repo.store.read() as txn:
        tip = repo.tip(txn)
        if tip is None:
            if rev:  # an empty repository has no revision to name
                repo.require_tip(txn, f"revision {rev}")
            return
        graph = repo.graph(txn)
        tags_by_key: dict[ObjectId, list[str]] = {}
        for name, key in repo.tags(txn).items():
            tags_by_key.setdefault(key, []).append(name)
        keys: Iterator[ObjectId]
        if rev and ".." in rev:
            a, b = rev.split("..", 1)
            exclude = dag.ancestors(graph, [repo.resolve(txn, a)])
            keys = iter(
                dag.newest_first(
                    graph, dag.ancestors(graph, [repo.resolve(txn, b or "+")]) - exclude
                )
            )
        elif rev:
            keys = iter([repo.resolve(txn, rev)])
        else:
            keys = dag.walk_newest_first(graph, tip)
        if path is not None:
            rootkeys = _rootkeys_at(repo, txn, path)
            touched: set[bytes] = set()
            for rk in rootkeys:
                touched.update(txn.index_values("fileh", rk))
            keys = (k for k in keys if k in touched)
        product = verbose and txn.meta("product") == "1"
        for k in keys:
            cset = txn.cset(k)
            entry = LogEntry(k, cset, sorted(tags_by_key.get(k, [])))
            if verbose:
                entry.files = cset_files(txn, cset)
            if product:
                from bkrepo import nested

                entry.files = sorted(
                    entry.files + nested.component_files(repo, txn, cset), key=lambda f: f[3:]
                )
            yield entry


def _rootkeys_at(repo: Repo, txn: Txn, user_path: str) -> set[bytes]:
    rel = repo.relpath(user_path)
    state = WorkState.load(repo, txn)
    found = {e.rootkey for p, e in state.entries.items() if p == rel or p.startswith(rel + b"/")}
    tree = repo.tip_tree(txn)
    if tree is not None:
        found |= {e.rootkey for _, e in trees.walk_under(txn, tree, rel)}
    if not found:
        raise PathError(f"log: {user_path}: not a tracked file")
    return found


def history_keys(repo: Repo) -> list[ObjectId]:
    """Every cset of the current history, newest first (``log --keys``)."""
    with repo.store.read() as txn:
        tip = repo.tip(txn)
        if tip is None:
            return []
        return list(dag.walk_newest_first(repo.graph(txn), tip))


# -- tags --------------------------------------------------------------------------------------
def tag(repo: Repo, name: str, rev: str | None) -> ObjectId:
    if (
        not name
        or any(c.isspace() for c in name)
        or name in ("+", "tip", "HEAD")
        or "~" in name
        or ".." in name
    ):
        raise UsageError(f"tag: bad tag name {name!r}: no spaces, '~' or '..', and not '+'")
    with repo.locked("tag"), repo.store.write() as txn:
        target = repo.resolve(txn, rev or "+")
        t = ob.Tag(name=name, target=target, author=repo.author(), time=repo.now())
        txn.add_tag(t.encode())
        return target


# -- undo --------------------------------------------------------------------------------------
def undo(repo: Repo, rev: str) -> tuple[int, ObjectId | None]:
    """Remove ``rev`` and every cset after it; the working tree follows.  Refuses, changing
    nothing, when files it would rewrite have uncommitted changes.  When what survives would
    have more than one head (undoing a merge), the tip's first-parent line is kept and the
    csets only the other lines hold go too: undoing a merge removes what it merged in.
    Returns (csets removed, new tip)."""
    with repo.locked("undo"):
        with repo.store.read() as txn:
            tip = repo.require_tip(txn, "undo")
            doomed, new_tip = undo_plan(repo, txn, tip, rev)
            graph = repo.graph(txn)
            state = WorkState.load(repo, txn)
        remove_csets(repo, graph, doomed, new_tip, state, "undo")
        return len(doomed), new_tip


def undo_plan(
    repo: Repo, txn: Txn, tip: ObjectId, rev: str
) -> tuple[set[ObjectId], ObjectId | None]:
    """The csets ``undo -r REV`` removes and the tip it leaves."""
    target = repo.resolve(txn, rev)
    graph = repo.graph(txn)
    history = dag.ancestors(graph, [tip])
    doomed = dag.descendants(graph, target, history)
    survivors = dag.heads(graph, history - doomed)
    new_tip: ObjectId | None = survivors[0] if survivors else None
    if len(survivors) > 1:
        # Several lines would survive: keep the newest survivor on the tip's first-parent
        # line; nothing else would join the lines again.
        new_tip = tip
        while new_tip is not None and new_tip in doomed:
            parents = graph[new_tip][2]
            new_tip = parents[0] if parents else None
        doomed = history - (dag.ancestors(graph, [new_tip]) if new_tip else set())
    return doomed, new_tip


def undo_to(repo: Repo, key: ObjectId | None, what: str) -> int:
    """Make ``key`` the tip (None: empty), removing every cset of the current history that it
    does not reach; the working tree follows.  Refuses like :func:`undo`.  Used on the
    components of a product whose history goes back.  Returns the csets removed."""
    with repo.locked(what):
        with repo.store.read() as txn:
            tip = repo.tip(txn)
            graph = repo.graph(txn)
            if key is not None and key not in graph:
                raise UnknownRevision(f"{what}: {repo.root} lacks cset {key.hex()[:12]}")
            doomed = dag.ancestors(graph, [tip] if tip else []) - dag.ancestors(
                graph, [key] if key else []
            )
            if not doomed:
                return 0
            state = WorkState.load(repo, txn)
        remove_csets(repo, graph, doomed, key, state, what)
        return len(doomed)


def check_undo_to(repo: Repo, key: ObjectId | None, what: str) -> None:
    """Raise WouldLoseWork if moving the working tree to ``key`` would lose uncommitted work."""
    with repo.store.read() as txn:
        state = WorkState.load(repo, txn)
        plan_update(repo, txn, state, txn.cset(key).tree if key else None, what)


def remove_csets(
    repo: Repo,
    graph: dag.Graph,
    doomed: set[ObjectId],
    new_tip: ObjectId | None,
    state: WorkState,
    what: str,
) -> None:
    with repo.store.write() as txn:
        new_tree = txn.cset(new_tip).tree if new_tip else None
        plan = plan_update(repo, txn, state, new_tree, what)
        for k in dag.newest_first(graph, doomed):
            repo.unrecord_cset(txn, k)
        for tid, t in repo.tag_objects(txn):
            if t.target in doomed:
                txn.delete_tag(tid)
        txn.set_meta("tip", new_tip.hex() if new_tip else None)
        if plan.changes:
            begin_update(txn, plan)
        else:
            state.save(txn, new_tree)
    if plan.changes:
        run_update(repo, plan, state)


# -- get ---------------------------------------------------------------------------------------
def get(
    repo: Repo,
    paths: list[str],
    rev: str | None = None,
    *,
    force: bool = False,
    to_stdout: bool = False,
) -> list[bytes]:
    """Check files out of history (BAM data from the pool).  At the tip this materialises
    files (of a ``--checkout none`` clone, or ones deleted by hand) and takes back a pending
    ``rm``; with ``-r`` it writes that revision's content, which then shows as a change.
    Refuses to overwrite uncommitted changes unless ``force``."""
    with repo.locked("get"):
        with repo.store.read() as txn:
            tip = repo.require_tip(txn, "get")
            key = repo.resolve(txn, rev) if rev else tip
            tree = txn.cset(key).tree
            state = WorkState.load(repo, txn)
            todo: list[tuple[bytes, ob.TreeEntry]] = []
            for user_path in paths:
                rel = repo.relpath(user_path)
                found = [
                    (p, e) for p, e in trees.walk_under(txn, tree, rel) if e.kind in ob.LEAF_KINDS
                ]
                if not found:
                    at = f" in {rev}" if rev else ""
                    raise PathError(f"get: {user_path}: not a tracked file{at}")
                todo.extend(found)
            if to_stdout:
                fetch_bam_for(repo, txn, todo, "get")
                for _p, e in todo:
                    _write_stdout(repo, txn, e)
                return [p for p, _ in todo]
            if not force:
                targets = [p for p, _ in todo]
                dirty = [
                    c.path
                    for c in scan(repo, txn, state, targets, untracked=True).changes
                    if c.code in ("M", "R", "A", "?")
                ]
                if dirty:
                    raise WouldLoseWork(
                        "get",
                        [os.fsdecode(p) for p in dirty],
                        "commit them, or use get -f to overwrite",
                    )
            fetch_bam_for(repo, txn, todo, "get")
            written = []
            # a path whose file was renamed away (uncommitted) gets an untracked copy: the
            # file itself lives on under its new name
            renamed_away = set(state.moved.values())
            for p, e in todo:
                ie = state.entries.get(p)
                at_tip = ie is not None and ie.id == e.id and ie.kind == e.kind
                if (
                    not force  # without -f the scan above found it clean
                    and at_tip
                    and ie is not None
                    and ie.flags & CHECKED_OUT
                    and os.path.lexists(repo.abspath(p))
                ):
                    continue  # already there and clean
                now = time.time_ns()
                st = write_entry(repo, txn, p, e)
                if at_tip and ie is not None:
                    state.set(p, ie._replace(mode=e.mode).with_stat(st, now))
                elif ie is None and key == tip and p not in renamed_away:
                    state.removed.pop(p, None)  # getting a removed file back un-removes it
                    state.set(p, entry_from_tree(e).with_stat(st, now))
                written.append(p)
        with repo.store.write() as wtxn:
            state.save(wtxn, state.tree)
        return written


def _write_stdout(repo: Repo, txn: Txn, e: ob.TreeEntry) -> None:
    out = sys.stdout.buffer
    if e.kind == ob.K_BAM:
        ptr = txn.pointer(e.id)
        if not repo.pool.has(ptr.oid):
            raise ObjectMissing(f"get: BAM data {ptr.oid.hex()[:16]}… is not in the local pool")
        # verified before the first byte goes out: stdout cannot take bytes back
        with open(repo.pool.verified_path(ptr.oid), "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)
    else:
        out.write(txn.blob(e.id))
    out.flush()


# -- diff --------------------------------------------------------------------------------------
def diff(
    repo: Repo, paths: list[str], rev: str | None = None, *, prefix: bytes = b""
) -> Iterator[str]:
    """Unified diffs of the working tree against ``rev`` (default: the tip); names shown
    with ``prefix`` in front (a component's path in its product)."""
    with repo.store.read() as txn:
        tip = repo.tip(txn)
        state = WorkState.load(repo, txn)
        scope = [repo.relpath(p) for p in paths] or None
        base_tree = (
            txn.cset(repo.resolve(txn, rev)).tree if rev else (txn.cset(tip).tree if tip else None)
        )
        pairs: list[tuple[bytes | None, bytes | None]] = []  # (path in base, path in working tree)
        if rev is None:
            for c in scan(repo, txn, state, scope, untracked=False).changes:
                if c.code == "R":
                    pairs.append((c.old_path, c.path))
                elif c.code == "D":
                    pairs.append((c.path, None))
                elif c.code == "A":
                    pairs.append((None, c.path))
                elif c.code == "M":
                    pairs.append((c.path, c.path))
        else:
            base = {
                p: e
                for p, e in (trees.walk(txn, base_tree) if base_tree else [])
                if scope is None or any(p == s or p.startswith(s + b"/") or not s for s in scope)
            }
            cur = {
                p
                for p in state.entries
                if scope is None or any(p == s or p.startswith(s + b"/") or not s for s in scope)
            }
            for p in sorted(base.keys() | cur):
                pairs.append((p if p in base else None, p if p in cur else None))
        for old, new in pairs:
            a = _base_bytes(repo, txn, base_tree, old) if old is not None else b""
            b = _work_bytes(repo, new) if new is not None else b""
            if a == b and old == new:
                continue
            yield from _unified(
                prefix + old if old is not None else None,
                prefix + new if new is not None else None,
                a,
                b,
            )


def _base_bytes(repo: Repo, txn: Txn, tree: ObjectId | None, path: bytes) -> bytes | None:
    e = trees.lookup(txn, tree, path) if tree else None
    if e is None:
        return b""
    if e.kind == ob.K_BAM:
        return None
    return txn.blob(e.id)


def _work_bytes(repo: Repo, path: bytes) -> bytes | None:
    full = repo.abspath(path)
    if os.path.islink(full):
        return os.fsencode(os.readlink(full))
    if not full.is_file():
        return b""
    if full.stat().st_size > 64 << 20:
        return None
    return full.read_bytes()


def _unified(
    old: bytes | None, new: bytes | None, a: bytes | None, b: bytes | None
) -> Iterator[str]:
    an = "a/" + os.fsdecode(old) if old is not None else "/dev/null"
    bn = "b/" + os.fsdecode(new) if new is not None else "/dev/null"
    yield f"diff --bkr {an} {bn}\n"
    if a is None or b is None or b"\0" in a or b"\0" in b:
        yield f"Binary files {an} and {bn} differ\n"
        return
    at = a.decode("utf-8", "replace").splitlines(keepends=True)
    bt = b.decode("utf-8", "replace").splitlines(keepends=True)
    for line in difflib.unified_diff(at, bt, an, bn):
        yield line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
