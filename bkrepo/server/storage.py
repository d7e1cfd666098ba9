"""Where ``bkr serve`` keeps BAM objects: the :class:`ObjectStore` interface, and the
filesystem back end (each repository's own pool under ROOT, the default).

The other back end, an S3-compatible object store shared by every repository and by every
server configured with the same bucket, is :mod:`bkrepo.server.s3store`.  The app
(:mod:`bkrepo.server.app`) only ever talks to an :class:`ObjectStore`, so both pass the same
tests.

Both back ends keep the content-addressed rules: an upload is streamed to a place nobody
reads (a temp file; an unfinished multipart upload) while it is hashed, and becomes visible
under its oid only once its SHA-256 matches; a mismatch leaves nothing behind.  Memory stays
bounded whatever the object sizes: sends hold one block per response, uploads one block (or a
few parts) per request.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from bkrepo.bundle import BamRecord
from bkrepo.ids import Oid
from bkrepo.pool import Pool
from bkrepo.server.asgi import HTTPError, Send

if TYPE_CHECKING:
    from bkrepo.repo import Repo

SEND_BLOCK = 1 << 20  # bytes per read and per body message (1 MiB sends are fastest)
OPEN_FILES = 64  # pool files the filesystem back end keeps open between requests (all repos)
RECV_BLOCK = 4 << 20  # upload bytes hashed and written per thread hop (a multiple of 4 KiB)


class UploadMismatch(HTTPError):
    """The uploaded bytes do not hash to the oid they were sent for (nothing was stored)."""

    def __init__(self, oid: Oid, got: str) -> None:
        super().__init__(422, f"upload does not match {oid.hex()}: its bytes hash to {got}")


class StoreUnavailable(HTTPError):
    """The object store failed or cannot be reached (clients retry 5xx answers)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


class ObjectReader(Protocol):
    """One stored object, opened for sending."""

    size: int

    async def send(self, send: Send, start: int, end: int) -> None:
        """Bytes [start, end) as ASGI body messages (the last one without ``more_body``)."""
        ...

    async def aclose(self) -> None: ...


class ObjectStore(Protocol):
    """The BAM objects that requests for one repository see."""

    describe: str
    shared: bool  # True: one store for every repository (not the repository's own pool)

    async def sizes(self, oids: list[Oid]) -> dict[Oid, int | None]:
        """Each object's size, None for the ones not stored."""
        ...

    async def open(self, oid: Oid) -> ObjectReader | None:
        """The object, or None when it is not stored."""
        ...

    async def put(self, oid: Oid, body: AsyncIterator[bytes], length: int | None) -> bool:
        """Store an upload once its bytes hash to ``oid`` (else raise :class:`UploadMismatch`,
        storing nothing).  False when the object was there already."""
        ...

    def records(self, oids: list[Oid], limit: int) -> Iterator[BamRecord]:
        """B records of the stored objects of at most ``limit`` bytes, in the order asked.
        Blocking: runs in a worker thread."""
        ...

    def download_url(self, oid: Oid) -> str | None:
        """A URL clients may fetch the object from directly (presigned), or None."""
        ...


class Storage(Protocol):
    """The back end as a whole: the store each repository's requests use."""

    describe: str
    store_id: str | None  # the repo id a shared store answers with as a BAM server

    def for_repo(self, repo: Repo | None) -> ObjectStore: ...

    def close(self) -> None: ...


# -- the filesystem back end -------------------------------------------------------------------
class FilesystemStorage:
    """Each repository's objects are its own pool (``.bk/bam`` under ROOT)."""

    describe = "filesystem"
    store_id = None

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter
        self.stores: dict[int, PoolStore] = {}
        self.files = _OpenFiles()  # shared by every repository's store: one bound on fds

    def for_repo(self, repo: Repo | None) -> ObjectStore:
        if repo is None:
            raise HTTPError(404, "no such repository")
        store = self.stores.get(id(repo))
        if store is None:
            store = self.stores[id(repo)] = PoolStore(repo.pool, self.limiter, self.files)
        return store

    def close(self) -> None:
        self.files.close()
        self.stores.clear()


