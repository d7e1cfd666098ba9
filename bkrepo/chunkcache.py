"""The shared chunk cache: one LMDB environment per user, used by every mount at once (and
read by ``bkr`` too: the pool search order of SPEC §1 puts it after the local pool).

``$XDG_CACHE_HOME/bkfs/chunks/`` (default ``~/.cache/bkfs``) holds verified copies of chunks
fetched from BAM servers, least recently used out when the bytes stored pass the cap.  It only
ever holds copies of data a server has, so dropping it (``bkfs cache clean``) loses nothing.

Several daemons share it safely because LMDB serialises write transactions across processes
(its lock file) and every change below — insert, touch, evict, and the running totals — happens
inside one write transaction.  Readers never block writers.  Each transaction opens and closes
inside one synchronous call (py-lmdb's thread rule); callers run these calls in worker threads.

Named databases (keys and values are bytes)::

    data   chunk key -> bytes          key = oid (32) + offset (8, BE) + length (4, BE)
    stamp  chunk key -> use stamp (8, BE)
    lru    use stamp -> chunk key      the oldest stamp is the next to go
    meta   b"bytes" total value bytes · b"clock" last stamp · b"cap" the cap last set

Bytes read back are verified against history by the caller before use, like any other source:
a damaged entry is a miss (and is deleted), never an answer.

A daemon holds a shared ``flock`` on ``users.lock`` while it runs, so ``bkfs cache clean`` can
tell whether it may delete the files (returning the disk space) or must empty them in place.

Commits and crashes.  By default every commit waits for its pages to reach the disk
(``fdatasync``; LMDB then writes the meta page that names them, so a crash may undo the last
commit but never damages the file).  A daemon instead opens the cache with
``sync_at_commit=False``: its commits only reach the page cache, which is what any process
reads, and the disk when the kernel writes them back, when the daemon closes the cache, or
when a later opener finds the daemon gone.  A cold read then no longer waits for the disk at
every transaction (the cache writer had set its pace).  A process that dies loses nothing
this way; a host that crashes (or loses power) before those pages are written may leave the
file torn, because the disk may then hold a meta page without the pages it names.  So while
such a cache is open, a marker ``unsynced/<boot id>.<pid>`` says so (on disk before the
first commit), and it is removed after the final sync.  Whoever opens the cache while nobody
else has it open settles what markers were left: from this boot (the process died), the file
is synced and the markers go; from another boot (the host went down first), the chunks are
dropped (they are only copies of data a server has) and the cache starts empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lmdb

from bkrepo.pool import fsync_dir

DEFAULT_CAP = 10 << 30
RELEASE_EVERY = 64 << 20  # bytes read or written between releases of the file's pages
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)
MAP_SIZE = 1 << 40  # address space only: without writemap the file grows with what is stored
_U64 = struct.Struct(">Q")
_KEY_TAIL = struct.Struct(">QI")
KEY_LEN = 32 + _KEY_TAIL.size
UNSYNCED = "unsynced"  # markers of processes whose commits may not be on disk yet
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str | None:
    """This boot's id: a marker written in another boot means the host went down since.
    None where the kernel does not say (then syncs are never deferred)."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _find_map(path: Path) -> int | None:
    """Where LMDB mapped ``path`` in this process (py-lmdb does not say)."""
    target = " " + str(path)
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip("\n").endswith(target):
                return int(line.split("-", 1)[0], 16)
    return None


def chunk_key(oid: bytes, offset: int, length: int) -> bytes:
    """The cache key of one chunk: the object and the exact byte range it covers."""
    return oid + _KEY_TAIL.pack(offset, length)


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/bkfs``, else ``~/.cache/bkfs``."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "bkfs"


@dataclass(frozen=True)
class Usage:
    bytes: int
    chunks: int
    objects: int
    cap: int
    file_bytes: int  # the LMDB file's size on disk (it never shrinks; freed pages are reused)


