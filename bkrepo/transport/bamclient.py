"""Moving BAM objects over HTTP: parallel, batched, resumable, verified.

Transfers run on :data:`PARALLEL` worker threads, each with its own kept-alive HTTP/1.1
connection (the standard library's :mod:`http.client`).  Blocking sockets read straight into
reused 1 MiB buffers and release the GIL while they wait, as hashing and writing do: in
Python that moves 2-3x the bytes per CPU second of an async client (docs/performance.md).

Downloads:

- Objects up to :data:`SMALL` bytes travel many per request: ``POST <base>/bam/batch``
  answers with the B records of the bundle format (bundle.py) of those the server has; the
  ones it leaves out (larger, elsewhere, missing) are then fetched one by one.  A server
  without that endpoint gets every object fetched one by one.
- One object: ``GET <base>/bam/<oid>``.  The worker receives and hashes blocks while its
  sink thread writes the blocks before, with ``O_DIRECT`` where the filesystem allows (a
  ring of :data:`RING` buffers bounds the memory and gives back-pressure).  A dropped
  connection resumes with ``Range`` after the last byte received.
- Every object goes to a temp file in the pool and is installed (fsync, rename) only if its
  SHA-256 matches its id.

Uploads: ``PUT <base>/bam/<oid>``, the body sent from the pool file by ``sendfile``; the
server verifies before it stores.

Network failures and 5xx answers are retried with backoff (:data:`RETRIES` per object or
batch); every socket operation has a timeout, so nothing hangs; 401/403, 404, corrupt data
and other refusals fail at once with a one-line error, and local disk errors propagate as
they are.  Memory is bounded whatever the object sizes: about ``PARALLEL * (RING + 1) *
BLOCK``.  When one transfer fails the others stop, and no thread outlives the call.

Entry points are synchronous (:func:`download`, :func:`upload`): the engine calls them
between LMDB transactions, never inside one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import mmap
import os
import queue
import socket
import ssl
import struct
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from bkrepo import progress
from bkrepo.bundle import MAGIC
from bkrepo.errors import (
    AccessDenied,
    ObjectCorrupt,
    ObjectMissing,
    ServerUnavailable,
    SyncError,
)
from bkrepo.ids import Oid
from bkrepo.pool import Pool
from bkrepo.transport import io_timeout
from bkrepo.transport.credentials import auth_headers

PARALLEL = 8  # worker threads, one connection each
RETRIES = 5  # per object or batch, after backoffs of 0.5, 1, 2, 4, 5 s
BLOCK = 1 << 20  # bytes per socket read, hash update and write
RING = 4  # blocks in flight between a worker and its sink
SMALL = 1 << 20  # objects up to this size are asked for in batches
BATCH = 256  # objects per batch request (fewer when that would leave workers idle)
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0  # any one socket operation
MAX_REDIRECTS = 5

_REDIRECTS = (301, 302, 303, 307, 308)
_RECORD = struct.Struct("<32sQ")  # a B record's oid and size (bundle.py)
_NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
_PATH_SAFE = "/%:@!$&'()*+,;=~"  # left as they are in a URL path (existing %XX escapes too)
_ALIGN = 4096  # O_DIRECT writes: offsets and lengths in whole blocks of the device


class _Retry(Exception):
    """A failure worth another try: a truncated answer, 5xx, 429."""


class _Stopped(Exception):
    """Another transfer failed: give up quietly."""


def _is_network(e: BaseException) -> bool:
    """Failures of the connection (retried), as opposed to local ones (disk: propagated)."""
    network = (_Retry, ConnectionError, TimeoutError, socket.gaierror, ssl.SSLError)
    if isinstance(e, (http.client.InvalidURL, ssl.SSLCertVerificationError)):
        return False  # a bad URL or an untrusted certificate stays so: no retries
    if isinstance(e, (*network, http.client.HTTPException)):
        return True
    return isinstance(e, OSError) and e.errno in _NET_ERRNOS


# -- connections -------------------------------------------------------------------------------
class Connection:
    """The kept-alive HTTP/1.1 connections of one worker (one per origin), reopened after an
    error.  Honours ``http(s)_proxy``/``no_proxy`` as httpx does, and sends each origin the
    token the credentials name for it.  Not thread-safe: one per thread at a time (bkfs
    uses it too, with its own shorter timeouts)."""

    def __init__(
        self, *, connect_timeout: float = CONNECT_TIMEOUT, io_timeout: float = IO_TIMEOUT
    ) -> None:
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}
        self.last: dict[tuple[str, str, int], http.client.HTTPResponse] = {}
        self.absolute: set[tuple[str, str, int]] = set()  # plain HTTP through a proxy
        self.auth: dict[str, dict[str, str]] = {}

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        send_file: tuple[Path, int] | None = None,
    ) -> tuple[http.client.HTTPResponse, str]:
        """Send a request, following redirects; the response and the URL that gave it.
        ``send_file`` = (path, size): stream that file as the body."""
        for _ in range(MAX_REDIRECTS + 1):
            r = self._send(method, url, headers or {}, body, send_file)
            location = r.getheader("location")
            if r.status not in _REDIRECTS or not location:
                return r, url
            r.read()
            url = urllib.parse.urljoin(url, location)
        raise SyncError(f"{url}: too many redirects")

    def connect(self, url: str) -> None:
        """Open the connection to ``url``'s origin now, sending nothing, so the first request
        does not wait for it."""
        scheme, host, port = self._key(urllib.parse.urlsplit(url))
        if self.conns.get((scheme, host, port)) is None:
            self.conns[(scheme, host, port)] = self._open(scheme, host, port)

    def reused(self, url: str) -> bool:
        """Whether a request to ``url`` now would go over a connection opened before."""
        conn = self.conns.get(self._key(urllib.parse.urlsplit(url)))
        return conn is not None and conn.sock is not None

    @staticmethod
    def _key(u: urllib.parse.SplitResult) -> tuple[str, str, int]:
        scheme = u.scheme.lower()
        return (scheme, u.hostname or "", u.port or (443 if scheme == "https" else 80))

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        send_file: tuple[Path, int] | None,
    ) -> http.client.HTTPResponse:
        u = urllib.parse.urlsplit(url)
        key = self._key(u)
        scheme = key[0]
        conn = self.conns.get(key)
        last = self.last.pop(key, None)
        if conn is not None and (conn.sock is None or (last is not None and not last.isclosed())):
            conn.close()  # closed by the server, or an answer left unread: a fresh connection
            conn = None
        if conn is None:
            conn = self.conns[key] = self._open(*key)
        path = urllib.parse.quote(u.path, safe=_PATH_SAFE)  # 'my game' -> 'my%20game'
        if key in self.absolute:
            target = urllib.parse.urlunsplit(u._replace(path=path, fragment=""))
        else:
            target = path + (f"?{u.query}" if u.query else "")
        origin = f"{scheme}://{u.netloc}"
        if origin not in self.auth:
            self.auth[origin] = auth_headers(url)
        try:
            if send_file is None:
                conn.request(method, target, body=body, headers={**self.auth[origin], **headers})
                r = conn.getresponse()
            else:
                r = _send_file(conn, method, target, {**self.auth[origin], **headers}, *send_file)
        except BaseException:
            self.close()
            raise
        self.last[key] = r
        return r

    def _open(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        if scheme not in ("http", "https"):
            raise SyncError(f"unsupported URL scheme {scheme!r}")
        op_timeout = io_timeout(self.io_timeout)
        connect = min(self.connect_timeout, op_timeout)
        proxy = None
        proxies = urllib.request.getproxies()
        if scheme in proxies and not urllib.request.proxy_bypass(host):
            proxy = urllib.parse.urlsplit(proxies[scheme])
        conn: http.client.HTTPConnection
        if scheme == "https":
            import httpx  # its TLS settings (certifi, SSL_CERT_FILE), as the rest of bkr has

            ctx = httpx.create_ssl_context()
            if proxy is not None:
                conn = http.client.HTTPSConnection(
                    proxy.hostname or "", proxy.port or 80, timeout=connect, context=ctx
                )
                conn.set_tunnel(host, port)
            else:
                conn = http.client.HTTPSConnection(host, port, timeout=connect, context=ctx)
        elif proxy is not None:
            conn = http.client.HTTPConnection(
                proxy.hostname or "", proxy.port or 80, timeout=connect
            )
            self.absolute.add((scheme, host, port))
        else:
            conn = http.client.HTTPConnection(host, port, timeout=connect)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(op_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def abort(self) -> None:
        """From another thread: make any blocked socket operation of this worker fail now."""
        for conn in list(self.conns.values()):
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        self.last.clear()


def _send_file(
    conn: http.client.HTTPConnection,
    method: str,
    target: str,
    headers: dict[str, str],
    path: Path,
    size: int,
) -> http.client.HTTPResponse:
    conn.putrequest(method, target, skip_accept_encoding=True)
    for k, v in {**headers, "Content-Length": str(size)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    assert conn.sock is not None
    with open(path, "rb") as f:
        try:
            sent = conn.sock.sendfile(f, 0, size)
        except OSError as e:
            if not _is_network(e):
                raise
            sent = -1
    if sent == size:
        return conn.getresponse()
    # The server may have refused (and closed) before reading the whole body: its answer,
    # if it is there, says more than the broken pipe.
    try:
        conn.sock.settimeout(2.0)
        r = conn.getresponse()
    except (OSError, http.client.HTTPException):
        raise _Retry("connection lost while sending") from None
    if r.status < 400:
        raise _Retry("connection lost while sending")
    return r


def _check(r: http.client.HTTPResponse, what: str, url: str) -> None:
    if r.status in (401, 403):
        raise AccessDenied(
            f"{what}: {url} refused access ({r.status}); set BKR_TOKEN or a credentials entry"
        )
    if r.status >= 500 or r.status == 429:
        raise _Retry(f"server answered {r.status}")


def _reason(r: http.client.HTTPResponse) -> str:
    try:
        text = r.read(64 << 10).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return r.reason
    try:
        return str(json.loads(text).get("error") or text)
    except (ValueError, AttributeError):
        return text.strip()[:200] or r.reason


def _read_exact(r: http.client.HTTPResponse, view: memoryview) -> None:
    while view:
        n = r.readinto(view)
        if not n:
            raise _Retry("the answer ended early")
        view = view[n:]


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for an open file; whether that worked."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:
        return False
    return True


# -- workers -----------------------------------------------------------------------------------
class _Job:
    """One request's worth of work (an object, or a batch), with its count of failed tries."""

    def __init__(self, run: Callable[[_Worker, _Job], None], tries: int = 0) -> None:
        self.run = run
        self.tries = tries