class PoolStore:
    """A repository's pool as an :class:`ObjectStore`."""

    shared = False

    def __init__(self, pool: Pool, limiter: trio.CapacityLimiter, files: _OpenFiles) -> None:
        self.pool = pool
        self.limiter = limiter
        self.describe = str(pool.root)
        self.files = files

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def sizes(self, oids: list[Oid]) -> dict[Oid, int | None]:
        return await self._run(lambda: {o: self.pool.size_of(o) for o in oids})

    async def open(self, oid: Oid) -> ObjectReader | None:
        path = self.pool.path(oid)
        fd = self.files.reuse(path)
        if fd is None:
            try:
                opened = await self._run(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            fd = self.files.keep(path, opened)
        return _FileReader(fd, os.fstat(fd).st_size, self.limiter)

    async def put(self, oid: Oid, body: AsyncIterator[bytes], length: int | None) -> bool:
        if self.pool.has(oid):
            async for _ in body:
                pass
            return False
        fd, tmp = await self._run(self.pool.new_temp)
        try:
            writer = _DirectWriter(fd, self.limiter)
            try:
                await writer.receive(body)
            except BaseExceptionGroup as group:
                raise single_error(group) from None
            if writer.sha.digest() != oid:
                raise UploadMismatch(oid, writer.sha.hexdigest())
            await self._run(os.fsync, fd)
            os.close(fd)
            fd = -1
            await self._run(self.pool.install, tmp, oid)
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp.exists():
                tmp.unlink()
        return True

    def records(self, oids: list[Oid], limit: int) -> Iterator[BamRecord]:
        for oid in oids:
            try:
                f = open(self.pool.path(oid), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue
            with f:
                size = os.fstat(f.fileno()).st_size
                if size <= limit:
                    yield BamRecord(oid, size, f)

    def download_url(self, oid: Oid) -> str | None:
        return None


class _DirectWriter:
    """Writes an upload to its temp file in :data:`RECV_BLOCK` blocks, hashing each, while
    the next block is received: two page-aligned buffers take turns.  Whole blocks are
    written with ``O_DIRECT`` where the filesystem allows it: the bytes go to the disk without
    a page-cache copy, which costs this VM about half the CPU per byte and leaves the fsync
    before install nothing to wait for (the client's downloads do the same, bamclient.py).
    The last, partial block is written through the page cache."""

    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self.fd = fd
        self.limiter = limiter
        self.sha = hashlib.sha256()
        self.direct = _set_direct(fd, True)
        self.idle = trio.Semaphore(1)  # one block being written at a time, in order

    async def receive(self, body: AsyncIterator[bytes]) -> None:
        buffers = [mmap.mmap(-1, RECV_BLOCK), mmap.mmap(-1, RECV_BLOCK)]
        try:
            current = 0
            filled = 0
            async with trio.open_nursery() as nursery:
                async for chunk in body:
                    view = memoryview(chunk)
                    while view:
                        k = min(len(view), RECV_BLOCK - filled)
                        buffers[current][filled : filled + k] = view[:k]
                        filled += k
                        view = view[k:]
                        if filled == RECV_BLOCK:
                            await self.idle.acquire()  # the other buffer is free again
                            nursery.start_soon(self._write, buffers[current], RECV_BLOCK)
                            current, filled = 1 - current, 0
                await self.idle.acquire()
                self.idle.release()
            if filled:
                if self.direct:
                    _set_direct(self.fd, False)
                    self.direct = False
                await trio.to_thread.run_sync(
                    self._write_block, buffers[current], filled, limiter=self.limiter
                )
        finally:
            for b in buffers:
                b.close()

    async def _write(self, buf: mmap.mmap, n: int) -> None:
        try:
            await trio.to_thread.run_sync(self._write_block, buf, n, limiter=self.limiter)
        finally:
            self.idle.release()

    def _write_block(self, buf: mmap.mmap, n: int) -> None:
        view = memoryview(buf)[:n]
        self.sha.update(view)
        while view:
            try:
                k = os.write(self.fd, view)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                _set_direct(self.fd, False)  # this filesystem refuses: the page cache it is
                self.direct = False
                continue
            view = view[k:]


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for an open file; whether that worked."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return True


class _OpenFiles:
    """Pool files kept open between requests, most recently used first.

    A lazy mount reads an object as many Range requests, and a cold first read waits for the
    first of them: opening the file in a worker thread costs a thread hop (two wake-ups, up to
    milliseconds on an idle VM) per request.  A file already open is reused without one: its
    path is checked with a ``stat`` in the event loop, which cannot wait for the disk because
    the open file pins its directory entries and inode; a path that now names another file
    (an object removed and fetched again) is opened afresh.  Each reader gets its own
    duplicate descriptor, so an eviction never closes a file being sent."""

    def __init__(self, limit: int = OPEN_FILES) -> None:
        self.limit = limit
        self._open: OrderedDict[Path, tuple[int, int, int]] = OrderedDict()  # fd, dev, ino

    def reuse(self, path: Path) -> int | None:
        """A new descriptor of ``path`` if it is open and still names the same file, else
        None (event loop)."""
        held = self._open.get(path)
        if held is None:
            return None
        fd, dev, ino = held
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != (dev, ino):
            self._drop(path)
            return None
        self._open.move_to_end(path)
        return os.dup(fd)

    def keep(self, path: Path, fd: int) -> int:
        """Keep a file just opened (event loop) and return a descriptor of it for the
        caller."""
        try:
            st = os.fstat(fd)
            mine = os.dup(fd)
        except BaseException:
            os.close(fd)
            raise
        self._drop(path)
        self._open[path] = (fd, st.st_dev, st.st_ino)
        while len(self._open) > self.limit:
            self._drop(next(iter(self._open)))
        return mine

    def _drop(self, path: Path) -> None:
        held = self._open.pop(path, None)
        if held is not None:
            os.close(held[0])

    def close(self) -> None:
        while self._open:
            self._drop(next(iter(self._open)))


class _FileReader:
    """An open pool file.  Blocks already in the page cache are read in the event loop
    (``preadv2`` with ``RWF_NOWAIT``, which never waits for the disk), others in a thread:
    that saves a thread hop per MiB sent (docs/performance.md)."""

    def __init__(self, fd: int, size: int, limiter: trio.CapacityLimiter) -> None:
        self.fd = fd
        self.size = size
        self.limiter = limiter

    async def send(self, send: Send, start: int, end: int) -> None:
        pos = start
        while pos < end:
            n = min(SEND_BLOCK, end - pos)
            chunk = _read_cached(self.fd, n, pos)
            if chunk is None:
                chunk = await trio.to_thread.run_sync(
                    os.pread, self.fd, n, pos, limiter=self.limiter
                )
            if not chunk:
                break
            pos += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": pos < end})
        if pos < end:  # the file shrank under us: cut the response short rather than lie
            raise trio.BrokenResourceError("object file truncated while sending")

    async def aclose(self) -> None:
        os.close(self.fd)


_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
# What _read_cached reads into before copying out the bytes it sends: one buffer for the
# process, never a fresh one per answer (zeroing it cost as much as the copy, and after an
# idle moment every byte touched is a cache miss on this kind of VM).  Only the event loop
# uses it, and nothing awaits between the read and the copy.
_BUFFER = bytearray(SEND_BLOCK)


def _read_cached(fd: int, n: int, pos: int) -> bytes | None:
    """Up to ``n`` (at most SEND_BLOCK) bytes at ``pos`` if the page cache holds them (never
    waits for the disk), else None.  Run in the event loop: one memory copy of at most
    SEND_BLOCK."""
    global _NOWAIT
    if _NOWAIT is None:
        return None
    view = memoryview(_BUFFER)[:n]
    try:
        k = os.preadv(fd, [view], pos, _NOWAIT)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _NOWAIT = None  # this kernel or filesystem cannot: threads from now on
            return None
        raise
    return bytes(view[:k]) if k > 0 else None


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The failure a nursery's exception group stands for: its first leaf that is not a
    cancellation (the others were cancelled because of it), else the group itself."""
    for leaf in _leaves(group):
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return group


def _leaves(e: BaseException) -> Iterator[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            yield from _leaves(sub)
    else:
        yield e