class ChunkCache:
    """An open handle on the shared cache.  All methods block; run them off the event loop."""

    def __init__(
        self,
        root: Path,
        cap: int | None = None,
        *,
        user: bool = False,
        sync_at_commit: bool = True,
    ) -> None:
        """Open (creating) the cache.  ``cap`` sets the byte cap this process evicts to and
        records it as the cache's cap; without it the recorded cap (else DEFAULT_CAP) holds.
        A ``user`` (a daemon) holds the cache until it exits: the shared lock comes first, so
        a ``clean`` running now finishes before the files open.  ``sync_at_commit=False``
        (users only) leaves commits to reach the disk later (module docstring)."""
        if not sync_at_commit and not user:
            raise ValueError("only a user of the cache may defer its syncs")
        boot = _boot_id()
        sync_at_commit = sync_at_commit or boot is None  # a host crash could not be told
        self.root = root
        self.path = root / "chunks"
        self.path.mkdir(parents=True, exist_ok=True)
        self._users_fd: int | None = None
        self._mark: Path | None = None
        fd = os.open(root / "users.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # others have it open: the first of them settled it
            else:
                self._settle(boot)
            if user:
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._users_fd, fd = fd, -1
        finally:
            if fd >= 0:
                os.close(fd)
        if not sync_at_commit:
            self._mark = self._put_mark(f"{boot}.{os.getpid()}")
        self.env = lmdb.open(
            str(self.path),
            map_size=MAP_SIZE,
            max_dbs=4,
            max_readers=1024,
            sync=sync_at_commit,
            metasync=False,  # a crash may undo the last fill but never damages the file
        )
        self._data = self.env.open_db(b"data")
        self._stamp = self.env.open_db(b"stamp")
        self._lru = self.env.open_db(b"lru")
        self._meta = self.env.open_db(b"meta")
        self._traffic = 0
        self._map: int | None = None
        with self.env.begin(write=cap is not None) as txn:
            if cap is not None:
                txn.put(b"cap", _U64.pack(cap), db=self._meta)
            stored = txn.get(b"cap", db=self._meta)
        self.cap = cap if cap is not None else (_U64.unpack(stored)[0] if stored else DEFAULT_CAP)

    # -- commits that reach the disk later -----------------------------------------------------
    def _settle(self, boot: str | None) -> None:
        """Nobody has the cache open (we hold ``users.lock`` exclusively): deal with the
        markers of processes that had deferred syncs and are gone (``boot``: this boot's
        id)."""
        marks = self.root / UNSYNCED
        try:
            names = os.listdir(marks)
        except FileNotFoundError:
            return
        if not names:
            return
        if boot is None or any(name.split(".", 1)[0] != boot for name in names):
            # The host went down before those commits reached the disk: the file may be
            # torn.  The cache holds only copies, so it starts again empty.
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
        else:
            # The processes died, not the host: their commits are in the page cache.
            try:
                data = os.open(self.path / "data.mdb", os.O_RDONLY)
            except FileNotFoundError:
                pass
            else:
                try:
                    os.fdatasync(data)
                finally:
                    os.close(data)
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marks / name)

    def _put_mark(self, name: str) -> Path:
        """Say, on disk, that this process's commits may not be there yet."""
        marks = self.root / UNSYNCED
        if not marks.is_dir():
            marks.mkdir(exist_ok=True)
            fsync_dir(self.root)
        mark = marks / name
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(marks)
        return mark

    def close(self) -> None:
        if self._mark is not None:
            self.env.sync(True)  # every deferred commit on disk: the marker may go
        self.env.close()
        if self._mark is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._mark)
            self._mark = None
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None

    # -- reading -------------------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        with self.env.begin(buffers=False) as txn:
            v = txn.get(key, db=self._data)
        if v is None:
            return None
        self._count_traffic(len(v))
        return bytes(v)

    def _count_traffic(self, n: int) -> None:
        self._traffic += n
        if self._traffic >= RELEASE_EVERY:
            self._traffic = 0
            self._release()

    def _release(self) -> None:
        """Give back the memory the cache file's pages take, once every
        :data:`RELEASE_EVERY` bytes this process read or wrote.

        First this process's mappings of them: reads go through LMDB's memory map, so every
        chunk read stays mapped (and counted in the daemon's RSS) until the kernel reclaims
        it, and writes leave pages mapped too (a cold read of 2 GiB left 61 MB resident).
        Safe at any time: the map is a read-only shared file mapping.

        Then the file's pages themselves (``POSIX_FADV_DONTNEED``; pages still mapped by
        another process, or dirty, stay).  A chunk the cache holds is read through a mount,
        whose own page cache keeps the hot copy: keeping a second copy in memory would double
        what every byte read costs in RAM, and writing the next chunks into pages just freed
        costs the kernel far less than into fresh ones (a cold read of 1 GiB spent ~3 s of
        system time filling fresh page-cache pages on this kind of VM, ~1 s reusing them).
        The tree's own pages go too and are read back from disk when next needed: a few
        pages per transaction."""
        data = self.path / "data.mdb"
        if self._map is None:
            self._map = _find_map(data)
        try:
            fd = os.open(data, os.O_RDONLY)
        except OSError:
            return
        try:
            if self._map is not None:
                length = os.fstat(fd).st_size
                _libc.madvise(ctypes.c_void_p(self._map), ctypes.c_size_t(length), _MADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def present(self, keys: Iterable[bytes]) -> set[bytes]:
        """Which of ``keys`` are stored (asking the stamps: touching the data reads it)."""
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self._stamp)
            return {k for k in keys if cur.set_key(k)}

    # -- writing -------------------------------------------------------------------------------
    def update(
        self,
        inserts: Iterable[tuple[bytes, bytes]] = (),
        touches: Iterable[bytes] = (),
        removes: Iterable[bytes] = (),
    ) -> int:
        """Insert verified chunks, mark chunks used, drop damaged ones, then evict least
        recently used chunks until the bytes stored fit the cap — all in one transaction.
        Returns the number of chunks evicted."""
        evicted = written = 0
        with self.env.begin(write=True) as txn:
            total = self._get_u64(txn, b"bytes")
            clock = self._get_u64(txn, b"clock")
            for key in removes:
                total -= self._delete(txn, key)
            for key, value in inserts:
                written += len(value)
                if txn.put(key, value, db=self._data, overwrite=False):
                    total += len(value)
                clock = self._touch(txn, key, clock)
            for key in touches:
                if txn.get(key, db=self._stamp) is not None:  # present; never read the data
                    clock = self._touch(txn, key, clock)
            if total > self.cap:
                cur = txn.cursor(db=self._lru)
                while total > self.cap and cur.first():
                    total -= self._delete(txn, bytes(cur.value()))
                    evicted += 1
            txn.put(b"bytes", _U64.pack(max(total, 0)), db=self._meta)
            txn.put(b"clock", _U64.pack(clock), db=self._meta)
        self._count_traffic(written)
        return evicted

    def clean(self) -> bool:
        """Drop every chunk.  Deletes the files (returning the disk space) when no daemon is
        using the cache and returns True; otherwise empties it in place and returns False."""
        fd = os.open(self.root / "users.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with self.env.begin(write=True) as txn:
                    for db in (self._data, self._stamp, self._lru):
                        txn.drop(db, delete=False)
                    txn.put(b"bytes", _U64.pack(0), db=self._meta)
                return False
            self.env.close()
            shutil.rmtree(self.path)
            return True
        finally:
            os.close(fd)

    def totals(self) -> tuple[int, int]:
        """Bytes and chunks stored, without walking the entries (for a running daemon:
        walking would map the whole file into its memory)."""
        with self.env.begin(buffers=True) as txn:
            return self._get_u64(txn, b"bytes"), int(txn.stat(self._data)["entries"])

    def usage(self) -> Usage:
        """Everything ``bkfs cache du`` shows (walks every key to count objects)."""
        with self.env.begin(buffers=True) as txn:
            total = self._get_u64(txn, b"bytes")
            chunks = int(txn.stat(self._data)["entries"])
            objects = 0
            last = b""
            # Walk the stamps (same keys, 8-byte values): walking the data would read it all.
            for k in txn.cursor(db=self._stamp).iternext(values=False):
                oid = bytes(k[:32])
                if oid != last:
                    objects += 1
                    last = oid
        try:
            file_bytes = (self.path / "data.mdb").stat().st_blocks * 512
        except FileNotFoundError:
            file_bytes = 0
        return Usage(total, chunks, objects, self.cap, file_bytes)

    # -- internals -----------------------------------------------------------------------------
    def _get_u64(self, txn: lmdb.Transaction, name: bytes) -> int:
        v = txn.get(name, db=self._meta)
        return _U64.unpack(bytes(v))[0] if v is not None else 0

    def _touch(self, txn: lmdb.Transaction, key: bytes, clock: int) -> int:
        old = txn.get(key, db=self._stamp)
        if old is not None:
            txn.delete(bytes(old), db=self._lru)
        clock += 1
        stamp = _U64.pack(clock)
        txn.put(key, stamp, db=self._stamp)
        txn.put(stamp, key, db=self._lru)
        return clock

    def _delete(self, txn: lmdb.Transaction, key: bytes) -> int:
        """Remove one chunk and its LRU records; the bytes it held (0 if absent).  The size
        comes from the key, so evicting never reads the chunk."""
        size = _KEY_TAIL.unpack(key[32:])[1] if txn.delete(key, db=self._data) else 0
        stamp = txn.get(key, db=self._stamp)
        if stamp is not None:
            txn.delete(bytes(stamp), db=self._lru)
            txn.delete(key, db=self._stamp)
        return size
