"""bkfs below the mount: the fetcher against a small real HTTP server on 127.0.0.1, the shared
cache across processes, the layering rule, and the systemd units."""

from __future__ import annotations

import ast
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3
import pytest
import trio

from bkfs import fetch
from bkfs.errors import ContentError, ObjectCorrupt, ObjectMissing, ServerUnavailable
from bkfs.fetch import ConnectionPool, Fetcher, Obj, ReadAhead
from bkfs.source import ChunkDigests, Pointer
from bkrepo.chunkcache import BOOT_ID, ChunkCache, chunk_key

ROOT = Path(__file__).resolve().parents[1]
CS = 1 << 16  # a small chunk size keeps these tests fast


def pointer(data: bytes, oid: bytes = b"\1" * 32) -> Pointer:
    digests = b"".join(blake3.blake3(data[i : i + CS]).digest() for i in range(0, len(data), CS))
    return Pointer(oid, len(data), CS, ChunkDigests(lambda a, b: digests[a:b], len(digests)))


Handler = Callable[[str], tuple[int, dict[str, str], bytes]]  # Range header -> answer


def served(data: bytes, log: list[str], *, corrupt_at: int | None = None) -> Handler:
    """A BAM server of one object: Range GETs, every request logged."""

    def handler(rng: str) -> tuple[int, dict[str, str], bytes]:
        rng = rng.removeprefix("bytes=")
        log.append(rng)
        time.sleep(0.01)  # long enough for concurrent readers to pile up
        a, b = (int(x) for x in rng.split("-"))
        body = bytearray(data[a : b + 1])
        if corrupt_at is not None and a <= corrupt_at <= b:
            body[corrupt_at - a] ^= 0xFF
        return 206, {"Content-Range": f"bytes {a}-{b}/{len(data)}"}, bytes(body)

    return handler


@contextmanager
def http_server(handler: Handler, *, drop_idle: bool = False) -> Iterator[str]:
    """``handler`` served over real HTTP/1.1 (kept-alive connections) on a free port of
    127.0.0.1, a thread per connection; yields the base URL and stops the server after.
    ``drop_idle``: close each connection after its answer without saying so, as a server
    does when a kept-alive connection has been idle too long."""

    class Request(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle(self) -> None:
            if drop_idle:
                self.handle_one_request()
            else:
                super().handle()

        def do_GET(self) -> None:
            status, headers, body = handler(self.headers.get("Range", ""))
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a read past its deadline): nothing to answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Request)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/repo"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_fetcher(
    tmp_path: Path,
    handler: Handler | None,
    body: Callable[[Fetcher], object],
    drop_idle: bool = False,
    **kw: object,
) -> None:
    async def main(url: str | None) -> None:
        cache = ChunkCache(tmp_path / "cache", 64 * CS)
        client = ConnectionPool() if url else None
        try:
            async with trio.open_nursery() as nursery:
                f = Fetcher(
                    nursery,
                    cache,
                    server_url=url,
                    client=client,
                    **kw,  # type: ignore[arg-type]
                )
                nursery.start_soon(f.run_writer)
                await body(f)  # type: ignore[misc]
                f.abort()
                await f.close(5)
                nursery.cancel_scope.cancel()
        finally:
            if client:
                client.close()
            cache.close()

    if handler is None:
        trio.run(main, None)
        return
    with http_server(handler, drop_idle=drop_idle) as url:
        trio.run(main, url)


def test_a_chunk_list_is_read_from_history_a_block_at_a_time() -> None:
    """Opening a 10 GiB file must not copy its 1.3 MB chunk list: a read needs 32 bytes."""
    from bkfs.source import DIGEST_BLOCK

    n = 2 * DIGEST_BLOCK + 5
    digests = os.urandom(32 * n)
    reads: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        reads.append((start, end))
        return digests[start:end]

    chunks = ChunkDigests(read, len(digests))
    assert chunks.digest(n - 1) == digests[-32:]
    assert reads == [(2 * DIGEST_BLOCK * 32, len(digests))]  # the last, short block only
    assert [chunks.digest(i) for i in range(n)] == [digests[i * 32 : i * 32 + 32] for i in range(n)]
    assert len(reads) == 3