class _Transfer:
    """A queue of jobs run by PARALLEL worker threads; the first failure stops them all."""

    def __init__(self, base: str, pool: Pool, what: str, bar: Any) -> None:
        self.base = base
        self.pool = pool
        self.what = what
        self.bar = bar
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0
        self.done = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.learned: set[Oid] = set()  # objects whose size the progress bar counts

    def add(self, job: _Job) -> None:
        with self.lock:
            self.pending += 1
        self.jobs.put(job)

    def run(self, jobs: list[_Job], objects: int) -> None:
        """Run ``jobs`` (and the jobs they add) for ``objects`` objects in all."""
        for job in jobs:
            self.add(job)
        workers = [_Worker(self) for _ in range(min(PARALLEL, objects))]
        try:
            self.done.wait()
        finally:
            self.stop.set()
            for w in workers:
                self.jobs.put(None)
                w.conn.abort()
            for w in workers:
                w.thread.join()
        if self.error is not None:
            raise self.error

    def finished(self, error: BaseException | None = None) -> None:
        with self.lock:
            if error is not None and self.error is None and not isinstance(error, _Stopped):
                self.error = error
                self.done.set()
            self.pending -= 1
            if self.pending == 0:
                self.done.set()

    def check(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    def learn(self, oid: Oid, size: int) -> None:
        """A download's size, known once its answer starts: the bar's total grows by it."""
        with self.lock:
            if oid in self.learned:
                return
            self.learned.add(oid)
        self.bar.grow(size)

    def again(self, job: _Job, e: BaseException, describe: str) -> None:
        """After a network failure: back off before the next try, or give up."""
        self.check()
        job.tries += 1
        if job.tries > RETRIES:
            raise ServerUnavailable(
                f"{self.what}: {describe} {self.base} failed after {RETRIES} retries "
                f"({e or type(e).__name__})"
            ) from None
        self.stop.wait(min(0.25 * 2**job.tries, 5.0))
        self.check()


class _Worker:
    def __init__(self, transfer: _Transfer) -> None:
        self.t = transfer
        self.conn = Connection()
        self.sink: _Sink | None = None
        self.thread = threading.Thread(target=self._main, name="bam-transfer", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            while True:
                job = self.t.jobs.get()
                if job is None:
                    return
                try:
                    self.t.check()
                    job.run(self, job)
                except BaseException as e:
                    self.t.finished(e)
                else:
                    self.t.finished()
        finally:
            self.conn.close()
            if self.sink is not None:
                self.sink.close()

    def get_sink(self) -> _Sink:
        if self.sink is None:
            self.sink = _Sink()
        return self.sink


class _Sink:
    """Writes one object's blocks, in order, on its own thread while the worker receives and
    hashes the next ones (both release the GIL, so the two overlap on two cores).  A ring of
    RING buffers bounds memory and gives back-pressure.

    Whole aligned blocks are written with ``O_DIRECT`` where the filesystem allows it: the
    bytes go from the buffer to the disk without a page-cache copy, which costs the client
    next to no CPU, leaves the fsync before install nothing to wait for, and keeps a large
    download from pushing everything else out of the page cache.  The first unaligned block
    (an object's tail, a resumed connection) switches the file back to buffered writes."""

    def __init__(self) -> None:
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(RING):
            self.free.put(mmap.mmap(-1, BLOCK))  # page-aligned, as O_DIRECT needs
        self.full: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
        self.fd = -1
        self.sha = hashlib.sha256()
        self.handed = 0  # bytes of the current object handed over (written or queued)
        self.written = 0
        self.direct: bool | None = None  # None: not decided yet for this object
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._main, name="bam-sink", daemon=True)
        self.thread.start()

    def begin(self, fd: int) -> None:
        """Start (or start again) an object: what follows is hashed from scratch."""
        self.full.join()
        if self.direct:
            _set_direct(fd, False)
        self.fd = fd
        self.sha = hashlib.sha256()
        self.handed = 0
        self.written = 0
        self.direct = None
        self.error = None

    def buffer(self) -> mmap.mmap:
        if self.error is not None:
            raise self.error
        return self.free.get()

    def put(self, buf: mmap.mmap, n: int) -> None:
        """Hash a received block (in the caller's thread) and queue it for writing."""
        self.sha.update(memoryview(buf)[:n])
        self.handed += n
        self.full.put((buf, n))

    def give_back(self, buf: mmap.mmap) -> None:
        self.free.put(buf)

    def finish(self) -> bytes:
        """Wait until every block is written; the SHA-256 of them all (of what was handed
        over since ``begin``)."""
        self.full.join()
        if self.error is not None:
            raise self.error
        return self.sha.digest()

    def _main(self) -> None:
        while True:
            item = self.full.get()
            if item is None:
                return
            buf, n = item
            try:
                if self.error is None:
                    self._write(memoryview(buf)[:n])
            except OSError as e:
                self.error = e
            finally:
                self.free.put(buf)
                self.full.task_done()

    def _write(self, view: memoryview) -> None:
        aligned = len(view) % _ALIGN == 0 and self.written % _ALIGN == 0
        if self.direct is None:
            self.direct = aligned and _set_direct(self.fd, True)
        elif self.direct and not aligned:
            self.direct = not _set_direct(self.fd, False)
        while view:
            try:
                k = os.write(self.fd, view)
            except OSError as e:
                direct_refused = self.direct and e.errno == errno.EINVAL
                if not (direct_refused and _set_direct(self.fd, False)):
                    raise
                self.direct = False  # and write it through the page cache
                continue
            view = view[k:]
            self.written += k

    def close(self) -> None:
        self.full.put(None)


# -- downloads ---------------------------------------------------------------------------------
def download(base: str, oids: Iterable[Oid], pool: Pool, *, what: str) -> None:
    """Fetch objects from ``base``/bam/<oid> into ``pool`` (a no-op for ones it has)."""
    todo = sorted(o for o in set(oids) if not pool.has(o))
    if not todo:
        return
    base = base.rstrip("/")
    with progress.bar(f"fetching {len(todo)} BAM objects") as bar:
        t = _Transfer(base, pool, what, bar)
        if len(todo) == 1:
            jobs = [_Job(partial(_get, t, todo[0]))]
        else:
            per = max(1, min(BATCH, -(-len(todo) // PARALLEL)))
            jobs = [_Job(partial(_batch, t, todo[i : i + per])) for i in range(0, len(todo), per)]
        t.run(jobs, len(todo))


def _get(t: _Transfer, oid: Oid, w: _Worker, job: _Job) -> None:
    """One object by GET, resumed with Range after a dropped connection."""
    url = f"{t.base}/bam/{oid.hex()}"
    sink = w.get_sink()
    fd, tmp = t.pool.new_temp()
    try:
        sink.begin(fd)
        while True:
            got = sink.handed
            try:
                headers = {"Range": f"bytes={got}-"} if got else {}
                r, final = w.conn.request("GET", url, headers=headers)
                if r.status == 404:
                    raise ObjectMissing(f"{t.what}: BAM object {oid.hex()} is not on {t.base}", oid)
                _check(r, t.what, final)
                if r.status == 200:
                    t.learn(oid, r.length or 0)
                if r.status == 200 and got:  # the server ignored Range: start again
                    sink.begin(fd)
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                elif r.status == 206:
                    if not (r.getheader("content-range") or "").startswith(f"bytes {got}-"):
                        raise SyncError(f"{t.what}: {final} answered another range than asked")
                elif r.status != 200:
                    raise SyncError(f"{t.what}: {final} answered {r.status}: {_reason(r)}")
                _receive(t, r, sink)
                break
            except Exception as e:
                if not _is_network(e):
                    raise
                w.conn.close()
                t.again(job, e, f"fetching BAM object {oid.hex()[:16]}… from")
        digest = sink.finish()
        if digest != oid:
            raise ObjectCorrupt(
                f"{t.what}: BAM object {oid.hex()} from {t.base} is corrupt (its bytes hash to "
                f"{digest.hex()[:16]}…); it was not installed",
                oid,
            )
        os.fsync(fd)
        os.close(fd)
        fd = -1
        t.pool.install(tmp, oid)
    finally:
        if fd >= 0:
            sink.full.join()  # the sink is done with fd before it is closed
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _receive(t: _Transfer, r: http.client.HTTPResponse, sink: _Sink) -> None:
    """Stream a response body to the sink.  A body that ends before its Content-Length is a
    retry (resumed after what arrived: ``sink.handed``)."""
    while True:
        t.check()
        buf = sink.buffer()
        try:
            n = r.readinto(buf)
        except BaseException:
            sink.give_back(buf)
            raise
        if not n:
            sink.give_back(buf)
            break
        sink.put(buf, n)
        t.bar.advance(n)
    if r.length:  # http.client counts down what Content-Length promised
        raise _Retry("connection closed before the end of the object")


def _batch(t: _Transfer, oids: list[Oid], w: _Worker, job: _Job) -> None:
    """Many small objects in one request; the ones not in the answer are then fetched one by
    one.  After a network failure, the ones not installed yet are asked for again."""
    left = set(oids)
    try:
        body = json.dumps({"oids": [o.hex() for o in oids], "max_size": SMALL}).encode()
        r, final = w.conn.request(
            "POST", f"{t.base}/bam/batch", body=body, headers={"Content-Type": "application/json"}
        )
        if r.status in (400, 404, 405):  # a server without batches
            r.read()
        else:
            _check(r, t.what, final)
            if r.status != 200:
                raise SyncError(f"{t.what}: {final} answered {r.status}: {_reason(r)}")
            _read_batch(t, r, left)
            r.read()  # the end of the chunked body: the connection is then ready for more
    except Exception as e:
        if not _is_network(e):
            raise
        w.conn.close()
        t.again(job, e, "fetching BAM objects from")
        t.add(_Job(partial(_batch, t, sorted(left)), job.tries))
        return
    for oid in sorted(left):
        t.add(_Job(partial(_get, t, oid)))


def _read_batch(t: _Transfer, r: http.client.HTTPResponse, left: set[Oid]) -> None:
    magic = bytearray(len(MAGIC))
    _read_exact(r, memoryview(magic))
    if magic != MAGIC:
        raise SyncError(f"{t.what}: {t.base}/bam/batch did not answer with BAM records")
    tag = bytearray(1)
    head = bytearray(_RECORD.size)
    buf = bytearray(BLOCK)
    while True:
        t.check()
        _read_exact(r, memoryview(tag))
        if tag == b"E":
            return
        if tag != b"B":
            raise SyncError(f"{t.what}: {t.base}/bam/batch sent an unknown record {bytes(tag)!r}")
        _read_exact(r, memoryview(head))
        raw, size = _RECORD.unpack(head)
        oid = Oid(raw)
        if oid not in left:
            raise SyncError(f"{t.what}: {t.base}/bam/batch sent an object not asked for")
        t.learn(oid, size)
        _receive_record(t, r, oid, size, buf)
        left.discard(oid)


def _receive_record(
    t: _Transfer, r: http.client.HTTPResponse, oid: Oid, size: int, buf: bytearray
) -> None:
    """One B record of a batch: hashed and written as it arrives, installed if it matches."""
    sha = hashlib.sha256()
    fd, tmp = t.pool.new_temp()
    try:
        left = size
        while left:
            view = memoryview(buf)[: min(left, BLOCK)]
            _read_exact(r, view)
            sha.update(view)
            _write_all(fd, view)
            left -= len(view)
        if sha.digest() != oid:
            raise ObjectCorrupt(
                f"{t.what}: BAM object {oid.hex()} from {t.base} is corrupt (its bytes hash to "
                f"{sha.hexdigest()[:16]}…); it was not installed",
                oid,
            )
        os.fsync(fd)
        os.close(fd)
        fd = -1
        t.pool.install(tmp, oid)
        t.bar.advance(size)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


# -- uploads -----------------------------------------------------------------------------------
def upload(base: str, oids: Iterable[Oid], pool: Pool, *, what: str) -> None:
    """Send objects from ``pool`` to ``base``/bam/<oid>; the server verifies each."""
    todo = sorted(set(oids))
    if not todo:
        return
    base = base.rstrip("/")
    total = sum(pool.size_of(o) or 0 for o in todo)
    with progress.bar(f"sending {len(todo)} BAM objects", total) as bar:
        t = _Transfer(base, pool, what, bar)
        t.run([_Job(partial(_put, t, o)) for o in todo], len(todo))


def _put(t: _Transfer, oid: Oid, w: _Worker, job: _Job) -> None:
    url = f"{t.base}/bam/{oid.hex()}"
    path = t.pool.path(oid)
    size = t.pool.size_of(oid)
    if size is None:
        raise ObjectMissing(f"{t.what}: BAM object {oid.hex()} is not in the local pool")
    while True:
        try:
            r, final = w.conn.request("PUT", url, send_file=(path, size))
            if r.status == 422:
                raise ObjectCorrupt(
                    f"{t.what}: the local copy of BAM object {oid.hex()} is corrupt (the server "
                    "rejected it); run 'bkr bam repair'"
                )
            _check(r, t.what, final)
            if r.status not in (200, 201):
                raise SyncError(f"{t.what}: {final} refused the upload ({r.status}): {_reason(r)}")
            r.read()
            t.bar.advance(size)
            return
        except Exception as e:
            if not _is_network(e):
                raise
            w.conn.close()
            t.again(job, e, f"sending BAM object {oid.hex()[:16]}… to")
