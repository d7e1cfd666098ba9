"""The one transfer format: local clones, HTTP sync and ``send``/``receive`` files all move
history as a stream of records.

On the wire (a file or an HTTP body)::

    b"BKBUNDLE 1\\n"
    H  u32 length, JSON header: project, tip, csets (oldest first), tags, needs
    O  u32 length, raw object (kind byte + canonical payload)     -- history objects
    B  32-byte oid, u64 size, the bytes                           -- BAM data (bundles, pushes)
    E                                                             -- end: a stream without it
                                                                     is truncated

Objects carry no id: the receiver computes each one from the bytes, so nothing unverified can
enter the store.  BAM data is hashed as it streams and rejected if it does not match its oid.
In-process transfers pass the same records as Python values without serialising them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from bkrepo import objects as ob
from bkrepo.errors import BundleError
from bkrepo.ids import ObjectId, Oid
from bkrepo.store import Txn

MAGIC = b"BKBUNDLE 1\n"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
MAX_HEADER = 256 << 20
MAX_OBJECT = 4 << 30


@dataclass
class Header:
    project: str
    tip: str | None  # hex key the receiver should end up containing
    csets: list[str] = field(default_factory=list)  # keys included, oldest first
    tags: list[str] = field(default_factory=list)  # tag object ids included
    needs: list[str] = field(default_factory=list)  # csets the receiver must already have

    def encode(self) -> bytes:
        return json.dumps(
            {
                "project": self.project,
                "tip": self.tip,
                "csets": self.csets,
                "tags": self.tags,
                "needs": self.needs,
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        try:
            d = json.loads(raw)
            return cls(d["project"], d["tip"], list(d["csets"]), list(d["tags"]), list(d["needs"]))
        except (ValueError, KeyError, TypeError) as e:
            raise BundleError(f"bad bundle header: {e}") from e


@dataclass
class BamRecord:
    """BAM data in a stream: ``stream`` yields exactly ``size`` bytes."""

    oid: Oid
    size: int
    stream: BinaryIO


Record = Header | bytes | BamRecord  # bytes = one raw history object


# -- what to send ------------------------------------------------------------------------------
def introduced(txn: Txn, cset: ob.Cset, seen: set[bytes]) -> Iterator[bytes]:
    """Ids of the objects a cset's tree has that none of its parents' trees have.

    Sending these for every missing cset (parents first) gives the receiver a closed history:
    whatever a cset refers to is either new here or present in a parent it already has.
    """
    parent_trees = [txn.cset(p).tree for p in cset.parents]
    yield from _tree_new(txn, cset.tree, parent_trees, seen)


def _tree_new(txn: Txn, tid: bytes, parents: list[bytes], seen: set[bytes]) -> Iterator[bytes]:
    if tid in parents or tid in seen:
        return
    seen.add(tid)
    yield tid
    pmaps = [txn.tree_map(p) for p in parents]
    for e in txn.tree(tid):
        olds = [m[e.name] for m in pmaps if e.name in m]
        if any(o.id == e.id for o in olds) or e.id in seen:
            continue
        if e.kind == ob.K_DIR:
            yield from _tree_new(txn, e.id, [o.id for o in olds if o.kind == ob.K_DIR], seen)
        elif e.kind == ob.K_COMP:
            continue  # component history travels with the component
        else:
            seen.add(e.id)
            yield e.id
            if e.kind == ob.K_BAM:
                chunks = txn.pointer(e.id).chunks
                if chunks not in seen:
                    seen.add(chunks)
                    yield chunks


def history_records(
    txn: Txn, csets: Iterable[ObjectId], tags: Iterable[ObjectId]
) -> Iterator[bytes]:
    """Raw objects for ``csets`` (oldest first) and the tag objects."""
    seen: set[bytes] = set()
    for key in csets:
        cset = txn.cset(key)
        for oid in introduced(txn, cset, seen):
            raw = txn.get_raw(oid)
            if raw is None:
                raise BundleError(f"repository damaged: object {oid.hex()[:16]} is missing")
            yield raw
        raw = txn.get_raw(key)
        assert raw is not None
        yield raw
    for tid in tags:
        raw = txn.get_raw(tid)
        if raw is not None:
            yield raw


# -- serialising -------------------------------------------------------------------------------
def write_stream(records: Iterable[Record], out: BinaryIO) -> None:
    for chunk in encode_records(records):
        out.write(chunk)


def encode_records(records: Iterable[Record]) -> Iterator[bytes]:
    """The wire form of a record stream, as byte chunks (for files and HTTP bodies)."""
    yield MAGIC
    for rec in records:
        if isinstance(rec, Header):
            raw = rec.encode()
            yield b"H" + _U32.pack(len(raw)) + raw
        elif isinstance(rec, BamRecord):
            yield b"B" + rec.oid + _U64.pack(rec.size)
            left = rec.size
            while left:
                chunk = rec.stream.read(min(left, 1 << 20))
                if not chunk:
                    raise BundleError(f"BAM object {rec.oid.hex()} ended early while sending")
                left -= len(chunk)
                yield chunk
        else:
            yield b"O" + _U32.pack(len(rec)) + rec
    yield b"E"


class _Limited:
    """A read-only view of the next ``size`` bytes of a stream (for BAM records)."""

    def __init__(self, src: BinaryIO, size: int) -> None:
        self.src = src
        self.left = size

    def readinto(self, buf: bytearray | memoryview) -> int:
        if not self.left:
            return 0
        view = memoryview(buf)[: min(len(buf), self.left)]
        n = self.src.readinto(view)  # type: ignore[attr-defined]
        if not n:
            raise BundleError("stream ended in the middle of a BAM object (truncated bundle)")
        self.left -= n
        return int(n)

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        data = self.src.read(n)
        if len(data) < n:
            raise BundleError("stream ended in the middle of a BAM object (truncated bundle)")
        self.left -= len(data)
        return data

    def drain(self) -> None:
        while self.left:
            self.read(min(self.left, 1 << 20))


def _read_exact(src: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            raise BundleError("stream ended early (truncated bundle or broken connection)")
        buf += chunk
    return bytes(buf)


def read_stream(src: BinaryIO) -> Iterator[Record]:
    """Parse a record stream.  A BAM record's stream must be consumed (or is skipped) before
    the next record is read.  Raises BundleError on anything malformed or truncated."""
    if _read_exact(src, len(MAGIC)) != MAGIC:
        raise BundleError("not a bkr bundle (bad magic)")
    while True:
        tag = _read_exact(src, 1)
        if tag == b"E":
            return
        if tag == b"H":
            (n,) = _U32.unpack(_read_exact(src, 4))
            if n > MAX_HEADER:
                raise BundleError("bundle header too large")
            yield Header.decode(_read_exact(src, n))
        elif tag == b"O":
            (n,) = _U32.unpack(_read_exact(src, 4))
            raw = _read_exact(src, n)
            if not raw or raw[:1] not in ob.KIND_NAMES:
                raise BundleError("bundle holds an object of unknown kind")
            yield raw
        elif tag == b"B":
            oid = Oid(_read_exact(src, 32))
            (size,) = _U64.unpack(_read_exact(src, 8))
            lim = _Limited(src, size)
            yield BamRecord(oid, size, lim)  # type: ignore[arg-type]
            lim.drain()
        else:
            raise BundleError(f"bundle has an unknown record type {tag!r}")
