"""The commands that move csets: clone, pull, push, send and receive.

Each works over any :class:`~bkrepo.transport.Peer`.  BAM data follows the BAM invariants
(SPEC §2): a repository without a BAM server holds all the BAM data of its history, so clone
and pull bring the data of every incoming delta, push sends what the target lacks, and a
bundle made by ``send`` carries all the data its csets use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path

from bkrepo import config as cfg
from bkrepo.bundle import BamRecord, Header, Record, read_stream, write_stream
from bkrepo.errors import ObjectMissing, PullFirst, UsageError
from bkrepo.ids import ObjectId, Oid
from bkrepo.repo import Repo
from bkrepo.sync import (
    Outcome,
    bam_oids_for,
    check_same_project,
    fetch_records,
    integrate,
    stage,
)
from bkrepo.transport import is_url, open_peer
from bkrepo.worktree import WorkState, checkout_all


# -- clone -------------------------------------------------------------------------------------
def default_dest(src: str) -> str:
    name = src.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"clone: cannot name a destination after {src!r}; give one")
    return name


def clone(
    src: str,
    dest: str | None = None,
    *,
    rev: str | None = None,
    checkout: str = "get",
    hardlink: bool = True,
) -> Path:
    """Clone ``src`` into ``dest``.  Built in a hidden sibling directory and renamed into
    place at the end, so a failed or interrupted clone leaves no half repository behind."""
    target = Path(dest if dest is not None else default_dest(src)).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"clone: destination {target} exists and is not empty")
    peer = open_peer(src, what="clone")
    try:
        info = peer.info()
        want = peer.resolve(rev) if rev else info.tip
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_clone_dirs(target)
        tmp = target.parent / f".{target.name}.bkclone-{os.getpid()}"
        try:
            config = {k: info.config[k] for k in cfg.COPIED_ON_CLONE if k in info.config}
            config["checkout"] = checkout
            repo = Repo.init(tmp, project_id=info.project_id, config=config)
            with repo, repo.locked("clone"):
                with repo.store.write() as txn:
                    txn.set_meta("parent", src if is_url(src) else peer.url)
                staged = stage(repo, peer.fetch(want, [], []), source=src)
                integrate(
                    repo,
                    staged,
                    what="clone",
                    source=src,
                    update_tree=False,
                    bam_fetch=lambda oids: peer.bam_fetch(oids, repo.pool, hardlink=hardlink),
                )
                if checkout == "get":
                    with repo.store.read() as txn:
                        state = WorkState.load(repo, txn)
                        state.entries.clear()
                        checkout_all(repo, txn, repo.tip_tree(txn), state)
                    with repo.store.write() as txn:
                        state.save(txn, state.tree, full=True)
            if target.exists():
                target.rmdir()
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        peer.close()
    return target


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
    if url:
        return url
    with repo.store.read() as txn:
        parent = txn.meta("parent")
    if not parent:
        raise UsageError(f"{what}: no URL given and no parent set; give one, or 'bkr parent URL'")
    return parent


def pull(
    repo: Repo, url: str | None = None, *, rev: str | None = None, resolve: str | None = None
) -> Outcome:
    source = resolve_url(repo, url, "pull")
    peer = open_peer(source, what="pull")
    try:
        with repo.locked("pull"):
            want = peer.resolve(rev) if rev else peer.info().tip
            with repo.store.read() as txn:
                tip = repo.tip(txn)
                have = [tip] if tip is not None else []
                if tip is not None and not peer.known([tip]):
                    have = list(repo.graph(txn))
                have_tags = txn.tag_ids()
            staged = stage(repo, peer.fetch(want, have, have_tags), source=source)
            return integrate(
                repo,
                staged,
                what="pull",
                source=peer.url,
                resolve=resolve,
                bam_fetch=lambda oids: peer.bam_fetch(oids, repo.pool),
            )
    finally:
        peer.close()


def push(repo: Repo, url: str | None = None) -> Outcome:
    target = resolve_url(repo, url, "push")
    peer = open_peer(target, what="push")
    try:
        with repo.locked("push"):
            info = peer.info()
            with repo.store.read() as txn:
                tip = repo.tip(txn)
                check_same_project(repo, info.project_id, target)
                if info.tip is not None and not txn.has_cset(info.tip):
                    raise PullFirst(
                        f"push: {target} has csets this repository lacks; pull first, then push"
                    )
            records = fetch_records(repo, tip, [info.tip] if info.tip else [], peer.tag_ids())
            return peer.push(_with_bam(repo, records, peer.bam_missing, what="push"))
    finally:
        peer.close()


def _with_bam(
    repo: Repo, records: Iterator[Record], missing: Callable[[set[Oid]], set[Oid]], *, what: str
) -> Iterator[Record]:
    """Append BAM data records for what the receiver lacks to a history stream."""
    header = next(records)
    assert isinstance(header, Header)
    with repo.store.read() as txn:
        oids = bam_oids_for(repo, txn, [ObjectId(bytes.fromhex(k)) for k in header.csets])
    needed = missing(oids) if oids else set()
    absent = [o for o in needed if not repo.pool.has(o)]
    if absent:
        raise ObjectMissing(
            f"{what}: {len(absent)} BAM object(s) of the outgoing csets are not in the local pool "
            f"(first: {absent[0].hex()[:16]}…); run 'bkr bam check'"
        )
    return chain([header], records, _bam_records(repo, sorted(needed)))


def _bam_records(repo: Repo, oids: list[Oid]) -> Iterator[Record]:
    for oid in oids:
        path = repo.pool.path(oid)
        with open(path, "rb") as f:
            yield BamRecord(oid, os.fstat(f.fileno()).st_size, f)


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
    stream = _with_bam(repo, records, lambda oids: oids, what="send")
    header = next(stream)
    assert isinstance(header, Header)
    count = len(header.csets)
    stream = chain([header], stream)
    if out == "-":
        write_stream(stream, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return count
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
    return count


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
        return integrate(repo, staged, what="receive", source=src, resolve=resolve)
