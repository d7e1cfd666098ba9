"""Where BAM data must be, and moving it there: the BAM invariants (SPEC §2).

1. Every BAM delta in a repo's history has its data in the local pool or at its BAM server.
2. New data is created in the local pool; servers receive it only when csets leave the repo.
3. When csets move (clone, pull, push) their data is made present at the BAM servers of both
   ends before the move completes — or, for an end without a server (or that is its own
   server), in that end's pool.
4. Ends with the same server (same server repo id, whatever the URL) move no BAM data.

A repo names its BAM server in ``meta``: ``bam_server_url`` and ``bam_server_id``.  URL ``.``
means "this repository is a BAM server"; no URL means "no server: all data is local".

Where a repo looks for an object (the pool search order, SPEC §1): its pool, the user's
shared cache (chunks bkfs fetched; assembled and verified), the pools named in ``bam.pools``
(hardlinked or copied, always verified), then its BAM server.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lmdb

from bkrepo import objects as ob
from bkrepo.chunkcache import ChunkCache, cache_dir, chunk_key
from bkrepo.errors import BamError, ObjectCorrupt, ObjectMissing, RepoError
from bkrepo.ids import Oid
from bkrepo.repo import Repo
from bkrepo.store import Txn


@dataclass(frozen=True)
class ServerRef:
    url: str  # "." = this repository is the server
    id: str  # the server's repo id

    @property
    def is_self(self) -> bool:
        return self.url == "."


def get_server(txn: Txn) -> ServerRef | None:
    url = txn.meta("bam_server_url")
    if not url:
        return None
    return ServerRef(url, txn.meta("bam_server_id") or "")


def set_server(txn: Txn, ref: ServerRef | None) -> None:
    txn.set_meta("bam_server_url", ref.url if ref else None)
    txn.set_meta("bam_server_id", ref.id if ref else None)


def server_of(repo: Repo) -> ServerRef | None:
    with repo.store.read() as txn:
        return get_server(txn)


def effective_id(repo: Repo, ref: ServerRef | None) -> str | None:
    """The repo id of the server that holds this repo's data (itself when URL is '.')."""
    if ref is None:
        return None
    return repo.repo_id if ref.is_self else ref.id


def normalize_url(url: str, base: Path | None = None) -> str:
    """Server URLs are stored absolute: HTTP URLs as given, local paths made absolute."""
    from bkrepo.transport import is_url

    if url == "." or is_url(url):
        return url.rstrip("/") if url != "." else url
    path = Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return os.path.normpath(path)


def open_server(repo: Repo, ref: ServerRef, what: str):  # type: ignore[no-untyped-def]
    """The peer for this repo's server, after checking it is still the same repository."""
    from bkrepo.transport import open_peer

    try:
        peer = open_peer(ref.url, what=what)
        info = peer.info()
    except RepoError as e:
        raise BamError(f"{what}: BAM server {ref.url} is unavailable: {e}") from e
    if ref.id and info.repo_id != ref.id:
        peer.close()
        raise BamError(
            f"{what}: {ref.url} is no longer this repository's BAM server (it answers as repo "
            f"{info.repo_id[:12]}…, expected {ref.id[:12]}…); "
            "set the right one with 'bkr bam server URL'"
        )
    return peer


def missing_locally(repo: Repo, oids: Iterable[Oid]) -> set[Oid]:
    return {o for o in oids if not repo.pool.has(o)}


def fill_from_pools(repo: Repo, oids: set[Oid]) -> set[Oid]:
    """Bring what the ``bam.pools`` hold (hardlink, or verified copy); return what is still
    missing.  A corrupt copy in one pool is skipped in favour of the next source."""
    left = set(oids)
    for pool in repo.bam_pools():
        if not left:
            break
        for oid in sorted(left):
            if pool.has(oid):
                try:
                    repo.pool.copy_from(pool, oid, hardlink=True)
                    left.discard(oid)
                except ObjectCorrupt:
                    continue
    return left


class _CachedObject(io.RawIOBase):
    """An object's bytes read chunk by chunk from the shared cache (verified by the reader)."""

    def __init__(self, cache: ChunkCache, oid: Oid, size: int, chunk_size: int) -> None:
        self.cache, self.oid, self.size, self.chunk_size = cache, oid, size, chunk_size
        self.pos = 0
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        if not self.buf and self.pos < self.size:
            n = min(self.chunk_size, self.size - self.pos)
            chunk = self.cache.get(chunk_key(self.oid, self.pos, n))
            if chunk is None or len(chunk) != n:
                raise ObjectMissing(f"BAM object {self.oid.hex()} left the shared cache")
            self.buf, self.pos = chunk, self.pos + n
        k = min(len(b), len(self.buf))
        b[:k] = self.buf[:k]
        self.buf = self.buf[k:]
        return k