class Pointers:
    """The part of a Source that opening an object uses: pointers that take ``delay`` seconds
    to load (as history on a slow disk), counted, and some that history lacks."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.loads: list[bytes] = []

    def pointer(self, pointer_id: bytes) -> Pointer:
        self.loads.append(pointer_id)
        time.sleep(self.delay)
        if pointer_id.startswith(b"gone"):
            raise ObjectMissing("no such pointer")
        return pointer(b"x" * CS, oid=pointer_id.ljust(32, b"\0"))

    def local_copies(self, oid: bytes) -> list[Path]:
        return []


def test_an_object_is_found_once_for_a_lookup_and_the_opens_that_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stat then open, or a file opened again: one pointer load.  Lookup hints are declined
    while AHEAD_LOADS are running, failures are not kept, and nothing is kept past the TTL."""
    monkeypatch.setattr(fetch, "OPENING_TTL", 0.3)
    src = Pointers(delay=0.05)

    async def body(f: Fetcher) -> None:
        hinted = f.opening(src, b"a", hint=True)  # type: ignore[arg-type]
        assert hinted is not None
        assert f.opening(src, b"a") is hinted  # the open that follows the lookup
        assert f.opening(src, b"b", hint=True) is not None
        assert f.opening(src, b"c", hint=True) is None  # two hinted loads are running
        opened = f.opening(src, b"c")  # an open is never declined
        assert opened is not None
        assert (await hinted.wait()).pointer.oid.startswith(b"a")
        assert await opened.wait()
        failed = f.opening(src, b"gone")
        assert failed is not None
        with pytest.raises(ObjectMissing):
            await failed.wait()
        assert f.opening(src, b"gone") is not failed  # a failure is tried again
        await trio.sleep(0.4)
        assert f.opening(src, b"a") is not hinted  # past the TTL: found afresh

    run_fetcher(tmp_path, None, body)
    assert sorted(src.loads) == [b"a", b"a", b"b", b"c", b"gone", b"gone"]


def test_concurrent_reads_of_one_chunk_share_one_request(tmp_path: Path) -> None:
    data = os.urandom(5 * CS + 10)
    log: list[str] = []
    obj = Obj(pointer(data), None, [])
    got: list[bytes] = []

    async def body(f: Fetcher) -> None:
        async with trio.open_nursery() as n:
            for k in range(10):
                n.start_soon(read_into, f, k)

    async def read_into(f: Fetcher, k: int) -> None:
        got.append(await f.read(obj, 2 * CS + k, 100, ReadAhead(next_off=-(10**9))))

    run_fetcher(tmp_path, served(data, log), body)
    assert log == [f"{2 * CS}-{3 * CS - 1}"]
    assert sorted(got) == sorted(data[2 * CS + k : 2 * CS + k + 100] for k in range(10))


