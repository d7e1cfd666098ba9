"""``bkr bam``: the BAM data tools — where data is, checking it, moving it, cleaning it.

Semantics follow BitKeeper's ``bk bam`` (see docs/bam.md): a server change copies to the new
server what it lacks; ``clean`` never deletes the only copy; ``check`` verifies hashes and
names the files whose data is missing or corrupt; ``repair`` restores from the server or other
sources; ``reattach`` takes candidate files and reinstates those whose hash matches.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bkrepo import bamflow, trees
from bkrepo import objects as ob
from bkrepo.bamflow import ServerRef
from bkrepo.errors import BamError, BkError, ObjectCorrupt, UsageError
from bkrepo.ids import Oid
from bkrepo.pool import hash_stream
from bkrepo.repo import Repo
from bkrepo.transport import Peer, open_peer


# -- where the data is -------------------------------------------------------------------------
@dataclass
class Usage:
    local_objects: int = 0
    local_bytes: int = 0
    missing_objects: int = 0
    missing_bytes: int = 0
    unreferenced_objects: int = 0
    unreferenced_bytes: int = 0
    shared_objects: int = 0  # local objects hardlinked with other pools (their space is shared)
    shared_bytes: int = 0


def du(repo: Repo) -> Usage:
    """Sizes of the BAM data history uses: held locally (and how much of that is hardlinked
    with other pools, costing no extra disk), and not held locally (which a BAM server must
    hold); plus pool objects no delta uses (left by undo or uncommitted work)."""
    with repo.store.read() as txn:
        refs = repo.bam_referenced(txn)
    u = Usage()
    for oid, size in refs.items():
        try:
            st = repo.pool.path(oid).stat()
        except FileNotFoundError:
            st = None
        if st is not None:
            u.local_objects += 1
            u.local_bytes += st.st_size
            if st.st_nlink > 1:
                u.shared_objects += 1
                u.shared_bytes += st.st_size
        else:
            u.missing_objects += 1
            u.missing_bytes += max(size, 0)
    for oid in repo.pool.oids():
        if oid not in refs:
            u.unreferenced_objects += 1
            u.unreferenced_bytes += repo.pool.size_of(oid) or 0
    return u


def paths_of(repo: Repo, oids: Iterable[Oid]) -> dict[Oid, str]:
    """A file name that uses each object (the path where a delta introduced it)."""
    wanted = set(oids)
    out: dict[Oid, str] = {}
    with repo.store.read() as txn:
        for oid in wanted:
            for value in txn.index_values("bamidx", oid):
                cset = txn.cset(value[:32])
                first = txn.cset(cset.parents[0]).tree if cset.parents else None
                for path, _old, new in trees.diff(txn, first, cset.tree):
                    if new is not None and new.kind == ob.K_BAM and txn.pointer(new.id).oid == oid:
                        out[oid] = os.fsdecode(path)
                        break
                if oid in out:
                    break
    return out


def _name(oid: Oid, names: dict[Oid, str]) -> str:
    return f"{names.get(oid, '?')} ({oid.hex()[:16]}…)"


# -- bam server --------------------------------------------------------------------------------
def describe_server(repo: Repo) -> str:
    ref = bamflow.server_of(repo)
    if ref is None:
        return "This repository has no BAM server."
    if ref.is_self:
        return "This repository is the BAM server."
    return f"BAM server: {ref.url} (repo id {ref.id})"


def _server_id(url: str, what: str) -> str:
    try:
        peer = open_peer(url, what=what)
        try:
            return peer.info().repo_id
        finally:
            peer.close()
    except BkError as e:
        raise BamError(f"{what}: unable to get the repo id of BAM server {url}: {e}") from None


def set_server(repo: Repo, url: str | None, *, force: bool = False, skip: bool = False) -> str:
    """Change the BAM server (``url`` None or 'none': no server; '.': this repo is one).

    Unless ``skip``, the data history needs goes where the new setting wants it first: to the
    new server (what it lacks), or into the local pool (for '.' or no server)."""
    with repo.locked("bam server"):
        old = bamflow.server_of(repo)
        new: ServerRef | None
        if url is None or url.lower() == "none":
            new = None
        elif url == ".":
            new = ServerRef(".", "")
        else:
            norm = bamflow.normalize_url(url)
            new = ServerRef(norm, _server_id(norm, "bam server"))
            if new.id == repo.repo_id:
                new = ServerRef(".", "")
        if old is not None and old.is_self and (new is None or not new.is_self) and not force:
            raise UsageError(
                "bam server: this repository is a BAM server; clients may rely on its data. "
                "Use -f to change it anyway"
            )
        moved = 0
        if not skip and new != old:
            with repo.store.read() as txn:
                refs = set(repo.bam_referenced(txn))
            if new is None or new.is_self:
                moved = len(bamflow.missing_locally(repo, refs))
                bamflow.ensure_local(repo, refs, "bam server")
            elif old is None or new.id != bamflow.effective_id(repo, old):
                moved = _copy_to_server(repo, new, refs)
        with repo.store.write() as txn:
            bamflow.set_server(txn, new)
        return f"{describe_server(repo)}" + (f" ({moved} object(s) copied)" if moved else "")


def _copy_to_server(repo: Repo, new: ServerRef, refs: set[Oid]) -> int:
    server = open_peer(new.url, what="bam server")
    try:
        lacking = server.bam_missing(refs)
        bamflow.ensure_local(repo, lacking, "bam server")
        server.bam_push(lacking, repo.pool)
        return len(lacking)
    finally:
        server.close()


# -- check and repair --------------------------------------------------------------------------
@dataclass
class CheckResult:
    total: int = 0
    local: int = 0
    remote: int = 0
    missing: list[Oid] = field(default_factory=list)
    corrupt: list[Oid] = field(default_factory=list)
    names: dict[Oid, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    def lines(self) -> list[str]:
        out = [f"corrupt: {_name(o, self.names)}" for o in sorted(self.corrupt)]
        out += [f"missing: {_name(o, self.names)}" for o in sorted(self.missing)]
        return out


def check(repo: Repo, *, fast: bool = False) -> CheckResult:
    """Every object history uses must be local and intact (hashed unless ``fast``) or at the
    BAM server."""
    with repo.store.read() as txn:
        refs = repo.bam_referenced(txn)
    r = CheckResult(total=len(refs))
    not_local: set[Oid] = set()
    for oid in sorted(refs):
        if not repo.pool.has(oid):
            not_local.add(oid)
        elif not fast and not repo.pool.verify(oid):
            r.corrupt.append(oid)
        else:
            r.local += 1
    ref = bamflow.server_of(repo)
    if not_local and ref is not None and not ref.is_self:
        server = bamflow.open_server(repo, ref, "bam check")
        try:
            at_server_missing = server.bam_missing(not_local)
        finally:
            server.close()
        r.remote = len(not_local) - len(at_server_missing)
        not_local = at_server_missing
    r.missing = sorted(not_local)
    if not r.ok:
        r.names = paths_of(repo, [*r.missing, *r.corrupt])
    return r


def repair(repo: Repo, sources: list[str]) -> tuple[int, int, CheckResult]:
    """Replace corrupt local objects and find missing ones, from the server then each
    ``--from`` source.  Returns (repaired, needing repair, the check before)."""
    with repo.locked("bam repair"):
        before = check(repo)
        broken = [*before.corrupt, *before.missing]
        if not broken:
            return 0, 0, before
        ref = bamflow.server_of(repo)
        if (ref is None or ref.is_self) and not sources:
            raise BamError("bam repair: no BAM sources; name one with --from URL")
        peers: list[Peer] = []
        if ref is not None and not ref.is_self:
            peers.append(bamflow.open_server(repo, ref, "bam repair"))
        for s in sources:
            peers.append(open_peer(s, what="bam repair"))
        # Corrupt copies go aside (never deleted: .bk/bam/bad/) so good ones can take their place.
        bad_dir = repo.pool.root / "bad"
        for oid in before.corrupt:
            bad_dir.mkdir(parents=True, exist_ok=True)
            os.replace(repo.pool.path(oid), bad_dir / oid.hex())
        left = set(broken)
        try:
            for peer in peers:
                have = left - peer.bam_missing(left)
                for oid in sorted(have):
                    try:
                        peer.bam_fetch({oid}, repo.pool)
                        left.discard(oid)
                    except ObjectCorrupt:
                        continue
        finally:
            for peer in peers:
                peer.close()
        return len(broken) - len(left), len(broken), before


# -- moving data -------------------------------------------------------------------------------
def pull(repo: Repo, url: str | None, *, everything: bool = False) -> int:
    """Fill the local pool.  Default: objects missing both here and at the server (from
    ``url``); ``-a``: every object missing here (from ``url``, else the server)."""
    with repo.locked("bam pull"):
        with repo.store.read() as txn:
            refs = set(repo.bam_referenced(txn))
        wanted = bamflow.missing_locally(repo, refs)
        ref = bamflow.server_of(repo)
        if not everything and ref is not None and not ref.is_self and wanted:
            server = bamflow.open_server(repo, ref, "bam pull")
            try:
                wanted = server.bam_missing(wanted)
            finally:
                server.close()
        if not wanted:
            return 0
        if url is None:
            if not everything or ref is None or ref.is_self:
                raise UsageError(
                    "bam pull: give a URL, or -a to fetch everything from the BAM server"
                )
            url = ref.url
        peer = open_peer(url, what="bam pull")
        try:
            peer.bam_fetch(wanted, repo.pool)
        finally:
            peer.close()
        return len(wanted)


def push(repo: Repo, url: str | None) -> int:
    """Send the local data of committed csets that the server (or ``url``) lacks."""
    with repo.store.read() as txn:
        refs = set(repo.bam_referenced(txn))
    local = refs - bamflow.missing_locally(repo, refs)
    if url is None:
        ref = bamflow.server_of(repo)
        if ref is None or ref.is_self:
            raise UsageError("bam push: this repository has no other BAM server; give a URL")
        peer: Peer = bamflow.open_server(repo, ref, "bam push")
    else:
        peer = open_peer(url, what="bam push")
    try:
        lacking = peer.bam_missing(local)
        peer.bam_push(lacking, repo.pool)
        return len(lacking)
    finally:
        peer.close()


def clean(
    repo: Repo, *, all_at_server: bool = False, dry_run: bool = False
) -> list[tuple[Oid, int]]:
    """Delete pool objects history does not use; with ``all_at_server`` also those the BAM
    server holds.  Never the only copy; never in a server."""
    with repo.locked("bam clean"):
        ref = bamflow.server_of(repo)
        if ref is not None and ref.is_self:
            raise BamError(
                "bam clean: will not run in a BAM server (clients may rely on any of its data)"
            )
        with repo.store.read() as txn:
            refs = set(repo.bam_referenced(txn))
        present = set(repo.pool.oids())
        doomed = present - refs
        if all_at_server and ref is not None:
            server = bamflow.open_server(repo, ref, "bam clean")
            try:
                held = present & refs
                doomed |= held - server.bam_missing(held)
            finally:
                server.close()
        out = [(o, repo.pool.size_of(o) or 0) for o in sorted(doomed)]
        if not dry_run:
            for oid, _ in out:
                repo.pool.remove(oid)
        return out


def reattach(repo: Repo, paths: Iterable[str]) -> tuple[list[str], int]:
    """Reinstate missing objects from candidate files whose content hashes to one of them.
    Returns (files reattached, objects still missing)."""
    with repo.locked("bam reattach"):
        result = check(repo, fast=True)
        missing = set(result.missing)
        done: list[str] = []
        for p in paths:
            path = Path(p)
            if not missing or not path.is_file():
                continue
            with open(path, "rb", buffering=0) as f:
                oid = hash_stream(f, chunks=False).oid
            if oid in missing:
                with open(path, "rb") as f:
                    repo.pool.receive(oid, f, where=str(path))
                missing.discard(oid)
                done.append(p)
        return done, len(missing)