def _cached_whole(cache: ChunkCache, oid: Oid, size: int) -> int | None:
    """The chunk size in which the cache holds every chunk of an object, if any.  Mounts
    cache chunks of the size history recorded for the file, which depends on when it was
    recorded, and the same content may have been recorded more than once."""
    for chunk_size in ob.CHUNK_SIZES:
        keys = [
            chunk_key(oid, off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)
        ]
        if len(cache.present(keys)) == len(keys):
            return chunk_size
    return None


def fill_from_cache(repo: Repo, oids: set[Oid]) -> set[Oid]:
    """Bring objects the user's shared cache (the one bkfs mounts fill) holds whole: read
    chunk by chunk, verified and installed like any transfer.  Returns what is still missing.
    The cache only holds copies of data a server has, so this never makes a last copy."""
    root = cache_dir()
    if not oids or not (root / "chunks" / "data.mdb").exists():
        return oids
    with repo.store.read() as txn:
        sizes = repo.bam_sizes(txn, oids)
    try:
        cache = ChunkCache(root)
    except (lmdb.Error, OSError):
        return oids  # an unreadable cache is only a missed shortcut
    left = set()
    try:
        for oid in sorted(oids):
            size = sizes.get(oid)
            chunk_size = None if size is None else _cached_whole(cache, oid, size)
            if size is None or chunk_size is None:
                left.add(oid)
                continue
            try:
                stream = io.BufferedReader(_CachedObject(cache, oid, size, chunk_size), 1 << 20)
                repo.pool.receive(oid, stream, where="the shared cache")
            except (ObjectCorrupt, ObjectMissing, lmdb.Error):
                left.add(oid)
    finally:
        cache.close()
    return left


def ensure_local(
    repo: Repo, oids: Iterable[Oid], what: str, *, paths: dict[Oid, str] | None = None
) -> None:
    """Make objects present in the local pool, in the pool search order (SPEC §1): the shared
    cache, then pools on disk, then the BAM server."""
    left = fill_from_pools(repo, fill_from_cache(repo, missing_locally(repo, oids)))
    if not left:
        return
    ref = server_of(repo)
    if ref is None or ref.is_self:
        first = sorted(left)[0]
        name = (paths or {}).get(first) or first.hex()
        where = "it is its own BAM server" if ref is not None else "it has no BAM server"
        raise ObjectMissing(
            f"{what}: BAM data for {name} is not in this repository's pool and {where}"
            + (f" ({len(left)} objects missing)" if len(left) > 1 else "")
            + "; run 'bkr bam check'"
        )
    peer = open_server(repo, ref, what)
    try:
        peer.bam_fetch(left, repo.pool)
    except BamError as e:  # missing or corrupt at the server: say which file needs it
        name = (paths or {}).get(e.oid) if e.oid is not None else None
        if name is None:
            raise
        raise type(e)(f"{what}: {name}: {e.message.removeprefix(what + ': ')}", e.oid) from None
    finally:
        peer.close()


def push_to_server(
    repo: Repo, oids: Iterable[Oid], what: str, *, skip_id: str | None = None
) -> int:
    """Make objects present at this repo's server (invariant 3, sending side).  Nothing to do
    without a server, when the repo is its own server, or when the other end *is* the server
    (``skip_id``).  Returns the number of objects uploaded."""
    ref = server_of(repo)
    if ref is None or ref.is_self or (skip_id is not None and ref.id == skip_id):
        return 0
    wanted = set(oids)
    if not wanted:
        return 0
    peer = open_server(repo, ref, what)
    try:
        missing = peer.bam_missing(wanted)
        absent = missing_locally(repo, missing)
        if absent:
            raise ObjectMissing(
                f"{what}: {len(absent)} BAM object(s) are neither in the local pool nor at the "
                f"BAM server {ref.url}; run 'bkr bam check'"
            )
        if missing:
            peer.bam_push(missing, repo.pool)
        return len(missing)
    finally:
        peer.close()


def ensure_at_home(repo: Repo, oids: set[Oid], what: str) -> None:
    """Refuse incoming csets whose BAM data is neither in the pool nor at this repo's server."""
    ref = server_of(repo)
    left = set(oids)
    if ref is not None and not ref.is_self and left:
        peer = open_server(repo, ref, what)
        try:
            left = peer.bam_missing(left)
        finally:
            peer.close()
    if left:
        raise ObjectMissing(
            f"{what}: {len(left)} BAM object(s) of the incoming csets did not arrive"
        )
