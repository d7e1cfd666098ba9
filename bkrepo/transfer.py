"""The commands that move csets: clone, pull, push, send and receive.

Each works over any :class:`~bkrepo.transport.Peer` and keeps the BAM invariants
(bamflow.py): before csets leave a repo, their BAM data goes to that repo's server; the
receiving end gets the data in its pool when it has no server (or is its own server), at its
server when that is another server, and not at all when both ends share one server — which
is what makes a clone of a 20 GB asset repo take seconds.  A bundle made by ``send``
carries all the data its csets use.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from bkrepo import bamflow, dag, nested, progress, trees
from bkrepo import config as cfg
from bkrepo import objects as ob
from bkrepo.bamflow import ServerRef
from bkrepo.bundle import BamRecord, Header, Record, read_stream, write_stream
from bkrepo.errors import (
    BamError,
    BkError,
    ObjectCorrupt,
    ObjectMissing,
    PullFirst,
    UsageError,
)
from bkrepo.ids import ObjectId, Oid
from bkrepo.repo import Repo
from bkrepo.sync import (
    Outcome,
    Staged,
    bam_oids_for,
    check_same_project,
    discard,
    fetch_records,
    history_of,
    integrate,
    stage,
)
from bkrepo.transport import Peer, PeerInfo, is_url, open_peer
from bkrepo.worktree import WorkState, checkout_all


# -- where incoming BAM data must go -----------------------------------------------------------
def incoming_bam(
    repo: Repo, peer: Peer, info: PeerInfo, what: str, *, hardlink: bool = True
) -> Callable[[set[Oid]], None]:
    """The ``ensure_bam`` step for csets arriving from ``peer`` (invariant 3, receiving side)."""
    ref = bamflow.server_of(repo)
    mine = bamflow.effective_id(repo, ref)

    def to_pool(oids: set[Oid]) -> None:
        peer.bam_fetch(oids, repo.pool, hardlink=hardlink)

    if ref is None or ref.is_self:
        return to_pool
    if mine in (info.server_id(), info.repo_id):
        return lambda oids: None  # same server (or the peer is our server): nothing moves

    def to_server(oids: set[Oid]) -> None:
        server = bamflow.open_server(repo, ref, what)
        try:
            lacking = server.bam_missing(oids)
            if lacking:
                peer.bam_fetch(lacking, repo.pool)
                server.bam_push(lacking, repo.pool)
        finally:
            server.close()

    return to_server


# -- clone -------------------------------------------------------------------------------------
def default_dest(src: str) -> str:
    name = src.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"clone: cannot name a destination after {src!r}; give one")
    return name


@dataclass
class CloneResult:
    path: Path
    warnings: list[str] = field(default_factory=list)


def _server_for_clone(src: str, peer: Peer, info: PeerInfo, bam: str | None) -> ServerRef | None:
    """The destination's BAM server: ``-B`` (verified now, before anything is created), else
    the source's (``.`` becomes the URL the source was cloned from)."""
    if bam is not None:
        if bam.lower() == "none":
            return None
        if bam == ".":
            return ServerRef(".", "")
        url = bamflow.normalize_url(bam)
        try:
            server = open_peer(url, what="clone")
            sid = server.info().repo_id
            server.close()
        except BkError as e:
            raise BamError(f"clone: cannot use {bam} as BAM server: {e}") from None
        return ServerRef(url, sid)
    if info.bam_server is None:
        return None
    if info.bam_server.is_self:
        return ServerRef(src if is_url(src) else peer.url, info.repo_id)
    return info.bam_server


