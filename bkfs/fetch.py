"""Getting verified BAM bytes: the pool chain, single-flight per chunk, Range requests with
deadlines, read-ahead, and the cache writer.

A BAM object is read in chunks (the chunk size history recorded: 256 KiB, or 1 MiB for
files recorded before 2026-12-07): the unit of verification, of caching and of sharing.
For each chunk a read needs, in order:

1. memory: chunks fetched moments ago (a small LRU) or waiting for the cache writer;
2. a fetch already in flight for it (single-flight: every reader of that chunk waits on it);
3. the repository's own pool → the shared LMDB cache → the pools of ``bam.pools`` (one worker
   thread reads and verifies them);
4. the BAM server: one ``Range`` request for a run of chunks of up to :data:`REQUEST_BYTES`,
   each chunk verified as soon as it has arrived, handed to its waiters, and queued for the
   cache writer.

Every chunk from any source is checked against the chunk-hash list recorded in history before
a byte of it is returned.  A sequential reader gets read-ahead: runs ahead of it are requested
in the background, at most :data:`MAX_AHEAD_BYTES` ahead.  Sizes are in bytes and turned
into chunks of each object's own size, so requests are as large whatever the chunk size.

Tasks, threads and locks (all tasks run on the one trio thread; no locks are needed for the
dictionaries below because nothing awaits between reading and changing them):

- ``_flights``: chunk key → :class:`Flight`.  Created by whoever first needs a chunk, resolved
  (bytes or error) by the task that found or fetched it, and removed when resolved.  Fetch
  tasks live in the daemon's nursery, not in the reader's request, so a reader that gives up
  at its deadline never cancels a fetch another reader waits for.
- ``_openings``: pointer id → (when, :class:`Opening`), oldest first: the object a lookup or
  an open started finding, shared by the opens of the next :data:`OPENING_TTL` seconds (at
  most :data:`OPENINGS_KEPT`; pruned whenever one is asked for).
- ``_http``: a CapacityLimiter of :data:`HTTP_PARALLEL` worker threads, each running one Range
  request on a kept-alive connection of a :class:`ConnectionPool` (the standard library's
  ``http.client``: each chunk is read from the socket straight into its own ``bytes``, about
  half the CPU per byte of httpx's client, which hands a body over in 64 KiB pieces) and
  verifying chunks as they complete; chunks come back to the loop with ``trio.from_thread``.
  A reader's deadline does not wait for a request to end: the thread is abandoned and
  finishes on its own timeouts.
- ``_disk``: a CapacityLimiter for reading and hashing in worker threads.
- The cache writer: one task; batches of inserts, touches (cache hits) and removals (damaged
  entries) go to LMDB in one write transaction per batch, in a worker thread, one at a time.
  A bounded channel gives back-pressure to fetches when the disk falls behind.
- Failures are remembered: a missing object or a corrupt chunk fails again at once for
  :data:`REMEMBER_FAILURE` seconds; a server that failed is not asked again for
  :data:`SERVER_BACKOFF` seconds, so a dead server costs each read milliseconds, not a timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import blake3
import lmdb
import trio

from bkfs.errors import BkfsError, ContentError, ObjectCorrupt, ObjectMissing, ServerUnavailable
from bkfs.source import Pointer, Source
from bkrepo.chunkcache import ChunkCache, chunk_key
from bkrepo.errors import BkError
from bkrepo.transport.bamclient import Connection

log = logging.getLogger("bkfs")

READ_DEADLINE = 20.0  # seconds a read waits for its chunks before it fails with EIO
CONNECT_TIMEOUT = 3.0
IO_TIMEOUT = 8.0  # no byte for this long: the request failed
RETRIES = 2  # retries of a failed request (after the first try), with a short backoff
SERVER_BACKOFF = 2.0  # after the server failed, reads fail at once for this long
REMEMBER_FAILURE = 30.0  # a missing object / corrupt chunk fails at once for this long
HTTP_PARALLEL = 8
REQUEST_BYTES = 8 << 20  # bytes per Range request at most
MAX_AHEAD_BYTES = 24 << 20  # read-ahead in front of a sequential reader at most
SEQ_SLACK = 2 << 20  # a read this close to where the last one ended is still sequential
RECENT_BYTES = 32 << 20  # verified chunks kept in memory (more than MAX_AHEAD_BYTES)
WRITE_QUEUE = 8  # groups of chunks (about HANDOFF_BYTES each) waiting for the cache writer
HANDOFF_BYTES = 1 << 20  # verified chunks go from a fetch thread to the loop in groups this big
WRITE_BATCH = 8 << 20  # bytes per cache write transaction at most
TOUCH_INTERVAL = 2.0  # seconds between flushes of cache-hit touches when nothing is written
PREFETCH_BYTES = 16 << 20  # bytes outstanding per prefetched object
OPENING_TTL = 5.0  # seconds an object found for one open (or a lookup) serves later opens
OPENINGS_KEPT = 64  # such objects remembered at most
AHEAD_LOADS = 2  # objects found at once on a lookup's hint, at most


T = TypeVar("T")
_NETWORK = (OSError, http.client.HTTPException, BkError)  # a request that failed on the way


class ConnectionPool:
    """Kept-alive HTTP/1.1 connections to the BAM servers for the fetch threads: one per
    request in flight (at most :data:`HTTP_PARALLEL`, the limiter's bound), reused newest
    first; a connection whose request failed is closed, not reused.  Redirects, proxies and
    per-origin credentials are :class:`bkrepo.transport.bamclient.Connection`'s; every socket
    operation times out after :data:`IO_TIMEOUT` seconds."""

    def __init__(self) -> None:
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = Connection(connect_timeout=CONNECT_TIMEOUT, io_timeout=IO_TIMEOUT)
            with self._lock:
                self._all.add(conn)
        ok = False
        try:
            yield conn
            ok = True
        finally:
            with self._lock:
                if ok and not self._closed:
                    self._idle.append(conn)
                else:
                    self._all.discard(conn)
            if not ok or self._closed:
                conn.close()

    def preconnect(self, url: str) -> None:
        """Open one connection to the server ahead of the first read (blocking; no request is
        sent).  A server that does not answer is noticed by the first read instead."""
        with self.connection() as conn, contextlib.suppress(*_NETWORK):
            conn.connect(url)

    def close(self) -> None:
        """Close the idle connections and make blocked requests fail now (any thread)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = self._all - set(idle)
        for conn in idle:
            conn.close()
        for conn in busy:
            conn.abort()


def verify(data: bytes, digest: bytes) -> bool:
    return blake3.blake3(data).digest() == digest


class Pending(Generic[T]):
    """A value some task is finding (a chunk's bytes, an opened object), or why it could not;
    everyone who needs it waits here.  Set once: later results are ignored."""

    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: T | None = None
        self.error: BkfsError | None = None

    def resolve(self, value: T) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BkfsError) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    def peek(self) -> T | None:
        """The value if it is there already, else None.  No checkpoint: a read of a file
        whose object was found long ago does not go through the scheduler for it (0.2-0.35 ms
        after an idle pause on a VM)."""
        return self.value if self.error is None else None

    async def wait(self) -> T:
        await self.event.wait()
        if self.error is not None:
            raise type(self.error)(self.error.message)
        assert self.value is not None
        return self.value