def test_sequential_reader_gets_read_ahead_in_multi_chunk_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "REQUEST_BYTES", 8 * CS)  # requests are sized in bytes
    monkeypatch.setattr(fetch, "MAX_AHEAD_BYTES", 24 * CS)
    data = os.urandom(40 * CS)
    log: list[str] = []
    obj = Obj(pointer(data), None, [])

    async def body(f: Fetcher) -> None:
        ra = ReadAhead()
        out = bytearray()
        for off in range(0, len(data), CS // 2):
            out += await f.read(obj, off, CS // 2, ra)
        assert out == data
        assert f.stats.bytes_fetched == len(data)

    run_fetcher(tmp_path, served(data, log), body)
    assert len(log) < 40 / 2
    spans = [int(b) - int(a) + 1 for a, b in (r.split("-") for r in log)]
    assert max(spans) == 8 * CS


def test_corrupt_chunk_is_never_returned_nor_cached(tmp_path: Path) -> None:
    data = os.urandom(4 * CS)
    log: list[str] = []
    obj = Obj(pointer(data), None, [])

    async def body(f: Fetcher) -> None:
        with pytest.raises(ObjectCorrupt, match="does not match"):
            await f.read(obj, CS + 5, 10, ReadAhead(next_off=-(10**9)))
        with pytest.raises(ObjectCorrupt):  # remembered: no second request
            await f.read(obj, CS + 5, 10, ReadAhead(next_off=-(10**9)))
        assert await f.read(obj, 0, 10, ReadAhead(next_off=-(10**9))) == data[:10]

    run_fetcher(tmp_path, served(data, log, corrupt_at=CS + 100), body)
    assert len(log) == 2
    cache = ChunkCache(tmp_path / "cache")
    try:
        assert cache.get(chunk_key(b"\1" * 32, CS, CS)) is None
        assert cache.get(chunk_key(b"\1" * 32, 0, CS)) == data[:CS]
    finally:
        cache.close()


def test_a_connection_the_server_dropped_while_idle_costs_no_retry(tmp_path: Path) -> None:
    data = os.urandom(4 * CS)
    log: list[str] = []
    obj = Obj(pointer(data), None, [])

    async def body(f: Fetcher) -> None:
        assert await f.read(obj, 0, 10, ReadAhead(next_off=-(10**9))) == data[:10]
        await trio.sleep(0.05)  # the server has closed that connection by now
        t = trio.current_time()
        assert await f.read(obj, 3 * CS, 10, ReadAhead(next_off=-(10**9))) == data[3 * CS :][:10]
        assert trio.current_time() - t < 0.15  # no retry backoff (0.2 s)
        assert not f.stats.errors

    run_fetcher(tmp_path, served(data, log), body, drop_idle=True)
    assert log == [f"0-{CS - 1}", f"{3 * CS}-{4 * CS - 1}"]  # two requests, none retried


def test_a_hung_server_fails_the_read_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "READ_DEADLINE", 0.3)
    data = os.urandom(2 * CS)

    def hang(rng: str) -> tuple[int, dict[str, str], bytes]:
        time.sleep(1.5)  # far past the deadline; the abandoned thread then ends by itself
        return 503, {}, b""

    async def body(f: Fetcher) -> None:
        t = trio.current_time()
        with pytest.raises(ServerUnavailable, match=r"within 0\.3 s"):
            await f.read(Obj(pointer(data), None, []), 0, 10, ReadAhead())
        assert trio.current_time() - t < 2

    run_fetcher(tmp_path, hang, body)


def test_local_copy_first_and_offline_misses_fail_at_once(tmp_path: Path) -> None:
    data = os.urandom(3 * CS)
    own = tmp_path / "pool-object"
    own.write_bytes(data)
    damaged = tmp_path / "damaged-object"
    damaged.write_bytes(b"x" + data[1:])

    async def body(f: Fetcher) -> None:
        local = Fetcher.open_object(pointer(data), [own])
        assert await f.read(local, CS, CS, ReadAhead()) == data[CS : 2 * CS]
        bad = Fetcher.open_object(pointer(data), [damaged])
        assert bad.own == damaged
        with pytest.raises(ObjectMissing, match="offline"):
            await f.read(bad, 0, 10, ReadAhead())  # a corrupt copy is never served
        other = Obj(pointer(data, b"\2" * 32), None, [])
        with pytest.raises(ContentError):
            await f.read(other, 0, 10, ReadAhead())
        assert f.stats.requests == 0

    run_fetcher(tmp_path, None, body, offline=True)


def unreadable_chunk_list(data: bytes) -> Pointer:
    """The pointer of ``data`` whose chunk list can no longer be read from history."""

    def read(start: int, end: int) -> bytes:
        raise ObjectCorrupt("the chunk list of 0101… cannot be read: repository damaged")

    return Pointer(b"\1" * 32, len(data), CS, ChunkDigests(read, 32 * (len(data) // CS)))


def test_a_chunk_list_that_cannot_be_read_fails_the_read_not_the_mount(
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * CS)
    own = tmp_path / "pool-object"
    own.write_bytes(data)
    log: list[str] = []

    async def from_server(f: Fetcher) -> None:
        with pytest.raises(ObjectCorrupt, match="cannot be read"):
            await f.read(Obj(unreadable_chunk_list(data), None, []), 0, 10, ReadAhead())
        good = Obj(pointer(data, b"\2" * 32), None, [])
        assert await f.read(good, CS, 10, ReadAhead()) == data[CS : CS + 10]

    async def offline(f: Fetcher) -> None:
        bad = Fetcher.open_object(unreadable_chunk_list(data), [own])
        with pytest.raises(ObjectCorrupt, match="cannot be read"):
            await f.read(bad, 0, 10, ReadAhead())
        good = Fetcher.open_object(pointer(data), [own])
        assert await f.read(good, CS, 10, ReadAhead()) == data[CS : CS + 10]

    run_fetcher(tmp_path / "a", served(data, log), from_server)
    run_fetcher(tmp_path / "b", None, offline, offline=True)


def test_cache_evicts_least_recently_used_to_its_cap(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 3 * CS)
    try:
        keys = [chunk_key(bytes([i]) * 32, 0, CS) for i in range(5)]
        for k in keys[:3]:
            cache.update([(k, b"x" * CS)])
        cache.update(touches=[keys[0]])  # 0 is now newer than 1 and 2
        assert cache.update([(keys[3], b"y" * CS)]) == 1
        assert cache.present(keys) == {keys[0], keys[2], keys[3]}
        cache.update(removes=[keys[2]])
        u = cache.usage()
        assert (u.bytes, u.chunks, u.objects) == (2 * CS, 2, 2)
    finally:
        cache.close()


def resident_bytes(path: Path) -> int:
    """How much of a file the page cache holds (mincore(2) over a fresh read-only map)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
            return sum(b & 1 for b in vec) * mmap.PAGESIZE
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def test_cache_gives_back_the_page_cache_of_what_it_wrote_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache file is a disk cache: a mount's own page cache holds the hot copy, so the
    cache's pages are released every RELEASE_EVERY bytes of traffic (and still read back)."""
    from bkrepo import chunkcache

    cs = 1 << 18
    monkeypatch.setattr(chunkcache, "RELEASE_EVERY", 16 * cs)
    cache = ChunkCache(tmp_path, 1 << 30)
    try:
        data = tmp_path / "chunks" / "data.mdb"
        chunks = [(chunk_key(bytes([i]) * 32, 0, cs), os.urandom(cs)) for i in range(64)]
        for k in range(0, 64, 4):
            cache.update(chunks[k : k + 4])
        # At most what came after the last release, and the folio (up to 2 MiB) holding the
        # meta pages, which every transaction maps again: far below the 16 MiB written.
        assert resident_bytes(data) < 16 * cs + (2 << 20)
        assert all(cache.get(key) == value for key, value in chunks)
        assert resident_bytes(data) < 16 * cs + (2 << 20)
    finally:
        cache.close()


def test_bkr_uses_an_object_the_cache_holds_whole_in_any_recorded_chunk_size(
    tmp_path: Path,
) -> None:
    """Mounts cache chunks of the size history recorded for a file (1 MiB before 256 KiB
    became the default): bkr fills its pool from either, never from a partial set."""
    from bkrepo import objects as ob
    from bkrepo.bamflow import _cached_whole
    from bkrepo.ids import Oid

    size = 5 * ob.CHUNK_SIZE // 2 + 1000
    a, b, c = (bytes([n]) * 32 for n in (1, 2, 3))
    cache = ChunkCache(tmp_path, 1 << 30)
    try:
        for oid, cs in ((a, ob.CHUNK_SIZE), (b, 1 << 20)):
            cache.update(
                [(chunk_key(oid, off, min(cs, size - off)), b"x") for off in range(0, size, cs)]
            )
        cache.update([(chunk_key(c, 0, ob.CHUNK_SIZE), b"x")])  # the first chunk only
        assert _cached_whole(cache, Oid(a), size) == ob.CHUNK_SIZE
        assert _cached_whole(cache, Oid(b), size) == 1 << 20
        assert _cached_whole(cache, Oid(c), size) is None
    finally:
        cache.close()


WRITER = """
import os
import signal
import sys
from pathlib import Path
from bkrepo.chunkcache import ChunkCache, chunk_key
me = int(sys.argv[3])
cache = ChunkCache(Path(sys.argv[1]), int(sys.argv[2]), user=True, sync_at_commit=me % 2 == 0)
for i in range(200):
    cache.update([(chunk_key(bytes([me]) * 32, i * 4096, 4096), bytes([me]) * 4096)])
if sys.argv[4:] == ["die"]:
    os.kill(os.getpid(), signal.SIGKILL)  # no close: its commits are in the page cache only
cache.close()
"""


def test_cache_is_safe_with_several_processes(tmp_path: Path) -> None:
    cap = 300 * 4096
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(cap), str(me)])
        for me in range(4)
    ]
    for p in procs:
        assert p.wait(60) == 0
    cache = ChunkCache(tmp_path)
    try:
        u = cache.usage()
        assert u.bytes == u.chunks * 4096 == cap
        assert u.cap == cap
        with cache.env.begin() as txn:
            for k, v in txn.cursor(db=cache._data):
                assert bytes(v) == bytes(k[:1]) * 4096
        assert cache.clean() is True
    finally:
        cache.close()
    assert not (tmp_path / "chunks").exists()


BOOT = BOOT_ID.read_text().strip()
HOLDER = """
import sys
from pathlib import Path
from bkrepo.chunkcache import ChunkCache
cache = ChunkCache(Path(sys.argv[1]), user=True)
print("open", flush=True)
sys.stdin.readline()
cache.close()
"""


def test_deferred_commits_are_marked_until_the_cache_is_closed(tmp_path: Path) -> None:
    """A daemon's commits wait for no sync; a marker on disk says so while it runs, and its
    close puts them on disk and takes the marker away."""
    key, value = chunk_key(b"a" * 32, 0, 4096), os.urandom(4096)
    cache = ChunkCache(tmp_path, 1 << 30, user=True, sync_at_commit=False)
    try:
        assert os.listdir(tmp_path / "unsynced") == [f"{BOOT}.{os.getpid()}"]
        cache.update([(key, value)])
    finally:
        cache.close()
    assert os.listdir(tmp_path / "unsynced") == []
    cache = ChunkCache(tmp_path)
    try:
        assert cache.get(key) == value
    finally:
        cache.close()
    with pytest.raises(ValueError, match="only a user"):
        ChunkCache(tmp_path, sync_at_commit=False)


def test_a_process_that_dies_with_deferred_commits_loses_nothing(tmp_path: Path) -> None:
    """Killed before it closed the cache (same boot): the next opener syncs the file for it
    and takes its marker away; every chunk is there."""
    p = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), str(1 << 30), "5", "die"])
    assert p.returncode == -signal.SIGKILL
    [mark] = os.listdir(tmp_path / "unsynced")
    assert mark.startswith(BOOT + ".")
    cache = ChunkCache(tmp_path)
    try:
        assert os.listdir(tmp_path / "unsynced") == []
        assert cache.usage().chunks == 200
        assert cache.get(chunk_key(bytes([5]) * 32, 199 * 4096, 4096)) == bytes([5]) * 4096
    finally:
        cache.close()