def clone(
    src: str,
    dest: str | None = None,
    *,
    rev: str | None = None,
    checkout: str = "get",
    hardlink: bool = True,
    bam: str | None = None,
    base: str | None = None,
    select: list[str] | None = None,
) -> CloneResult:
    """Clone ``src`` into ``dest``.  Built in a hidden sibling directory and renamed into
    place at the end, so a failed or interrupted clone leaves no half repository behind.

    ``base``: a local repository of the same project to take history and BAM data from, so
    that only what it lacks crosses the network (``clone -@ BASE``); the result is the same
    as without it.

    A product is cloned with the components ``select`` names (default: all), each at the
    cset the product records (nested.py)."""
    target = Path(dest if dest is not None else default_dest(src)).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"clone: destination {target} exists and is not empty")
    peer = open_peer(src, what="clone")
    result = CloneResult(target)
    base_repo: Repo | None = None
    try:
        info = peer.info()
        if select and not info.product:
            raise UsageError(f"clone: -s needs a product; {src} is a standalone repository")
        want = peer.resolve(rev) if rev else info.tip
        if base is not None:
            base_repo = _open_baseline(base, info)
        ref = _server_for_clone(src, peer, info, bam)
        made = _make_dirs(target.parent)
        _remove_stale_clone_dirs(target)
        tmp = target.parent / f".{target.name}.bkclone-{os.getpid()}"
        try:
            config = {k: info.config[k] for k in cfg.COPIED_ON_CLONE if k in info.config}
            config["checkout"] = checkout
            repo = Repo.init(tmp, project_id=info.project_id, config=config)
            with repo, repo.locked("clone"):
                with repo.store.write() as txn:
                    txn.set_meta("parent", src if is_url(src) else peer.url)
                    bamflow.set_server(txn, ref)
                    if info.product:
                        nested.mark_product(txn)
                        if info.partition is not None:
                            txn.set_meta("partition", json.dumps(info.partition))
                ensure = incoming_bam(repo, peer, info, "clone", hardlink=hardlink)
                if base_repo is None:
                    records = peer.fetch(want, [], [], receiver=repo.repo_id)
                    staged = stage(repo, records, source=src)
                else:
                    staged = _stage_with_baseline(repo, peer, base_repo, want, src)
                    ensure = _baseline_first(repo, base_repo, ensure, hardlink)
                integrate(
                    repo, staged, what="clone", source=src, update_tree=False, ensure_bam=ensure
                )
                if bam is None and ref is not None and not ref.is_self:
                    warning = _check_inherited_server(repo, ref)
                    if warning:
                        result.warnings.append(warning)
                if checkout == "get":
                    checkout_tip(repo, base_repo, hardlink)
                if info.product:
                    nested.clone_components(
                        repo,
                        src if is_url(src) else peer.url,
                        select,
                        checkout=checkout,
                        hardlink=hardlink,
                        bam=bam,
                        base=base,
                    )
            if target.exists():
                target.rmdir()
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
    finally:
        peer.close()
        if base_repo is not None:
            base_repo.close()
    return result


# -- clone with a local baseline ---------------------------------------------------------------
def _open_baseline(base: str, info: PeerInfo) -> Repo:
    if is_url(base):
        raise UsageError(f"clone: the baseline {base} must be a repository on local disk")
    repo = Repo.open(base)
    if repo.project_id != info.project_id:
        repo.close()
        raise UsageError(f"clone: baseline {base} is a different project than {info.url}")
    return repo


def _stage_with_baseline(
    repo: Repo, peer: Peer, base: Repo, want: ObjectId | None, src: str
) -> Staged:
    """Stage what a plain clone of ``src`` would get, taking from ``base`` every cset the
    source also has, and from the source only the rest (and its tags).

    Local-only csets and tags of the baseline are not taken; csets the baseline shares with
    the source but that the wanted tip does not reach are staged and then not recorded."""
    with base.store.read() as txn:
        base_tip = base.tip(txn)
        graph = base.graph(txn)
    if base_tip is None:
        common: list[ObjectId] = []
    elif peer.known([base_tip]):
        common = [base_tip]
    else:
        shared = peer.known(list(graph))
        common = dag.heads(graph, dag.ancestors(graph, shared))
    local = stage(repo, history_of(base, common), source=str(base.root))
    try:
        remote = stage(repo, peer.fetch(want, common, [], receiver=repo.repo_id), source=src)
    except BaseException:
        discard(repo, local)
        raise
    remote.csets = local.csets + remote.csets
    remote.inserted = local.inserted + remote.inserted
    return remote


def _baseline_first(
    repo: Repo, base: Repo, then: Callable[[set[Oid]], None], hardlink: bool
) -> Callable[[set[Oid]], None]:
    """BAM data from the baseline's pool first (hardlinked when possible, always verified)."""

    def ensure(oids: set[Oid]) -> None:
        left = set()
        for oid in oids:
            if base.pool.has(oid):
                try:
                    repo.pool.copy_from(base.pool, oid, hardlink=hardlink)
                    continue
                except ObjectCorrupt:
                    pass
            left.add(oid)
        if left:
            then(left)

    return ensure


