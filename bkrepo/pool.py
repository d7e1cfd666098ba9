"""The BAM pool: BAM objects as plain read-only files named by their SHA-256.

``.bk/bam/<first two hex digits>/<oid hex>``, mode 0444.  Because each object is one immutable
file, pools on one filesystem share objects by hardlink and any pool on local disk is readable
without a server.  The content-addressed store rules hold everywhere here: validate the id
before building a path; stream to a temp file on the same filesystem while hashing; verify,
fsync, rename; an existing object is a no-op; never hand out unverified bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import blake3

from bkrepo import objects as ob
from bkrepo.errors import ObjectCorrupt, ObjectMissing
from bkrepo.ids import Oid

if TYPE_CHECKING:
    from concurrent.futures import Future

READ_BLOCK = 4 << 20  # bytes per read while hashing/copying (a multiple of the chunk size)
_RING = 4  # read buffers in flight: bounds memory at RING * READ_BLOCK


def chunk_digest(data: bytes | memoryview) -> bytes:
    """The per-chunk digest recorded in chunk lists (BLAKE3-256)."""
    return blake3.blake3(data).digest()


class Hashed:
    """The result of hashing a stream: content oid, size and chunk digests."""

    def __init__(self, oid: Oid, size: int, chunk_digests: bytes, chunk_size: int) -> None:
        self.oid = oid
        self.size = size
        self.chunk_digests = chunk_digests
        self.chunk_size = chunk_size

    def pointer(self) -> tuple[ob.BamPointer, bytes]:
        """The pointer and the chunk-list payload to store with history."""
        chunks_id = ob.obj_id(ob.CHNK, self.chunk_digests)
        return ob.BamPointer(self.oid, self.size, self.chunk_size, chunks_id), self.chunk_digests


def hash_stream(
    src: BinaryIO,
    sink: Callable[[memoryview], object] | None = None,
    *,
    chunk_size: int = ob.CHUNK_SIZE,
    chunks: bool = True,
) -> Hashed:
    """Hash a stream (whole-content SHA-256 and per-chunk BLAKE3), optionally copying it.

    The SHA-256 runs on a second thread while this one reads, chunk-hashes and writes, so the
    whole pass costs about one SHA-256 of the data on a 2-core machine.  Both hash libraries
    release the GIL on large buffers.  Memory is bounded by a small ring of read buffers.
    Short reads (pipes, sockets) are fine: chunk boundaries are tracked across reads.
    """
    from concurrent.futures import ThreadPoolExecutor  # not at the top: status never hashes much

    sha = hashlib.sha256()
    digests = bytearray()
    size = 0
    ring = [bytearray(READ_BLOCK) for _ in range(_RING)]
    pending: list[Future[None] | None] = [None] * _RING
    part = blake3.blake3()
    part_len = 0
    with ThreadPoolExecutor(1) as ex:
        i = 0
        while True:
            fut = pending[i]
            if fut is not None:
                fut.result()
            buf = ring[i]
            n = src.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            view = memoryview(buf)[:n]
            pending[i] = ex.submit(sha.update, view)
            if chunks:
                off = 0
                while off < n:
                    take = min(chunk_size - part_len, n - off)
                    if part_len == 0 and take == chunk_size:
                        digests += chunk_digest(view[off : off + take])
                    else:
                        part.update(view[off : off + take])
                        part_len += take
                        if part_len == chunk_size:
                            digests += part.digest()
                            part, part_len = blake3.blake3(), 0
                    off += take
            if sink is not None:
                sink(view)
            size += n
            i = (i + 1) % _RING
        for fut in pending:
            if fut is not None:
                fut.result()
    if part_len:
        digests += part.digest()
    return Hashed(Oid(sha.digest()), size, bytes(digests), chunk_size)


def _write_all(fd: int) -> Callable[[memoryview], object]:
    def write(view: memoryview) -> None:
        while view:
            n = os.write(fd, view)
            view = view[n:]

    return write


class Pool:
    """One pool directory.  Methods are synchronous; callers run them off async loops."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        # Objects this process installed or hashed: checking out one of those again need
        # not re-read it (a clone verifies each object once, not once more per checkout).
        self._verified: set[Oid] = set()

    def path(self, oid: Oid) -> Path:
        h = oid.hex()
        return self.root / h[:2] / h

    def has(self, oid: Oid) -> bool:
        return self.path(oid).is_file()

    def size_of(self, oid: Oid) -> int | None:
        try:
            return self.path(oid).stat().st_size
        except FileNotFoundError:
            return None

    def oids(self) -> Iterable[Oid]:
        """Every object file present (names validated; strays ignored)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                name = f.name
                if len(name) == 64 and name.startswith(sub.name):
                    try:
                        yield Oid(bytes.fromhex(name))
                    except ValueError:
                        continue

    # -- writing -------------------------------------------------------------------------------
    def new_temp(self) -> tuple[int, Path]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        name = self.tmp / f"in.{os.getpid()}.{os.urandom(6).hex()}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return fd, name

    def install(self, tmp: Path, oid: Oid) -> Path:
        """fsync'd temp file -> read-only object file (a no-op if the object already exists)."""
        final = self.path(oid)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        if final.exists():
            tmp.unlink()
            return final
        os.rename(tmp, final)
        fsync_dir(final.parent)
        self._verified.add(oid)
        return final

    def ingest_file(self, src: Path) -> Hashed:
        """Copy a working file into the pool, computing its oid and chunk list on the way."""
        fd, tmp = self.new_temp()
        try:
            with open(src, "rb", buffering=0) as f:
                hashed = hash_stream(f, _write_all(fd))
            os.fsync(fd)
            os.close(fd)
            fd = -1
            self.install(tmp, hashed.oid)
            return hashed
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp.exists():
                tmp.unlink()

    def receive(self, oid: Oid, src: BinaryIO, *, where: str) -> Path:
        """Store an object read from ``src`` (another pool, a bundle, a server) after verifying it.

        A stream whose bytes do not hash to ``oid`` raises :class:`ObjectCorrupt` naming
        ``where`` and leaves the pool untouched.
        """
        if self.has(oid):
            return self.path(oid)
        fd, tmp = self.new_temp()
        try:
            hashed = hash_stream(src, _write_all(fd), chunks=False)
            if hashed.oid != oid:
                raise ObjectCorrupt(
                    f"BAM object {oid.hex()} from {where} is corrupt (its bytes hash to "
                    f"{hashed.oid.hex()[:16]}…); it was not installed",
                    oid,
                )
            os.fsync(fd)
            os.close(fd)
            fd = -1
            return self.install(tmp, oid)
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp.exists():
                tmp.unlink()

    def copy_from(self, other: Pool, oid: Oid, *, hardlink: bool = True) -> Path:
        """Bring an object from another local pool: a hardlink on one filesystem, else a copy;
        verified either way before it is installed.

        A hardlink shares the other pool's inode (objects are immutable and read-only), so a
        linked object costs no space, but it is still hashed first: a corrupt object in
        another pool must never enter this one.
        """
        if self.has(oid):
            return self.path(oid)
        src = other.path(oid)
        if not src.is_file():
            raise ObjectMissing(f"BAM object {oid.hex()} is not in the pool at {other.root}", oid)
        if hardlink:
            self.tmp.mkdir(parents=True, exist_ok=True)
            tmp = self.tmp / f"ln.{os.getpid()}.{os.urandom(6).hex()}"
            try:
                os.link(src, tmp)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
            else:
                try:
                    with open(tmp, "rb", buffering=0) as f:
                        if hash_stream(f, chunks=False).oid != oid:
                            raise ObjectCorrupt(
                                f"BAM object {oid.hex()} in the pool at {other.root} is corrupt; "
                                "it was not installed",
                                oid,
                            )
                    final = self.path(oid)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(tmp, final)
                    self._verified.add(oid)
                    return final
                finally:
                    tmp.unlink(missing_ok=True)
        with open(src, "rb", buffering=0) as f:
            return self.receive(oid, f, where=str(other.root))

    def verify(self, oid: Oid) -> bool:
        """Re-hash a local object: True if it is present and intact."""
        try:
            with open(self.path(oid), "rb", buffering=0) as f:
                ok = hash_stream(f, chunks=False).oid == oid
        except FileNotFoundError:
            return False
        if ok:
            self._verified.add(oid)
        return ok

    def remove(self, oid: Oid) -> None:
        try:
            self.path(oid).unlink()
        except FileNotFoundError:
            pass

    def copy_out(self, oid: Oid, dest: Path, mode: int) -> None:
        """Write an object's bytes to a working file (temp + rename), hashed on the way: a
        pool file that rotted or was changed in place (through a hardlink) is never checked
        out.  Objects this process already verified are copied by the kernel."""
        src = self.path(oid)
        if not src.is_file():
            raise ObjectMissing(f"BAM object {oid.hex()} is not in the local pool")
        import shutil  # here, not at the top: only checkouts of BAM files need it

        tmp = dest.with_name(f".{dest.name}.bkr-tmp{os.getpid()}")
        try:
            if oid in self._verified:
                shutil.copyfile(src, tmp)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    with open(src, "rb", buffering=0) as f:
                        got = hash_stream(f, _write_all(fd), chunks=False).oid
                finally:
                    os.close(fd)
                if got != oid:
                    raise self.corrupt(oid)
                self._verified.add(oid)
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()

    def verified_path(self, oid: Oid) -> Path:
        """The object's file, after checking its bytes (for readers that stream it out)."""
        if not self.has(oid):
            raise ObjectMissing(f"BAM object {oid.hex()} is not in the local pool")
        if oid not in self._verified and not self.verify(oid):
            raise self.corrupt(oid)
        return self.path(oid)

    def corrupt(self, oid: Oid) -> ObjectCorrupt:
        return ObjectCorrupt(
            f"BAM object {oid.hex()} in the local pool is corrupt (its bytes do not match its "
            "hash); run 'bkr bam repair'",
            oid,
        )

    def cleanup_tmp(self) -> None:
        """Drop temp files of writers that died (pid no longer running)."""
        if not self.tmp.is_dir():
            return
        for f in self.tmp.iterdir():
            parts = f.name.split(".")
            if len(parts) >= 2 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                f.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunks_of(digests: bytes) -> list[bytes]:
    return [digests[i : i + ob.DIGEST_LEN] for i in range(0, len(digests), ob.DIGEST_LEN)]
