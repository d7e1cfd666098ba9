"""Moving BAM objects over HTTP: parallel, resumable, verified (httpx on trio).

Downloads stream into a temp file in the pool while hashing (in a worker thread, 4 MiB at a
time), resume with ``Range`` after a dropped connection, retry with backoff, and install the
object only if its SHA-256 matches.  Uploads stream from the pool and retry; the server
verifies before it stores.  Every request has a timeout, so nothing hangs.

Entry points are synchronous (:func:`download`, :func:`upload`) and run their own trio loop:
the engine calls them between LMDB transactions, never inside one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import trio

from bkrepo import progress
from bkrepo.errors import (
    AccessDenied,
    BkError,
    ObjectCorrupt,
    ObjectMissing,
    ServerUnavailable,
    SyncError,
)
from bkrepo.ids import Oid
from bkrepo.pool import Pool
from bkrepo.transport.credentials import auth_headers

PARALLEL = 8
RETRIES = 5
BLOCK = 4 << 20
TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=120.0)


class _Retry(Exception):
    pass


def client(base: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=PARALLEL, max_keepalive_connections=PARALLEL)
    return httpx.AsyncClient(
        headers=auth_headers(base), timeout=TIMEOUT, limits=limits, follow_redirects=True
    )


def _check(r: httpx.Response, what: str, url: str) -> None:
    if r.status_code in (401, 403):
        raise AccessDenied(
            f"{what}: {url} refused access ({r.status_code}); set BKR_TOKEN or a credentials entry"
        )
    if r.status_code >= 500 or r.status_code == 429:
        raise _Retry(f"server answered {r.status_code}")


async def _gather(jobs: list, what: str) -> None:  # type: ignore[type-arg]
    """Run jobs with bounded parallelism; re-raise the first failure as itself (not a group)."""
    errors: list[BaseException] = []
    limiter = trio.CapacityLimiter(PARALLEL)

    async def run(job) -> None:  # type: ignore[no-untyped-def]
        async with limiter:
            if errors:
                return
            try:
                await job()
            except BkError as e:
                errors.append(e)

    async with trio.open_nursery() as n:
        for job in jobs:
            n.start_soon(run, job)
    if errors:
        raise errors[0]


# -- downloads ---------------------------------------------------------------------------------
def download(
    base: str, oids: Iterable[Oid], pool: Pool, *, what: str, sizes: dict[Oid, int] | None = None
) -> None:
    """Fetch objects from ``base``/bam/<oid> into ``pool`` (a no-op for ones it has)."""
    todo = sorted(o for o in set(oids) if not pool.has(o))
    if not todo:
        return
    total = sum((sizes or {}).get(o, 0) for o in todo)
    trio.run(_download_all, base, todo, pool, what, total)


async def _download_all(base: str, oids: list[Oid], pool: Pool, what: str, total: int) -> None:
    with progress.bar(f"fetching {len(oids)} BAM objects", total) as bar:
        async with client(base) as c:
            await _gather(
                [lambda o=o: _download_one(c, base, o, pool, what, bar) for o in oids], what
            )


async def _download_one(
    c: httpx.AsyncClient, base: str, oid: Oid, pool: Pool, what: str, bar
) -> None:  # type: ignore[no-untyped-def]
    url = f"{base}/bam/{oid.hex()}"
    fd, tmp = pool.new_temp()
    sha = hashlib.sha256()
    got = 0
    tries = 0

    def write(data: bytes) -> None:
        sha.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    try:
        while True:
            try:
                headers = {"Range": f"bytes={got}-"} if got else {}
                async with c.stream("GET", url, headers=headers) as r:
                    if r.status_code == 404:
                        raise ObjectMissing(f"{what}: BAM object {oid.hex()} is not on {base}")
                    _check(r, what, url)
                    if r.status_code == 200 and got:
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        sha = hashlib.sha256()
                        got = 0
                    elif r.status_code not in (200, 206):
                        raise SyncError(f"{what}: {url} answered {r.status_code}")
                    buf = bytearray()
                    async for chunk in r.aiter_raw():
                        buf += chunk
                        if len(buf) >= BLOCK:
                            data = bytes(buf)
                            buf.clear()
                            await trio.to_thread.run_sync(write, data)
                            got += len(data)
                            bar.advance(len(data))
                    if buf:
                        await trio.to_thread.run_sync(write, bytes(buf))
                        got += len(buf)
                        bar.advance(len(buf))
                break
            except (httpx.TransportError, _Retry) as e:
                tries += 1
                if tries > RETRIES:
                    raise ServerUnavailable(
                        f"{what}: fetching BAM object {oid.hex()[:16]}… from {base} failed after "
                        f"{RETRIES} retries ({e or type(e).__name__})"
                    ) from None
                await trio.sleep(min(0.25 * 2**tries, 5.0))
        if sha.digest() != oid:
            raise ObjectCorrupt(
                f"{what}: BAM object {oid.hex()} from {base} is corrupt (its bytes hash to "
                f"{sha.hexdigest()[:16]}…); it was not installed"
            )
        await trio.to_thread.run_sync(os.fsync, fd)
        os.close(fd)
        fd = -1
        await trio.to_thread.run_sync(pool.install, tmp, oid)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


# -- uploads -----------------------------------------------------------------------------------
def upload(base: str, oids: Iterable[Oid], pool: Pool, *, what: str) -> None:
    """Send objects from ``pool`` to ``base``/bam/<oid>; the server verifies each."""
    todo = sorted(set(oids))
    if not todo:
        return
    total = sum(pool.size_of(o) or 0 for o in todo)
    trio.run(_upload_all, base, todo, pool, what, total)


async def _upload_all(base: str, oids: list[Oid], pool: Pool, what: str, total: int) -> None:
    with progress.bar(f"sending {len(oids)} BAM objects", total) as bar:
        async with client(base) as c:
            await _gather(
                [lambda o=o: _upload_one(c, base, o, pool, what, bar) for o in oids], what
            )


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    f = await trio.to_thread.run_sync(open, path, "rb")
    try:
        while True:
            chunk = await trio.to_thread.run_sync(f.read, BLOCK)
            if not chunk:
                return
            yield chunk
    finally:
        f.close()


async def _upload_one(
    c: httpx.AsyncClient, base: str, oid: Oid, pool: Pool, what: str, bar
) -> None:  # type: ignore[no-untyped-def]
    url = f"{base}/bam/{oid.hex()}"
    path = pool.path(oid)
    size = pool.size_of(oid)
    if size is None:
        raise ObjectMissing(f"{what}: BAM object {oid.hex()} is not in the local pool")
    tries = 0
    while True:
        try:
            r = await c.put(url, content=_file_chunks(path), headers={"Content-Length": str(size)})
            if r.status_code == 422:
                raise ObjectCorrupt(
                    f"{what}: the local copy of BAM object {oid.hex()} is corrupt (the server "
                    "rejected it); run 'bkr bam repair'"
                )
            _check(r, what, url)
            if r.status_code not in (200, 201):
                raise SyncError(f"{what}: {url} refused the upload ({r.status_code}): {_reason(r)}")
            bar.advance(size)
            return
        except (httpx.TransportError, _Retry) as e:
            tries += 1
            if tries > RETRIES:
                raise ServerUnavailable(
                    f"{what}: sending BAM object {oid.hex()[:16]}… to {base} failed after "
                    f"{RETRIES} retries ({e or type(e).__name__})"
                ) from None
            await trio.sleep(min(0.25 * 2**tries, 5.0))


def _reason(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error") or r.text)
    except ValueError:
        return r.text[:200]