def _check_inherited_server(repo: Repo, ref: ServerRef) -> str | None:
    """After a clone, the inherited BAM server must answer with the expected id from here;
    if not, it is cleared (as BitKeeper does) and the user told how to set one."""
    try:
        server = open_peer(ref.url, what="clone")
        sid = server.info().repo_id
        server.close()
        if not ref.id or sid == ref.id:
            return None
        why = f"answers as a different repository ({sid[:12]}…)"
    except BkError as e:
        why = f"is not reachable from here ({e})"
    with repo.store.write() as txn:
        bamflow.set_server(txn, None)
    return (
        f"the source's BAM server {ref.url} {why}; this clone now has no BAM server. Set a "
        "valid one with 'bkr bam server URL' (until then, BAM data not in this clone cannot be "
        "fetched)"
    )


def checkout_tip(repo: Repo, base: Repo | None = None, hardlink: bool = True) -> None:
    with repo.store.read() as txn:
        tree = repo.tip_tree(txn)
        oids = (
            {
                txn.pointer(e.id).oid: os.fsdecode(p)
                for p, e in trees.walk(txn, tree)
                if e.kind == ob.K_BAM
            }
            if tree
            else {}
        )
    if base is not None:
        _baseline_first(repo, base, lambda left: None, hardlink)(
            bamflow.missing_locally(repo, oids)
        )
    bamflow.ensure_local(repo, oids, "clone", paths=oids)
    with repo.store.read() as txn:
        state = WorkState.load(repo, txn)
        state.entries.clear()
        checkout_all(repo, txn, repo.tip_tree(txn), state)
    with repo.store.write() as txn:
        state.save(txn, state.tree, full=True)


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p``; the directories it created, deepest first (a failed clone removes them)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_stale_clone_dirs(target: Path) -> None:
    """Temp dirs of clones that were killed (their pid is gone)."""
    prefix = f".{target.name}.bkclone-"
    for d in target.parent.glob(prefix + "*"):
        pid = d.name[len(prefix) :]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- pull and push -----------------------------------------------------------------------------
def resolve_url(repo: Repo, url: str | None, what: str) -> str:
    """The other end of a pull or push: ``url``, else the parent; never this repository."""
    if not url:
        with repo.store.read() as txn:
            url = txn.meta("parent")
    if not url:
        raise UsageError(f"{what}: no URL given and no parent set; give one, or 'bkr parent URL'")
    path = url.removeprefix("file://")
    if not is_url(url) and Path(path).expanduser().resolve() == repo.root:
        raise UsageError(f"{what}: {url} is this repository; give another one")
    return url


def stage_pull(repo: Repo, peer: Peer, source: str, rev: str | None) -> tuple[PeerInfo, Staged]:
    """The first half of a pull (caller holds the lock): check the peer is this project, ask
    for what leads to its tip (or ``rev``) beyond what we have, and stage it."""
    info = peer.info()
    check_same_project(repo, info.project_id, source)
    want = peer.resolve(rev) if rev else info.tip
    with repo.store.read() as txn:
        tip = repo.tip(txn)
        have = [tip] if tip is not None else []
        if tip is not None and not peer.known([tip]):
            have = list(repo.graph(txn))
        have_tags = txn.tag_ids()
    records = peer.fetch(want, have, have_tags, receiver=repo.repo_id)
    return info, stage(repo, records, source=source)


def pull(
    repo: Repo, url: str | None = None, *, rev: str | None = None, resolve: str | None = None
) -> Outcome:
    source = resolve_url(repo, url, "pull")
    peer = open_peer(source, what="pull")
    try:
        with repo.locked("pull"):
            info, staged = stage_pull(repo, peer, source, rev)
            return integrate(
                repo,
                staged,
                what="pull",
                source=peer.url,
                resolve=resolve,
                ensure_bam=incoming_bam(repo, peer, info, "pull"),
            )
    finally:
        peer.close()


def push(repo: Repo, url: str | None = None, *, rev: str | None = None) -> Outcome:
    """Push history up to ``rev`` (default: the tip) to the target."""
    target = resolve_url(repo, url, "push")
    peer = open_peer(target, what="push")
    try:
        with repo.locked("push"):
            info = peer.info()
            check_same_project(repo, info.project_id, target)
            with repo.store.read() as txn:
                tip = repo.resolve(txn, rev) if rev else repo.tip(txn)
                if info.tip is not None and not txn.has_cset(info.tip):
                    raise PullFirst(
                        f"push: {target} has csets this repository lacks; pull first, then push"
                    )
            records = fetch_records(repo, tip, [info.tip] if info.tip else [], peer.tag_ids())
            header = next(records)
            assert isinstance(header, Header)
            with repo.store.read() as txn:
                oids = bam_oids_for(repo, txn, [ObjectId(bytes.fromhex(k)) for k in header.csets])
            # Our server first (unless the target is our server), then the target's side.
            bamflow.push_to_server(repo, oids, "push", skip_id=info.repo_id)
            with progress.bar("sending BAM data with the csets") as bar:
                stream = chain([header], records, _outgoing_bam(repo, peer, info, oids, bar))
                return peer.push(stream)
    finally:
        peer.close()