def test_a_host_crash_with_deferred_commits_empties_the_cache(tmp_path: Path) -> None:
    """A marker from another boot: the host went down before those commits reached the disk,
    and the file may be torn.  The next opener that has the cache to itself starts it
    empty (it only held copies); one that finds the cache in use leaves it to its users."""
    key = chunk_key(b"b" * 32, 0, 4096)
    cache = ChunkCache(tmp_path)
    cache.update([(key, b"x" * 4096)])
    cache.close()
    # A daemon of this boot has the cache open already (another process: LMDB opens an
    # environment once per process).
    user = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert user.stdout is not None and user.stdout.readline() == b"open\n"
        (tmp_path / "unsynced").mkdir()
        (tmp_path / "unsynced" / "0b0e1d-another-boot.4242").touch()
        other = ChunkCache(tmp_path)
        try:
            assert other.get(key) == b"x" * 4096  # not settled by this opener
            assert os.listdir(tmp_path / "unsynced") == ["0b0e1d-another-boot.4242"]
        finally:
            other.close()
    finally:
        user.communicate(b"close\n", timeout=30)
    assert user.returncode == 0
    cache = ChunkCache(tmp_path)
    try:
        assert os.listdir(tmp_path / "unsynced") == []
        assert cache.get(key) is None
        assert cache.usage().chunks == 0
        cache.update([(key, b"y" * 4096)])  # and it works as before
        assert cache.get(key) == b"y" * 4096
    finally:
        cache.close()


def test_the_repo_engine_never_imports_bkfs() -> None:
    for path in (ROOT / "bkrepo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("bkfs", "pyfuse3"), f"{path} imports {name}"


def test_systemd_units_verify(tmp_path: Path) -> None:
    units = sorted((ROOT / "systemd").glob("*.service"))
    assert {u.name for u in units} == {"bkfs@.service", "bkr-serve.service"}
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # a fresh container: install it (Debian/Ubuntu, as root like CI)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "systemd"], capture_output=True, env=env, timeout=600
        )
        analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing and 'apt-get install systemd' did not provide it"
    for unit in units:
        shutil.copy(unit, tmp_path / unit.name)
    instance = tmp_path / "bkfs@game.service"
    os.symlink(tmp_path / "bkfs@.service", instance)
    p = subprocess.run(
        [analyze, "verify", str(tmp_path / "bkr-serve.service"), str(instance)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    problems = [line for line in p.stderr.splitlines() if "bkfs" in line or "bkr" in line]
    assert problems == [], p.stderr