Flight = Pending[bytes]  # one chunk being found or fetched
# A BAM file's object being found in the background: ``open`` answers at once and the first
# read waits for it, so loading the pointer and checking the local pools (a worker thread's
# round trip, 0.5-1 ms on an idle VM) overlaps the kernel's own round trips instead of adding
# to a cold first read.  A lookup of a BAM file starts it too (see :meth:`Fetcher.opening`).
Opening = Pending["Obj"]


@dataclass
class Obj:
    """A BAM object opened for reading: its pointer and the local files that may hold it."""

    pointer: Pointer
    own: Path | None  # the repository's own pool file, if present
    others: list[Path]  # files in bam.pools (and a server on local disk), if present

    @property
    def local(self) -> bool:
        return self.own is not None or bool(self.others)


class _Local(NamedTuple):
    """What the local copies and the cache had of a run of chunks."""

    found: dict[int, bytes]  # chunk index -> verified bytes
    bad: list[bytes]  # damaged cache entries (to delete)
    hits: list[bytes]  # cache keys that served a chunk (to touch)
    pool_reads: int


@dataclass
class ReadAhead:
    """Per open file: is the reader sequential, and how far ahead has been asked for."""

    next_off: int = 0
    streak: int = 0
    ahead: int = 0  # chunks below this index have been requested