def _outgoing_bam(
    repo: Repo, peer: Peer, info: PeerInfo, oids: set[Oid], bar: Any
) -> Iterator[Record]:
    """BAM data for a push target: records in the stream when the target keeps data in its
    pool (counted on ``bar``); an upload to the target's server when that is another server;
    nothing when both share one."""
    mine = bamflow.effective_id(repo, bamflow.server_of(repo))
    theirs = info.server_id()
    if not oids:
        return iter(())
    if info.bam_server is None or info.bam_server.is_self:
        # The target keeps the data itself (it may be our own server: then it must get it).
        needed = peer.bam_missing(oids)
        bamflow.ensure_local(repo, needed, "push")
        bar.grow(sum(repo.pool.size_of(o) or 0 for o in needed))
        return _bam_records(repo, sorted(needed), bar)
    if theirs in (mine, repo.repo_id):
        return iter(())  # one server for both ends (or we are the target's server)
    server = open_peer(info.bam_server.url, what="push")
    try:
        if server.info().repo_id != theirs:
            raise BamError(
                f"push: the target's BAM server {info.bam_server.url} answers as another repository"
            )
        lacking = server.bam_missing(oids)
        bamflow.ensure_local(repo, lacking, "push")
        server.bam_push(lacking, repo.pool)
    finally:
        server.close()
    return iter(())


def _bam_records(repo: Repo, oids: list[Oid], bar: Any) -> Iterator[Record]:
    for oid in oids:
        with open(repo.pool.path(oid), "rb") as f:
            yield BamRecord(oid, os.fstat(f.fileno()).st_size, progress.Metered(f, bar))  # type: ignore[arg-type]


# -- send and receive --------------------------------------------------------------------------
def send(repo: Repo, revs: str | None, out: str) -> int:
    """Write a bundle of csets (``REV``: history up to REV; ``A..B``: what B has beyond A)
    with all the BAM data they use.  Returns the number of csets."""
    with repo.store.read() as txn:
        have: list[ObjectId] = []
        if revs and ".." in revs:
            a, b = revs.split("..", 1)
            have = [repo.resolve(txn, a)]
            want = repo.resolve(txn, b or "+")
        else:
            want = repo.resolve(txn, revs or "+")
    records = fetch_records(repo, want, have, [])
    header = next(records)
    assert isinstance(header, Header)
    with repo.store.read() as txn:
        oids = bam_oids_for(repo, txn, [ObjectId(bytes.fromhex(k)) for k in header.csets])
    try:
        bamflow.ensure_local(repo, oids, "send")
    except ObjectMissing as e:
        raise ObjectMissing(f"send: a bundle must carry all its BAM data: {e}") from None
    total = sum(repo.pool.size_of(o) or 0 for o in oids)
    with progress.bar(f"writing {len(oids)} BAM objects", total) as bar:
        stream = chain([header], records, _bam_records(repo, sorted(oids), bar))
        if out == "-":
            write_stream(stream, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return len(header.csets)
        dest = Path(out)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                write_stream(stream, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return len(header.csets)


def receive(repo: Repo, src: str, *, resolve: str | None = None) -> Outcome:
    with repo.locked("receive"):
        if src == "-":
            staged = stage(repo, read_stream(sys.stdin.buffer), source="stdin", adopt=True)
        else:
            try:
                f = open(src, "rb")  # noqa: SIM115 - closed below, after staging
            except OSError as e:
                raise UsageError(f"receive: {src}: {e.strerror}") from None
            with f:
                staged = stage(repo, read_stream(f), source=src, adopt=True)
        return integrate(
            repo,
            staged,
            what="receive",
            source=src,
            resolve=resolve,
            ensure_bam=lambda oids: bamflow.ensure_at_home(
                repo, bamflow.fill_from_pools(repo, oids), "receive"
            ),
        )
