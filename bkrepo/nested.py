"""Nested collections: a product repository whose components are repositories at fixed paths.

The model.  A component is a full repository of its own (its own ``.bk/``, history, pool and
BAM server setting, and a project id of its own) living at a fixed path inside the product's
working tree.  The product's history records which cset of each component belongs to each
product cset: a product tree holds, in the component's directory, an entry named ``.bk`` of
kind ``c`` (K_COMP) whose id is the component's cset key and whose root key is the
component's project id.  So ``src/.bk`` names the component at ``src``, components may nest
(``src`` and ``src/gnu``), and a product cset pins the whole collection, the way the
ChangeSet file of a BitKeeper product does.  Nothing but that entry of a component is in the
product's history; its files are the component's.

In a product, ``commit``, ``status``, ``log``, ``undo``, ``clone``, ``pull`` and ``push`` act
on the whole collection (this module); run inside a component's directory they act on that
component alone, as on any repository.  A component whose tip is ahead of what the product
records has csets "not yet in the product": the next product commit records them.

Population.  A clone may hold only some components (``clone -s``); the product records the
selection (``here``) and ``populate``/``unpopulate`` change it.  A component that is not here
keeps its entry in the product's history; its directory is absent.  Names for a selection:
``ALL``, ``PRODUCT`` (no components), a component path (that component), a directory (the
components below it), a glob over component paths, or an alias defined in the product's
versioned ``.bkaliases`` file (``NAME: ITEM...`` per line).

Repository meta keys: ``product`` ("1" in a product), ``component`` (its path in the
product), ``here`` (JSON list of selection names), ``sources`` (JSON list of the URLs and
paths the product was cloned from, pulled from or pushed to, where ``populate`` looks for
components, local paths first), ``partition`` (JSON record of how a partition made the
product; see partition.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bkrepo import dag, trees
from bkrepo import objects as ob
from bkrepo.commit import CommitResult, check_message, pending_changes, record
from bkrepo.config import glob_match
from bkrepo.errors import (
    BkError,
    MergeConflict,
    NothingToCommit,
    PathError,
    PullFirst,
    SyncError,
    UsageError,
    WouldLoseWork,
)
from bkrepo.ids import ObjectId
from bkrepo.merge import CompMerge
from bkrepo.repo import Repo, is_repo
from bkrepo.store import Txn
from bkrepo.sync import Outcome
from bkrepo.worktree import Change, WorkState, refresh_index, scan

COMP = b".bk"  # the name of a component's entry in the product's tree: <path>/.bk
ALIASES_FILE = b".bkaliases"
ALL, PRODUCT = "ALL", "PRODUCT"


# -- the model ---------------------------------------------------------------------------------
def is_product_txn(txn: Txn) -> bool:
    return txn.meta("product") == "1"


def is_product(repo: Repo) -> bool:
    with repo.store.read() as txn:
        return is_product_txn(txn)


def partition_record(txn: Txn) -> dict[str, object] | None:
    raw = txn.meta("partition")
    return json.loads(raw) if raw else None


def mark_product(txn: Txn) -> None:
    txn.set_meta("product", "1")


def mark_component(comp: Repo, path: bytes) -> None:
    with comp.store.write() as txn:
        txn.set_meta("component", os.fsdecode(path))


def component_project_id(product_project: str, path: bytes) -> str:
    """A component's project id when the product makes it (partition): a pure function of
    the product and the path, so partitioning twice gives the same ids."""
    return hashlib.sha256(b"component\0" + product_project.encode() + b"\0" + path).hexdigest()[:32]


def components(txn: Txn, tree: bytes | None) -> dict[bytes, ob.TreeEntry]:
    """Component path -> its entry (id: the component's cset key), for a product tree."""
    out: dict[bytes, ob.TreeEntry] = {}

    def walk(tid: bytes, prefix: bytes) -> None:
        for e in txn.tree(tid):
            if e.kind == ob.K_COMP and e.name == COMP and prefix:
                out[prefix[:-1]] = e
            elif e.kind == ob.K_DIR:
                walk(e.id, prefix + e.name + b"/")

    if tree is not None:
        walk(tree, b"")
    return out


def comp_entry(key: ObjectId, time: int, project_id: str) -> ob.TreeEntry:
    """The product's record of a component at cset ``key``."""
    return ob.TreeEntry(COMP, ob.K_COMP, trees.DIR_MODE, 0, time, bytes.fromhex(project_id), key)


def entry_of(comp: Repo) -> ob.TreeEntry | None:
    """The entry recording a component's current tip (None: it has no csets)."""
    with comp.store.read() as txn:
        tip = comp.tip(txn)
        if tip is None:
            return None
        return comp_entry(tip, txn.cset(tip).time, comp.project_id)


def owner(comps: Iterable[bytes], rel: bytes) -> bytes | None:
    """The innermost component holding the repo-relative path ``rel`` (None: the product)."""
    best = None
    for c in comps:
        if (rel == c or rel.startswith(c + b"/")) and (best is None or len(c) > len(best)):
            best = c
    return best


def join(location: str, path: bytes) -> str:
    """The URL or local path of a component of the product at ``location``."""
    return location.rstrip("/") + "/" + os.fsdecode(path)


@contextlib.contextmanager
def opened(product: Repo, paths: Iterable[bytes]) -> Iterator[dict[bytes, Repo]]:
    """The populated components among ``paths``, opened, closed at the end."""
    out: dict[bytes, Repo] = {}
    try:
        for p in sorted(paths):
            root = product.abspath(p)
            if is_repo(root):
                out[p] = Repo(root.resolve())
        yield out
    finally:
        for r in out.values():
            r.close()


def tip_components(product: Repo) -> dict[bytes, ob.TreeEntry]:
    with product.store.read() as txn:
        return components(txn, product.tip_tree(txn))


def ahead(comp: Repo, recorded: ObjectId | None) -> int:
    """Csets of a component's history that the product's record does not reach."""
    with comp.store.read() as txn:
        tip = comp.tip(txn)
        if tip is None:
            return 0
        graph = comp.graph(txn)
    keep = dag.ancestors(graph, [recorded]) if recorded is not None and recorded in graph else set()
    return len(dag.ancestors(graph, [tip]) - keep)


# -- selections (clone -s, populate, unpopulate) -----------------------------------------------
def aliases(txn: Txn, tree: bytes | None) -> dict[str, list[str]]:
    """``NAME: ITEM ITEM...`` lines of the product's ``.bkaliases`` (``#`` comments)."""
    entry = trees.lookup(txn, tree, ALIASES_FILE) if tree else None
    if entry is None or entry.kind != ob.K_FILE:
        return {}
    out: dict[str, list[str]] = {}
    for line in txn.blob(entry.id).decode("utf-8", "replace").splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, items = line.partition(":")
        if sep and name.strip():
            out[name.strip()] = items.split()
    return out


def select(
    names: Iterable[str], comps: Iterable[bytes], alias_map: dict[str, list[str]]
) -> set[bytes]:
    """The component paths a selection names.  Unknown names are a usage error."""
    paths = sorted(comps)
    out: set[bytes] = set()

    def one(name: str, depth: int) -> None:
        if name.upper() == ALL:
            out.update(paths)
            return
        if name.upper() == PRODUCT:
            return
        if name in alias_map:
            if depth > 20:
                raise UsageError(f"alias {name!r} refers to itself")
            for item in alias_map[name]:
                one(item, depth + 1)
            return
        pat = name.strip().removeprefix("./").strip("/")
        raw = os.fsencode(pat)
        if raw in paths:  # a component: just that one (not those nested inside it)
            out.add(raw)
            return
        hits = [p for p in paths if p.startswith(raw + b"/") or glob_match(os.fsdecode(p), pat)]
        if not hits:
            raise UsageError(
                f"{name!r} names no component (see 'bkr comps') and no alias (.bkaliases)"
            )
        out.update(hits)

    for n in names:
        one(n, 0)
    return out


def here(txn: Txn) -> list[str]:
    raw = txn.meta("here")
    return json.loads(raw) if raw else [ALL]


def wanted(product: Repo, path: bytes) -> bool:
    """Does the product's selection take this component (e.g. one a pull brings in)?"""
    with product.store.read() as txn:
        tree = product.tip_tree(txn)
        names = here(txn)
        comps = components(txn, tree)
        alias_map = aliases(txn, tree)
    try:
        return path in select(names, [*comps, path], alias_map)
    except UsageError:
        return False


def add_source(product: Repo, location: str) -> None:
    """Remember where components can be found (local paths first, newest first)."""
    with product.store.write() as txn:
        old = json.loads(txn.meta("sources") or "[]")
        new = [location, *(s for s in old if s != location)]
        new.sort(key=lambda s: s.startswith(("http://", "https://")))  # stable: local first
        txn.set_meta("sources", json.dumps(new[:20]))


def sources(product: Repo) -> list[str]:
    with product.store.read() as txn:
        found = json.loads(txn.meta("sources") or "[]")
        parent = txn.meta("parent")
    if parent and parent not in found:
        found.append(parent)
    return sorted(found, key=lambda s: s.startswith(("http://", "https://")))


def create_component(product: Repo, path_text: str, project_id: str) -> bool:
    """Make an empty component repository in a product (a push target), ready to receive a
    component that a push brings; returns False when a repository is there already.  Its BAM
    data stays in its own pool, unless the product is its own BAM server: then the component
    is too."""
    from bkrepo import bamflow

    rel = os.fsencode(path_text)
    parts = path_text.split("/")
    if not path_text or any(p in ("", ".", "..") or p.startswith(".bk") for p in parts):
        raise UsageError(f"bad component path {path_text!r}")
    if len(project_id) != 32 or any(c not in "0123456789abcdef" for c in project_id):
        raise UsageError(f"bad project id {project_id!r}")
    root = product.abspath(rel)
    if is_repo(root):
        return False  # a push into it checks that it is the same project
    with product.store.read() as txn:
        ref = bamflow.get_server(txn)
    with Repo.init(root, project_id=project_id) as comp, comp.store.write() as txn:
        txn.set_meta("component", path_text)
        if ref is not None and ref.is_self:
            bamflow.set_server(txn, ref)
    return True


# -- file commands in a product (add, rm, mv, get, diff) ----------------------------------------
def route(product: Repo, user_paths: list[str]) -> tuple[list[str], dict[bytes, list[str]]]:
    """Split user paths into the product's and each populated component's (absolute, so the
    component resolves them itself)."""
    comps = [c for c in tip_components(product) if is_repo(product.abspath(c))]
    mine: list[str] = []
    theirs: dict[bytes, list[str]] = {}
    for p in user_paths:
        c = owner(comps, product.relpath(p))
        if c is None:
            mine.append(p)
        else:
            theirs.setdefault(c, []).append(os.path.abspath(p))
    return mine, theirs


def each(
    product: Repo, user_paths: list[str], fn: Callable[[Repo, list[str]], list[bytes]]
) -> list[bytes]:
    """Run ``fn(repo, paths)`` on the product and the components the paths fall in; results
    come back with paths from the product's root."""
    mine, theirs = route(product, user_paths)
    out: list[bytes] = []
    if mine:
        out += fn(product, mine)
    for c, paths in sorted(theirs.items()):
        with Repo(product.abspath(c).resolve()) as comp:
            out += [c + b"/" + p for p in fn(comp, paths)]
    return out


def component_rev(product: Repo, path: bytes, rev: str | None) -> str | None:
    """A product revision, as the cset of one component it records (None: the tip)."""
    if rev is None:
        return None
    with product.store.read() as txn:
        entry = components(txn, txn.cset(product.resolve(txn, rev)).tree).get(path)
    if entry is None:
        raise UsageError(f"component {os.fsdecode(path)} did not exist at revision {rev}")
    return entry.id.hex()


def diff(product: Repo, user_paths: list[str], rev: str | None) -> Iterator[str]:
    """Diffs of the whole collection (or of the paths given) against a product revision."""
    from bkrepo import history

    if user_paths:
        mine, theirs = route(product, user_paths)
    else:
        mine = []
        theirs = {c: [] for c in tip_components(product) if is_repo(product.abspath(c))}
    if mine or not user_paths:
        yield from history.diff(product, mine, rev)
    for c, paths in sorted(theirs.items()):
        crev = component_rev(product, c, rev)
        with Repo(product.abspath(c).resolve()) as comp:
            yield from history.diff(comp, paths, crev, prefix=c + b"/")


def get(
    product: Repo, user_paths: list[str], rev: str | None, *, force: bool, to_stdout: bool
) -> list[bytes]:
    """``bkr get`` of paths anywhere in the collection (``-r``: a product revision)."""
    from bkrepo import history

    mine, theirs = route(product, user_paths)
    out = history.get(product, mine, rev, force=force, to_stdout=to_stdout) if mine else []
    for c, paths in sorted(theirs.items()):
        crev = component_rev(product, c, rev)
        with Repo(product.abspath(c).resolve()) as comp:
            got = history.get(comp, paths, crev, force=force, to_stdout=to_stdout)
        out += [c + b"/" + p for p in got]
    return out


def mv(product: Repo, src: str, dst: str) -> list[tuple[bytes, bytes]]:
    from bkrepo.commit import mv as repo_mv

    comps = [c for c in tip_components(product) if is_repo(product.abspath(c))]
    a, b = owner(comps, product.relpath(src)), owner(comps, product.relpath(dst))
    if a != b:
        raise PathError(
            f"mv: {src} and {dst} are in different components; a file cannot move between "
            "repositories (copy it, add the copy, and remove the original)"
        )
    if a is None:
        return repo_mv(product, src, dst)
    with Repo(product.abspath(a).resolve()) as comp:
        pairs = repo_mv(comp, os.path.abspath(src), os.path.abspath(dst))
    return [(a + b"/" + o, a + b"/" + n) for o, n in pairs]


# -- commit ------------------------------------------------------------------------------------
def commit(product: Repo, message: str, paths: list[str] | None) -> CommitResult:
    """Commit in every component with changes in scope, then one product cset recording them
    (and the product's own files)."""
    check_message(message)
    with product.locked("commit"):
        comps = tip_components(product)
        prod_scope, comp_scopes = _split_scope(product, paths, comps)
        pending = pending_changes(product, prod_scope) if prod_scope != [] else None
        changes: list[Change] = list(pending.changes) if pending else []
        warnings: list[str] = list(pending.warnings) if pending else []
        extra: dict[bytes, ob.TreeEntry | None] = {}
        with opened(product, comp_scopes) as repos:
            missing = sorted(set(comp_scopes) - set(repos))
            if paths and missing:
                raise PathError(
                    f"commit: component {os.fsdecode(missing[0])} is not populated here; "
                    "'bkr populate' it first"
                )
            for path, comp in repos.items():
                with comp.locked("commit"):
                    cp = pending_changes(comp, comp_scopes[path])
                    if cp.changes:
                        record(comp, cp, message)
                changes += [_prefixed(path, c) for c in cp.changes]
                warnings += [f"{os.fsdecode(path)}/{w}" for w in cp.warnings]
                entry = entry_of(comp)
                recorded = comps.get(path)
                if entry is not None and (recorded is None or recorded.id != entry.id):
                    extra[path + b"/" + COMP] = entry
        if not changes and not extra:
            raise NothingToCommit("commit: nothing to commit (use 'bkr add' for new files)")
        if pending is None:
            pending = pending_changes(product, [])
        key = record(product, pending, message, extra)
        return CommitResult(key, changes, warnings)


def _split_scope(
    product: Repo, paths: list[str] | None, comps: dict[bytes, ob.TreeEntry]
) -> tuple[list[bytes] | None, dict[bytes, list[bytes] | None]]:
    """Product scope (None: all; []: nothing) and each component's scope."""
    if not paths:
        return None, dict.fromkeys(comps)
    prod: list[bytes] = []
    per: dict[bytes, list[bytes] | None] = {}
    for p in paths:
        rel = product.relpath(p)
        c = owner(comps, rel)
        if c is not None:
            sub = rel[len(c) + 1 :]
            if not sub:
                per[c] = None
            elif per.get(c, []) is not None:
                per.setdefault(c, []).append(sub)  # type: ignore[union-attr]
            continue
        prod.append(rel)
        for comp in comps:
            if not rel or comp.startswith(rel + b"/"):
                per[comp] = None
    return prod, per


def _prefixed(path: bytes, c: Change) -> Change:
    return Change(
        path + b"/" + c.path,
        c.code,
        path + b"/" + c.old_path if c.old_path is not None else None,
        c.content_changed,
    )


# -- status ------------------------------------------------------------------------------------
def status(product: Repo, user_paths: list[str], untracked: bool) -> list[str]:
    """Status lines of the whole collection; a component ahead of the product's record shows
    as ``C  PATH/``."""
    comps = tip_components(product)
    prod_scope, comp_scopes = _split_scope(product, user_paths or None, comps)
    lines: list[tuple[bytes, str]] = []
    if prod_scope != []:
        lines += [(c.path, c.display()) for c in _scan(product, prod_scope, untracked)]
    with opened(product, comp_scopes) as repos:
        for path, comp in repos.items():
            lines += [
                (c.path, c.display())
                for c in (_prefixed(path, x) for x in _scan(comp, comp_scopes[path], untracked))
            ]
            recorded = comps.get(path)
            n = ahead(comp, ObjectId(recorded.id) if recorded else None)
            if n:
                lines.append(
                    (path, f"C  {os.fsdecode(path)}/  ({n} cset(s) not yet in the product)")
                )
    return [text for _p, text in sorted(lines)]


def _scan(repo: Repo, scope: list[bytes] | None, untracked: bool) -> list[Change]:
    with repo.store.read() as txn:
        state = WorkState.load(repo, txn)
        result = scan(repo, txn, state, scope, untracked=untracked)
    refresh_index(repo, state, result)
    return result.changes


# -- log ---------------------------------------------------------------------------------------
def component_files(product: Repo, txn: Txn, cset: ob.Cset) -> list[str]:
    """For ``log -v``: the files the component csets of a product cset changed, each path
    within the collection (components not populated here show as one line)."""
    from bkrepo.history import cset_files

    first = txn.cset(cset.parents[0]).tree if cset.parents else None
    old = components(txn, first)
    new = components(txn, cset.tree)
    lines: list[str] = []
    for path in sorted(new.keys() | old.keys()):
        a, b = old.get(path), new.get(path)
        if b is None or (a is not None and a.id == b.id):
            continue
        root = product.abspath(path)
        if not is_repo(root):
            lines.append(f"C  {os.fsdecode(path)}/  (component not populated here)")
            continue
        with Repo(root.resolve()) as comp, comp.store.read() as ctxn:
            graph = comp.graph(ctxn)
            if b.id not in graph:
                lines.append(f"C  {os.fsdecode(path)}/  (cset {b.id.hex()[:12]} not here)")
                continue
            done = dag.ancestors(graph, [ObjectId(a.id)]) if a and a.id in graph else set()
            for k in dag.oldest_first(graph, dag.ancestors(graph, [ObjectId(b.id)]) - done):
                for f in cset_files(ctxn, ctxn.cset(k)):
                    code, _, rest = f.partition(" ")
                    lines.append(f"{code} {_prefix_display(path, rest.lstrip())}")
    return lines


def _prefix_display(path: bytes, text: str) -> str:
    p = os.fsdecode(path)
    if " -> " in text:
        a, b = text.split(" -> ", 1)
        return f" {p}/{a} -> {p}/{b}"
    return f" {p}/{text}"


# -- undo --------------------------------------------------------------------------------------
def undo(product: Repo, rev: str) -> tuple[int, ObjectId | None]:
    """Undo product csets and, in every populated component, the csets they recorded.  All
    checks run before anything changes."""
    from bkrepo import history

    with product.locked("undo"):
        with product.store.read() as txn:
            tip = product.require_tip(txn, "undo")
            doomed, new_tip = history.undo_plan(product, txn, tip, rev)
            old = components(txn, txn.cset(tip).tree)
            new = components(txn, txn.cset(new_tip).tree) if new_tip else {}
        with opened(product, old) as repos:
            for path, comp in repos.items():
                if ahead(comp, ObjectId(old[path].id)):
                    raise WouldLoseWork(
                        "undo",
                        [os.fsdecode(path)],
                        "that component has csets not yet in the product; commit or undo them "
                        "there first",
                    )
                target = new.get(path)
                if target is None:
                    raise UsageError(
                        f"undo: component {os.fsdecode(path)} did not exist at the new tip; "
                        "undo cannot remove a component"
                    )
                history.check_undo_to(comp, ObjectId(target.id), "undo")
            with product.store.read() as txn:
                state = WorkState.load(product, txn)
                graph = product.graph(txn)
            history.remove_csets(product, graph, doomed, new_tip, state, "undo")
            for path, comp in repos.items():
                history.undo_to(comp, ObjectId(new[path].id), "undo")
        return len(doomed), new_tip


# -- clone -------------------------------------------------------------------------------------
def clone_components(
    product: Repo,
    source: str,
    names: list[str] | None,
    *,
    checkout: str,
    hardlink: bool,
    bam: str | None,
    base: str | None,
) -> None:
    """Clone the selected components of a freshly cloned product into place, each at the cset
    the product's tip records (called inside the product's clone, before it is renamed into
    place, so a failure leaves nothing)."""
    from bkrepo.transfer import clone

    with product.store.read() as txn:
        tree = product.tip_tree(txn)
        comps = components(txn, tree)
        alias_map = aliases(txn, tree)
    chosen = select(names or [ALL], comps, alias_map)
    for path in sorted(chosen):
        comp_base = None
        if base is not None and is_repo(Path(base) / os.fsdecode(path)):
            comp_base = str(Path(base) / os.fsdecode(path))
        result = clone(
            join(source, path),
            str(product.abspath(path)),
            rev=comps[path].id.hex(),
            checkout=checkout,
            hardlink=hardlink,
            bam=_component_bam(bam, path),
            base=comp_base,
        )
        with Repo(result.path) as comp:
            mark_component(comp, path)
    with product.store.write() as txn:
        txn.set_meta("here", json.dumps(names or [ALL]))
    add_source(product, source)


def _component_bam(bam: str | None, path: bytes) -> str | None:
    """A product's ``-B``, for one component: ``.`` and ``none`` as they are; a URL names the
    server product, whose component at the same path serves this one."""
    if bam is None or bam in (".",) or bam.lower() == "none":
        return bam
    return join(bam, path)


# -- pull --------------------------------------------------------------------------------------
def pull(product: Repo, url: str | None, *, rev: str | None, resolve: str | None) -> Outcome:
    """Pull the product and, first, each populated component to the cset the incoming product
    records (merging where both sides moved it); components the selection takes that are new
    are cloned.  A failure anywhere undoes what the components took, so the collection is as
    it was."""
    from bkrepo import transfer
    from bkrepo.sync import discard, integrate
    from bkrepo.transport import open_peer

    source = transfer.resolve_url(product, url, "pull")
    peer = open_peer(source, what="pull")
    moved: list[tuple[bytes, ObjectId | None]] = []  # component, its tip before (None: new)
    try:
        with product.locked("pull"):
            with product.store.read() as txn:
                ours = components(txn, product.tip_tree(txn))
            info, staged = transfer.stage_pull(product, peer, source, rev)
            try:
                with product.store.read() as txn:
                    theirs = components(txn, txn.cset(staged.tip).tree) if staged.tip else {}
                for path, entry in sorted(theirs.items()):
                    _pull_component(product, peer.url, path, entry, ours, resolve, moved)
                outcome = integrate(
                    product,
                    staged,
                    what="pull",
                    source=peer.url,
                    resolve=resolve,
                    ensure_bam=transfer.incoming_bam(product, peer, info, "pull"),
                    components=_joiner(product),
                )
            except BaseException:
                discard(product, staged)
                _roll_back(product, moved)
                raise
            add_source(product, peer.url)
            return outcome
    finally:
        peer.close()


def _pull_component(
    product: Repo,
    source: str,
    path: bytes,
    entry: ob.TreeEntry,
    ours: dict[bytes, ob.TreeEntry],
    resolve: str | None,
    moved: list[tuple[bytes, ObjectId | None]],
) -> None:
    from bkrepo import transfer

    mine = ours.get(path)
    if mine is not None and mine.id == entry.id:
        return
    root = product.abspath(path)
    if not is_repo(root):
        if mine is not None or not wanted(product, path):
            return  # not populated here: the product's record is enough
        with product.store.read() as txn:
            mode = product.config_value("checkout", txn)
        moved.append((path, None))
        result = transfer.clone(join(source, path), str(root), rev=entry.id.hex(), checkout=mode)
        with Repo(result.path) as comp:
            mark_component(comp, path)
        return
    with Repo(root.resolve()) as comp:
        with comp.store.read() as txn:
            if txn.has_cset(entry.id):
                return
            before = comp.tip(txn)
        try:
            transfer.pull(comp, join(source, path), rev=entry.id.hex(), resolve=resolve)
        except BkError as e:
            raise _in_component(path, e) from None
        moved.append((path, before))


def _in_component(path: bytes, e: BkError) -> BkError:
    """A component's failure, told in the collection's terms (paths from the product root)."""
    if isinstance(e, MergeConflict):
        return MergeConflict("pull", [f"{os.fsdecode(path)}/{p}" for p in e.paths])
    e.message = f"component {os.fsdecode(path)}: {e.message}"
    return e


def _roll_back(product: Repo, moved: list[tuple[bytes, ObjectId | None]]) -> None:
    from bkrepo import history

    for path, before in reversed(moved):
        root = product.abspath(path)
        if before is None:
            shutil.rmtree(root, ignore_errors=True)
            continue
        with contextlib.suppress(BkError), Repo(root.resolve()) as comp:
            history.undo_to(comp, before, "pull")


def _joiner(product: Repo) -> CompMerge:
    """The merge of a component both sides moved: the component's tip, when it has become a
    merge of (or descends from) both records."""

    def join_entries(path: bytes, o: ob.TreeEntry, t: ob.TreeEntry) -> ob.TreeEntry | None:
        root = product.abspath(path.removesuffix(b"/" + COMP))
        if not is_repo(root):
            return None
        with Repo(root.resolve()) as comp:
            with comp.store.read() as txn:
                graph = comp.graph(txn)
                tip = comp.tip(txn)
            if (
                tip is None
                or o.id not in graph
                or t.id not in graph
                or not dag.is_ancestor(graph, ObjectId(o.id), tip)
                or not dag.is_ancestor(graph, ObjectId(t.id), tip)
            ):
                return None
            return entry_of(comp)

    return join_entries


# -- push --------------------------------------------------------------------------------------
def push(product: Repo, url: str | None) -> Outcome:
    """Push each component the push changes (to the cset the product records), then the
    product.  Checks that the target has nothing we lack before anything moves."""
    from bkrepo import transfer
    from bkrepo.transport import open_peer

    target = transfer.resolve_url(product, url, "push")
    peer = open_peer(target, what="push")
    try:
        info = peer.info()
        with product.store.read() as txn:
            if info.tip is not None and not txn.has_cset(info.tip):
                raise PullFirst(
                    f"push: {target} has csets this repository lacks; pull first, then push"
                )
            ours = components(txn, product.tip_tree(txn))
            theirs = components(txn, txn.cset(info.tip).tree) if info.tip else {}
        target_url = peer.url
        with product.locked("push"):
            todo = {p: e for p, e in ours.items() if p not in theirs or theirs[p].id != e.id}
            with opened(product, todo) as repos:
                for path in sorted(todo):
                    if path not in repos:
                        raise SyncError(
                            f"push: component {os.fsdecode(path)} is not populated here, and "
                            "the push would change it at the target; populate it first"
                        )
                for path, comp in repos.items():
                    if path not in theirs:  # new at the target (attached here)
                        peer.create_component(os.fsdecode(path), comp.project_id)
                _push_components(repos, todo, target_url)
            outcome = transfer.push(product, target)
            add_source(product, target_url)
            return outcome
    finally:
        peer.close()


def _push_components(
    repos: dict[bytes, Repo], todo: dict[bytes, ob.TreeEntry], target_url: str
) -> None:
    """Each component to the cset the product records, at the target's same path."""
    from bkrepo import transfer

    for path, comp in repos.items():
        try:
            transfer.push(comp, join(target_url, path), rev=todo[path].id.hex())
        except BkError as e:
            raise _in_component(path, e) from None


# -- populate, unpopulate, attach, comps -------------------------------------------------------
@dataclass
class CompInfo:
    path: bytes
    populated: bool
    ahead: int


def listing(product: Repo) -> list[CompInfo]:
    comps = tip_components(product)
    out = []
    with opened(product, comps) as repos:
        for p in sorted(comps):
            n = ahead(repos[p], ObjectId(comps[p].id)) if p in repos else 0
            out.append(CompInfo(p, p in repos, n))
    return out


def populate(product: Repo, names: list[str], *, extra_source: str | None = None) -> list[bytes]:
    """Clone the named components into place from the product's sources (local first), each
    at the cset the product records."""
    from bkrepo.transfer import clone
    from bkrepo.transport import open_peer

    with product.locked("populate"):
        with product.store.read() as txn:
            tree = product.tip_tree(txn)
            comps = components(txn, tree)
            chosen = select(names, comps, aliases(txn, tree))
            current = here(txn)
            mode = product.config_value("checkout", txn)
        places = ([extra_source] if extra_source else []) + sources(product)
        done: list[bytes] = []
        for path in sorted(chosen):
            root = product.abspath(path)
            if is_repo(root):
                continue
            if root.exists() and any(root.iterdir()):
                raise PathError(f"populate: {os.fsdecode(path)}: the directory is not empty")
            key = ObjectId(comps[path].id)
            errors = []
            for place in places:
                loc = join(place, path)
                try:
                    peer = open_peer(loc, what="populate")
                    try:
                        if not peer.known([key]):
                            errors.append(f"{loc} lacks cset {key.hex()[:12]}")
                            continue
                    finally:
                        peer.close()
                    result = clone(loc, str(root), rev=key.hex(), checkout=mode)
                except BkError as e:
                    errors.append(str(e))
                    continue
                with Repo(result.path) as comp:
                    mark_component(comp, path)
                done.append(path)
                break
            else:
                why = "; ".join(errors) if errors else "the product has no sources (set a parent)"
                raise SyncError(f"populate: cannot find component {os.fsdecode(path)}: {why}")
        _set_here(product, current, add=names)
        return done


def unpopulate(product: Repo, names: list[str], *, force: bool = False) -> list[bytes]:
    """Remove components from this clone.  Refuses (changing nothing) when one has uncommitted
    changes or untracked files, csets not yet in the product, or csets no source has."""

    with product.locked("unpopulate"):
        with product.store.read() as txn:
            tree = product.tip_tree(txn)
            comps = components(txn, tree)
            chosen = select(names, comps, aliases(txn, tree))
            current = here(txn)
        places = sources(product)
        with opened(product, chosen) as repos:
            for path, comp in repos.items():
                nested_inside = [
                    c for c in comps if c.startswith(path + b"/") and is_repo(product.abspath(c))
                ]
                if any(c not in chosen for c in nested_inside):
                    raise UsageError(
                        f"unpopulate: {os.fsdecode(path)} holds the populated component "
                        f"{os.fsdecode(nested_inside[0])}; unpopulate it too"
                    )
                dirty = _scan(comp, None, True)
                if dirty and not force:
                    raise WouldLoseWork(
                        "unpopulate",
                        [f"{os.fsdecode(path)}/{os.fsdecode(c.path)}" for c in dirty],
                        "commit them (or remove them), or use -f",
                    )
                if ahead(comp, ObjectId(comps[path].id)):
                    raise WouldLoseWork(
                        "unpopulate",
                        [os.fsdecode(path)],
                        "it has csets not yet in the product; commit and push them first",
                    )
                key = ObjectId(comps[path].id)
                if not _somewhere(places, path, key):
                    raise WouldLoseWork(
                        "unpopulate",
                        [os.fsdecode(path)],
                        f"its cset {key.hex()[:12]} exists nowhere else; push first",
                    )
        removed = sorted(chosen & set(repos))
        for path in sorted(removed, key=len, reverse=True):
            shutil.rmtree(product.abspath(path))
        _set_here(product, current, remove=names, comps=comps)
        return removed


def _somewhere(places: list[str], path: bytes, key: ObjectId) -> bool:
    """Does any of the product's sources hold the component's cset ``key``?"""
    from bkrepo.transport import open_peer

    for place in places:
        try:
            peer = open_peer(join(place, path), what="unpopulate")
        except BkError:
            continue
        try:
            if peer.known([key]):
                return True
        except BkError:
            continue
        finally:
            peer.close()
    return False


def _set_here(
    product: Repo,
    current: list[str],
    *,
    add: list[str] | None = None,
    remove: list[str] | None = None,
    comps: dict[bytes, ob.TreeEntry] | None = None,
) -> None:
    """Record the new selection: names added; removed names, or (when ALL was selected) the
    remaining components by path."""
    new = list(current)
    for n in add or []:
        if n not in new:
            new.append(n)
    if remove:
        if any(n.upper() == ALL for n in new) and comps is not None:
            left = sorted(p for p in comps if is_repo(product.abspath(p)))
            new = [os.fsdecode(p) for p in left] or [PRODUCT]
        else:
            new = [n for n in new if n not in remove] or [PRODUCT]
    with product.store.write() as txn:
        txn.set_meta("here", json.dumps(new))


def attach(
    product: Repo,
    url: str,
    path_arg: str,
    message: str | None = None,
    *,
    when: tuple[str, int] | None = None,
) -> ObjectId:
    """Clone a repository into the product as a component at PATH and record it in a new
    product cset (``when``: its author and time, for partition)."""
    from bkrepo.transfer import clone
    from bkrepo.transport import open_peer

    rel = product.relpath(path_arg)
    if not rel:
        raise PathError("attach: a component cannot be the product's root")
    with product.locked("attach"):
        with product.store.read() as txn:
            tree = product.tip_tree(txn)
            comps = components(txn, tree)
            state = WorkState.load(product, txn)
        if rel in comps:
            raise PathError(f"attach: {path_arg} is already a component")
        outer = owner(comps, rel)
        if outer is not None:
            raise PathError(f"attach: {path_arg} is inside the component {os.fsdecode(outer)}")
        clash = [p for p in state.entries if p == rel or p.startswith(rel + b"/")]
        clash += [p for p in state.entries if rel.startswith(p + b"/")]
        if clash:
            raise PathError(
                f"attach: {path_arg} collides with the product's file {os.fsdecode(clash[0])}"
            )
        peer = open_peer(url, what="attach")
        try:
            info = peer.info()
        finally:
            peer.close()
        if info.product:
            raise UsageError(
                f"attach: {url} is a product; only a standalone repository can be attached"
            )
        if info.project_id == product.project_id:
            raise UsageError(f"attach: {url} is a clone of this product")
        with opened(product, comps) as repos:
            if any(r.project_id == info.project_id for r in repos.values()):
                raise UsageError(f"attach: {url} is already a component of this product")
        root = product.abspath(rel)
        with product.store.read() as txn:
            mode = product.config_value("checkout", txn)
        result = clone(url, str(root), checkout=mode)
        try:
            with Repo(result.path) as comp:
                mark_component(comp, rel)
                entry = entry_of(comp)
            if entry is None:
                raise UsageError(f"attach: {url} has no csets; commit something first")
            pending = pending_changes(product, [])
            return record(
                product,
                pending,
                message or f"attach {os.fsdecode(rel)}",
                {rel + b"/" + COMP: entry},
                when,
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