@dataclass
class Stats:
    """Counters for ``bkfs status`` (updated on the trio thread only)."""

    bytes_fetched: int = 0  # body bytes received from the BAM server
    objects_fetched: set[bytes] = field(default_factory=set)
    requests: int = 0
    cache_hits: int = 0  # chunks served from the shared cache
    memory_hits: int = 0
    pool_reads: int = 0  # chunks served from local pools
    cache_inserts: int = 0
    cache_evictions: int = 0
    bytes_served: int = 0
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))

    def record_error(self, path: str, oid: bytes | None, reason: str) -> bool:
        """Remember a failed read; False when it only repeats the latest one for that path."""
        for e in self.errors:
            if e["path"] == path and e["reason"] == reason:
                e["count"] += 1
                e["time"] = time.time()
                return False
        self.errors.append(
            {
                "path": path,
                "oid": oid.hex() if oid else None,
                "reason": reason,
                "time": time.time(),
                "count": 1,
            }
        )
        return True


class Fetcher:
    """Verified chunks of BAM objects from the pool chain.  Create it inside the daemon's
    nursery (which runs its fetch tasks) and run its cache writer (:meth:`run_writer`) there;
    :meth:`abort` then :meth:`close` end it."""

    def __init__(
        self,
        nursery: trio.Nursery,
        cache: ChunkCache,
        *,
        server_url: str | None,
        client: ConnectionPool | None,
        offline: bool = False,
        headers: Callable[[str], dict[str, str]] = lambda _url: {},
    ) -> None:
        self._nursery = nursery
        self.cache = cache
        self.server_url = server_url
        self._headers = headers
        self.offline = offline
        self._client = client
        self.stats = Stats()
        self._flights: dict[bytes, Flight] = {}
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._unwritten: dict[bytes, bytes] = {}
        self._touched: set[bytes] = set()
        self._damaged: set[bytes] = set()
        self._failures: dict[bytes, tuple[ContentError, float]] = {}
        self._down: dict[str, tuple[str, float]] = {}  # server -> (why, fail at once until)
        self._stopping = False
        self._http = trio.CapacityLimiter(HTTP_PARALLEL)
        self._disk = trio.CapacityLimiter(4)
        self._write_tx, self._write_rx = trio.open_memory_channel[list[tuple[bytes, bytes]]](
            WRITE_QUEUE
        )
        self._writer_done = trio.Event()
        self._openings: OrderedDict[bytes, tuple[float, Opening]] = OrderedDict()
        self._ahead_loads = 0

    # -- opening -------------------------------------------------------------------------------
    def opening(self, source: Source, pointer_id: bytes, *, hint: bool = False) -> Opening | None:
        """A BAM file's object (:meth:`load`), found in the background and shared by the opens
        of the next OPENING_TTL seconds: a file opened again, or opened right after a lookup
        named it (``stat`` then ``open``, or the lookup an ``open`` of an uncached name makes),
        has it found already or on the way.  The local copies it lists may be that old: a
        copy gone since is skipped like a damaged one, one new since is used after the TTL.

        ``hint``: a lookup giving the head start; declined (None) while AHEAD_LOADS such loads
        are running, so a storm of lookups (``stat`` of every file) costs little."""
        now = trio.current_time()
        while self._openings:
            oldest, _ = next(iter(self._openings.values()))
            if now - oldest < OPENING_TTL and len(self._openings) < OPENINGS_KEPT:
                break
            self._openings.popitem(last=False)
        got = self._openings.get(pointer_id)
        if got is not None and got[1].error is None:
            return got[1]
        if hint and self._ahead_loads >= AHEAD_LOADS:
            return None
        opening = Opening()
        self._openings.pop(pointer_id, None)
        self._openings[pointer_id] = (now, opening)
        self._ahead_loads += int(hint)
        self._nursery.start_soon(self._load_into, opening, source, pointer_id, hint)
        return opening

    async def _load_into(
        self, opening: Opening, source: Source, pointer_id: bytes, hint: bool
    ) -> None:
        try:
            opening.resolve(
                await trio.to_thread.run_sync(self.load, source, pointer_id, limiter=self._disk)
            )
        except BkfsError as e:
            opening.fail(e)
        finally:
            self._ahead_loads -= int(hint)
            opening.fail(ServerUnavailable("the mount is stopping"))  # if cancelled

    @staticmethod
    def load(source: Source, pointer_id: bytes) -> Obj:
        """A BAM file's pointer and the local copies that exist, in one blocking call (run
        in a thread: one hop for an open, which a cold first read waits for)."""
        ptr = source.pointer(pointer_id)
        return Fetcher.open_object(ptr, source.local_copies(ptr.oid))

    @staticmethod
    def open_object(pointer: Pointer, copies: list[Path]) -> Obj:
        """Which local copies exist (blocking: run in a thread).  ``copies[0]`` is the
        repository's own pool."""
        present = [p for p in copies if p.is_file()]
        own = copies[0] if copies and present and present[0] == copies[0] else None
        return Obj(pointer, own, [p for p in present if p != own])

    # -- reading -------------------------------------------------------------------------------
    async def read(self, obj: Obj, off: int, size: int, ra: ReadAhead) -> bytes:
        """``size`` bytes at ``off`` (fewer at the end), every chunk verified."""
        ptr = obj.pointer
        end = min(off + size, ptr.size)
        if off >= end:
            return b""
        cs = ptr.chunk_size
        first, last = off // cs, (end - 1) // cs
        self._check_remembered(ptr, first, last)
        parts: list[bytes | Flight] = []
        fresh: list[int] = []
        for i in range(first, last + 1):
            key = self._key(ptr, i)
            got = self._from_memory(key)
            if got is None:
                got = self._flights.get(key)
                if got is None:
                    got = self._flights[key] = Flight()
                    fresh.append(i)
            parts.append(got)
        self._start(obj, fresh)
        self._track(obj, ra, off, end, last)
        datas: list[bytes] = []
        with trio.move_on_after(READ_DEADLINE) as scope:
            for p in parts:
                datas.append(p if isinstance(p, bytes) else await p.wait())
        if scope.cancelled_caught:
            where = self._server(ptr) or "the local pools"
            raise ServerUnavailable(f"no answer from {where} within {READ_DEADLINE:g} s")
        base = first * cs
        data = datas[0] if len(datas) == 1 else b"".join(datas)
        out = data[off - base : end - base]
        self.stats.bytes_served += len(out)
        return out

    def _track(self, obj: Obj, ra: ReadAhead, off: int, end: int, last: int) -> None:
        """Notice a sequential reader and keep read-ahead in front of it: the next chunks are
        found (cache, pools) or fetched (server) while it consumes these."""
        if abs(off - ra.next_off) <= SEQ_SLACK:
            ra.streak += 1
            ra.next_off = max(ra.next_off, end)
        else:
            ra.streak, ra.ahead, ra.next_off = 0, 0, end
        if ra.streak < 2:
            return
        ptr = obj.pointer
        n, per_request = ptr.nchunks, ptr.chunks_in(REQUEST_BYTES)
        window = min(ptr.chunks_in(MAX_AHEAD_BYTES), per_request << min(ra.streak - 2, 8))
        lo = max(last + 1, ra.ahead)
        hi = min(last + 1 + window, n)
        if hi - lo >= per_request or (hi == n and hi > lo):
            ra.ahead = hi
            want = [i for i in range(lo, hi) if self._wanted(ptr, i)]
            for i in want:
                self._flights[self._key(ptr, i)] = Flight()
            self._start(obj, want)

    def _wanted(self, ptr: Pointer, i: int) -> bool:
        key = self._key(ptr, i)
        return key not in self._flights and key not in self._recent and key not in self._unwritten

    def _start(self, obj: Obj, idxs: list[int]) -> None:
        """Resolve the flights of these chunks in the background, a run per task so runs are
        read, verified and fetched in parallel."""
        for run in _runs(idxs, obj.pointer):
            self._nursery.start_soon(self._resolve, obj, run)

    async def _resolve(self, obj: Obj, run: list[int]) -> None:
        """Find a run of chunks on local disk or in the cache; fetch the rest from the server
        (both in one worker call when the server may be asked)."""
        try:
            self._check_server(obj.pointer)
        except ContentError:  # offline, no server or one that just failed: local copies only
            pass
        else:
            await self._fetch_run(obj, run, True, look_local=True)
            return
        try:
            local = await trio.to_thread.run_sync(self._local_chunks, obj, run, limiter=self._disk)
        except ContentError as e:  # the chunk list could not be read
            for i in run:
                self._fail(obj.pointer, i, e)
            return
        except BaseException:
            for i in run:
                self._fail(obj.pointer, i, ServerUnavailable("the mount is stopping"))
            raise
        self._found(obj, local)
        for rest in _runs([i for i in run if i not in local.found], obj.pointer):
            await self._fetch_run(obj, rest, True)  # fails them with the reason

    def _found(self, obj: Obj, local: _Local) -> None:
        """Chunks found on local disk or in the cache: hand them to their readers."""
        ptr = obj.pointer
        self.stats.cache_hits += len(local.hits)
        self.stats.pool_reads += local.pool_reads
        self._touched.update(local.hits)
        self._damaged.update(local.bad)
        for i, data in local.found.items():
            key = self._key(ptr, i)
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.resolve(data)
            self._remember(key, data)

    def _local_chunks(self, obj: Obj, idxs: list[int]) -> _Local:
        """Chunks from the own pool, the shared cache, then other pools, verified (blocking;
        touches nothing shared)."""
        ptr = obj.pointer
        found: dict[int, bytes] = {}
        bad: list[bytes] = []
        hits: list[bytes] = []
        pool_reads = 0
        for i in idxs:
            off, n, digest = i * ptr.chunk_size, ptr.chunk_len(i), ptr.digest(i)
            data = _pread_verified(obj.own, off, n, digest) if obj.own else None
            if data is None:
                key = chunk_key(ptr.oid, off, n)
                try:
                    data = self.cache.get(key)
                except lmdb.Error as e:
                    log.warning("cache read failed: %s", e)
                    data = None
                if data is not None:
                    if verify(data, digest):
                        hits.append(key)
                    else:
                        log.warning("cache: damaged chunk %d of %s dropped", i, ptr.oid.hex())
                        bad.append(key)
                        data = None
            else:
                pool_reads += 1
            if data is None:
                for path in obj.others:
                    data = _pread_verified(path, off, n, digest)
                    if data is not None:
                        pool_reads += 1
                        break
            if data is not None:
                found[i] = data
        return _Local(found, bad, hits, pool_reads)

    # -- prefetch ------------------------------------------------------------------------------
    async def prefetch(self, obj: Obj) -> int:
        """Bring a whole object into the shared cache; returns the bytes fetched for it.
        Raises the first failure after every chunk has been tried."""
        ptr = obj.pointer
        if obj.local or ptr.size == 0:
            return 0
        keys = [self._key(ptr, i) for i in range(ptr.nchunks)]
        present = await trio.to_thread.run_sync(self.cache.present, keys, limiter=self._disk)
        todo = [i for i in range(ptr.nchunks) if keys[i] not in present]
        window = ptr.chunks_in(PREFETCH_BYTES)
        before = self.stats.bytes_fetched
        error: ContentError | None = None
        pending: deque[Flight] = deque()
        while todo or pending:
            batch: list[int] = []
            while todo and len(pending) + len(batch) < window:
                i = todo.pop(0)
                key = keys[i]
                flight = self._flights.get(key)
                if flight is None and key not in self._unwritten:
                    flight = self._flights[key] = Flight()
                    batch.append(i)
                if flight is not None:
                    pending.append(flight)
            for run in _runs(batch, ptr):
                self._nursery.start_soon(self._fetch_run, obj, run, False)
            if pending:
                try:
                    await pending.popleft().wait()
                except ContentError as e:
                    error = error or e
        if error is not None:
            raise error
        return self.stats.bytes_fetched - before

    # -- the server ----------------------------------------------------------------------------
    async def _fetch_run(
        self, obj: Obj, run: list[int], keep: bool, *, look_local: bool = False
    ) -> None:
        """Fetch contiguous chunks with one Range request (retried from the first chunk not
        yet received); every chunk's flight is resolved or failed before this returns.
        ``look_local``: the first try looks in the local copies and the cache first, in the
        same worker call (a cold read waits for one thread round trip, not two)."""
        ptr = obj.pointer
        todo = list(run)
        try:
            tries = 0
            while todo:
                self._check_server(ptr)
                got: list[int] = []
                work = self._find_then_get if look_local else self._get
                look_local = False
                try:
                    asked = await trio.to_thread.run_sync(
                        work, obj, list(todo), keep, got, limiter=self._http, abandon_on_cancel=True
                    )
                    self.stats.requests += asked
                except (*_NETWORK, _Retry) as e:
                    self.stats.requests += 1
                    tries += 1
                    reason = str(e) or type(e).__name__
                    if tries > RETRIES:
                        server = self._server(ptr) or ""
                        self._down[server] = (reason, time.monotonic() + SERVER_BACKOFF)
                        raise ServerUnavailable(
                            f"BAM server {server} is unavailable: {reason}"
                        ) from None
                    await trio.sleep(0.1 * 2**tries)
                except ContentError as e:  # missing, refused, or an answer that makes no sense
                    self.stats.requests += 1
                    if isinstance(e, ObjectMissing):
                        self._failures[ptr.oid] = (e, time.monotonic() + REMEMBER_FAILURE)
                    raise
                finally:
                    done = set(got)
                    todo = [i for i in todo if i not in done]
                if todo and todo[-1] - todo[0] + 1 != len(todo):  # holes: local chunks
                    runs, todo = _runs(todo, ptr), []
                    for rest in runs:
                        await self._fetch_run(obj, rest, keep)
        except ContentError as e:
            for i in todo:
                self._fail(ptr, i, e)
        finally:
            for i in todo:
                self._fail(ptr, i, ServerUnavailable("the mount is stopping"))

    def _find_then_get(self, obj: Obj, todo: list[int], keep: bool, got: list[int]) -> bool:
        """The first try of a run (worker thread): its chunks found on local disk or in the
        cache are handed to the loop, then (when the rest is one contiguous run) one Range
        request for the rest.  ``got`` collects every chunk handed over; returns whether a
        request was sent."""
        local = self._local_chunks(obj, todo)
        if local.found or local.bad or local.hits:
            trio.from_thread.run_sync(self._found, obj, local)
            got.extend(local.found)
        rest = [i for i in todo if i not in local.found]
        if not rest or rest[-1] - rest[0] + 1 != len(rest):
            return False
        return self._get(obj, rest, keep, got)

    def _get(self, obj: Obj, todo: list[int], keep: bool, got: list[int]) -> bool:
        """One Range request for the contiguous chunks ``todo``, in a worker thread.  Each
        chunk is verified here as soon as it is complete and handed to the loop; ``got``
        collects the chunks handed over, so a retry asks only for the rest.  Returns True
        (a request was sent), like :meth:`_find_then_get`."""
        assert self._client is not None
        ptr = obj.pointer
        cs = ptr.chunk_size
        start = todo[0] * cs
        end = todo[-1] * cs + ptr.chunk_len(todo[-1])
        server = self._server(ptr)
        assert server is not None
        url = f"{server}/bam/{ptr.oid.hex()}"
        headers = {**self._headers(server), "Range": f"bytes={start}-{end - 1}"}
        with self._client.connection() as conn:
            if conn.reused(url):
                try:
                    r, _ = conn.request("GET", url, headers=headers)
                except (BrokenPipeError, ConnectionResetError):  # incl. RemoteDisconnected
                    # A kept-alive connection the server has since closed (idle timeout):
                    # not a failure of the server, so try a new connection at once.
                    r, _ = conn.request("GET", url, headers=headers)
            else:
                r, _ = conn.request("GET", url, headers=headers)
            if r.status == 404:
                raise ObjectMissing(f"BAM object {ptr.oid.hex()} is not on the server {url}")
            if r.status in (401, 403):
                raise ServerUnavailable(
                    f"{server} refused access ({r.status}); set BKR_TOKEN or a credentials entry"
                )
            if r.status == 429 or r.status >= 500:
                raise _Retry(f"the server answered {r.status}")
            if r.status == 206:
                skip = 0
                content_range = r.getheader("content-range") or ""
                if not content_range.startswith(f"bytes {start}-"):
                    raise _Retry(f"bad Content-Range {content_range!r}")
            elif r.status == 200:
                skip = start  # the server ignored Range: drop what comes before
            else:
                raise ServerUnavailable(f"{url} answered {r.status}")
            if self._split(obj, r, todo, keep, got, skip) < len(todo):
                raise _Retry("the connection closed before the last byte")
        return True

    def _split(
        self,
        obj: Obj,
        r: http.client.HTTPResponse,
        todo: list[int],
        keep: bool,
        got: list[int],
        skip: int,
    ) -> int:
        """Read a response body chunk by chunk (worker thread): each chunk is read straight
        into its own ``bytes`` and verified; verified chunks are handed over in groups of
        about :data:`HANDOFF_BYTES` (one trip to the loop per group, whatever the chunk size),
        the answer's first chunk alone because a reader is waiting for it.  Returns how many
        were handed over; the bytes received are counted even when the connection fails
        midway."""
        ptr = obj.pointer
        received = 0
        k = 0
        group: list[tuple[int, bytes | None]] = []
        try:
            while skip:
                part = r.read(min(skip, 1 << 20))
                if not part:
                    return 0
                skip -= len(part)
                received += len(part)
            while k + len(group) < len(todo):
                i = todo[k + len(group)]
                n = ptr.chunk_len(i)
                chunk = r.read(n)
                received += len(chunk)
                if len(chunk) < n:
                    break
                group.append((i, chunk if verify(chunk, ptr.digest(i)) else None))
                if k == 0 or len(group) * ptr.chunk_size >= HANDOFF_BYTES:
                    ready, group, n_received, received = group, [], received, 0
                    k += self._hand_over(obj, ready, keep, n_received, got)
        finally:
            if group:  # what arrived whole before the answer ended or failed
                k += self._hand_over(obj, group, keep, received, got)
            elif received:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._count, ptr, received)
        return k

    def _hand_over(
        self,
        obj: Obj,
        group: list[tuple[int, bytes | None]],
        keep: bool,
        received: int,
        got: list[int],
    ) -> int:
        """Give the loop a group of chunks from the server (worker thread), waiting while
        the cache writer is behind; returns how many."""
        full = trio.from_thread.run_sync(self._accept, obj, group, keep, received)
        if full:
            trio.from_thread.run(self._queue_write, full)
        got.extend(i for i, _ in group)
        return len(group)

    def _count(self, ptr: Pointer, received: int) -> None:
        self.stats.bytes_fetched += received
        if received:
            self.stats.objects_fetched.add(ptr.oid)

    def _accept(
        self, obj: Obj, group: list[tuple[int, bytes | None]], keep: bool, received: int
    ) -> list[tuple[bytes, bytes]] | None:
        """Chunks from the server, each verified (bytes) or not (None): hand them to their
        waiters and queue them for the cache.  Returns the cache writes when the queue is
        full and the caller must wait to queue them (:meth:`_queue_write`)."""
        ptr = obj.pointer
        self._count(ptr, received)
        writes: list[tuple[bytes, bytes]] = []
        for i, data in group:
            key = self._key(ptr, i)
            if data is None:
                err = ObjectCorrupt(
                    f"chunk {i} of BAM object {ptr.oid.hex()} from {self._server(ptr)} does not "
                    "match the hash history recorded; it was not used"
                )
                self._failures[key] = (err, time.monotonic() + REMEMBER_FAILURE)
                self._fail(ptr, i, err)
                continue
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.resolve(data)
            if keep:
                self._remember(key, data)
            if not self._stopping:
                self._unwritten[key] = data
                writes.append((key, data))
        if not writes:
            return None
        try:
            self._write_tx.send_nowait(writes)
        except trio.WouldBlock:
            return writes
        except trio.ClosedResourceError:
            self._forget_unwritten(writes)
        return None

    async def _queue_write(self, writes: list[tuple[bytes, bytes]]) -> None:
        """Queue chunks for the cache writer, waiting while it is behind (back-pressure)."""
        try:
            await self._write_tx.send(writes)
        except trio.ClosedResourceError:  # stopping: the writer has gone
            self._forget_unwritten(writes)

    def _forget_unwritten(self, writes: list[tuple[bytes, bytes]]) -> None:
        for key, _ in writes:
            self._unwritten.pop(key, None)

    def _check_server(self, ptr: Pointer) -> None:
        if self._stopping:
            raise ServerUnavailable("the mount is stopping")
        server = self._server(ptr)
        if server is None or self.offline:
            why = (
                "the mount is offline"
                if self.offline
                else "the repository's BAM server is not an http(s) server"
            )
            raise ObjectMissing(
                f"BAM object {ptr.oid.hex()} is not in the local pools or the cache and {why}"
            )
        remembered = self._failures.get(ptr.oid)
        if remembered and remembered[1] > time.monotonic():
            raise type(remembered[0])(remembered[0].message)
        down = self._down.get(server)
        if down is not None:
            reason, until = down
            if time.monotonic() < until:
                raise ServerUnavailable(f"BAM server {server} is unavailable: {reason}")
            del self._down[server]

    def _check_remembered(self, ptr: Pointer, first: int, last: int) -> None:
        """Fail at once when a recent read of these bytes already failed for good."""
        now = time.monotonic()
        keys = [ptr.oid, *(self._key(ptr, i) for i in range(first, last + 1))]
        for key in keys:
            remembered = self._failures.get(key)
            if remembered is not None:
                if remembered[1] > now:
                    err = remembered[0]
                    raise type(err)(err.message)
                del self._failures[key]

    def _server(self, ptr: Pointer) -> str | None:
        """The BAM server of an object: its own (a component's, in a product) or the mount's."""
        return ptr.server or self.server_url

    # -- memory --------------------------------------------------------------------------------
    @staticmethod
    def _key(ptr: Pointer, i: int) -> bytes:
        return chunk_key(ptr.oid, i * ptr.chunk_size, ptr.chunk_len(i))

    def _from_memory(self, key: bytes) -> bytes | None:
        data = self._recent.get(key)
        if data is not None:
            self._recent.move_to_end(key)
        else:
            data = self._unwritten.get(key)
        if data is not None:
            self.stats.memory_hits += 1
        return data

    def _remember(self, key: bytes, data: bytes) -> None:
        if key in self._recent:
            return
        self._recent[key] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def _fail(self, ptr: Pointer, i: int, error: ContentError) -> None:
        flight = self._flights.pop(self._key(ptr, i), None)
        if flight is not None:
            flight.fail(error)

    # -- the cache writer ----------------------------------------------------------------------
    async def run_writer(self) -> None:
        """Write fetched chunks, touches and removals to the shared cache until :meth:`close`
        closes the queue; then write what is left and return."""
        try:
            done = False
            while not done:
                batch: list[tuple[bytes, bytes]] = []
                with trio.move_on_after(TOUCH_INTERVAL):
                    try:
                        batch += await self._write_rx.receive()
                    except trio.EndOfChannel:
                        done = True
                size = sum(len(d) for _, d in batch)
                while size < WRITE_BATCH:
                    try:
                        group = self._write_rx.receive_nowait()
                    except trio.EndOfChannel:
                        done = True
                        break
                    except trio.WouldBlock:
                        break
                    batch += group
                    size += sum(len(d) for _, d in group)
                await self._write(batch)
        finally:
            self._writer_done.set()

    async def _write(self, batch: list[tuple[bytes, bytes]]) -> None:
        touches, self._touched = self._touched, set()
        removes, self._damaged = self._damaged, set()
        if not (batch or touches or removes):
            return
        try:
            evicted = await trio.to_thread.run_sync(self.cache.update, batch, touches, removes)
            self.stats.cache_inserts += len(batch)
            self.stats.cache_evictions += evicted
        except lmdb.Error as e:
            log.warning("cache write failed (%d chunks not cached): %s", len(batch), e)
        finally:
            self._forget_unwritten(batch)

    def abort(self) -> None:
        """Unmounting: fail every waiting read at once and refuse new fetches."""
        self._stopping = True
        for flight in list(self._flights.values()):
            flight.fail(ServerUnavailable("the mount is stopping"))
        self._flights.clear()

    async def close(self, grace: float) -> None:
        """Let the cache writer write what is queued (at most ``grace`` seconds), then end."""
        await self._write_tx.aclose()
        with trio.move_on_after(grace):
            await self._writer_done.wait()

    def inflight(self) -> int:
        return len(self._flights)


class _Retry(Exception):
    """A request failed in a way worth trying again (dropped connection, 5xx)."""


def _runs(idxs: list[int], ptr: Pointer) -> list[list[int]]:
    """Contiguous runs of sorted chunk indexes of ``ptr``, each at most REQUEST_BYTES long."""
    most = ptr.chunks_in(REQUEST_BYTES)
    out: list[list[int]] = []
    for i in idxs:
        if out and out[-1][-1] == i - 1 and len(out[-1]) < most:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _pread_verified(path: Path | None, off: int, n: int, digest: bytes) -> bytes | None:
    """A chunk from a local object file, or None if unreadable or not matching its hash."""
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, n, off)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) == n and verify(data, digest):
        return data
    log.warning("%s: chunk at %d does not match its hash; trying the next source", path, off)
    return None
