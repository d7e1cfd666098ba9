"""History objects and their canonical encodings (pure: no I/O).

Every object in history is immutable and named by the SHA-256 of its canonical bytes
(:func:`bkrepo.ids.object_id`).  The encodings are fixed — sorted keys, integers only, ASCII
JSON with file names passed through ``surrogateescape`` — so the same content gives the same id
in every process on every machine.  That is what makes cset keys a pure function of content,
which partition and ``bam convert`` rely on to be deterministic.

Kinds of object and what they hold:

``blob``   the bytes of a non-BAM file, or a symlink's target.
``tree``   one directory: sorted entries ``[name, kind, mode, size, mtime, rootkey, id]``.
``bamp``   a BAM pointer: content oid (SHA-256), size, chunk size, chunk-list id.
``chnk``   a chunk list: the concatenated 32-byte BLAKE3 digests of fixed-size chunks.
``cset``   a changeset: parents, root tree, author, time, comment.
``tag``    a tag: name, target cset, author, time.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from bkrepo.ids import ObjectId, Oid, object_id, parse_object_id

# One byte per kind, stored in front of the payload in the object database.
BLOB, TREE, BAMP, CHNK, CSET, TAG = b"b", b"t", b"p", b"k", b"c", b"g"
KIND_NAMES = {
    BLOB: b"blob",
    TREE: b"tree",
    BAMP: b"bamp",
    CHNK: b"chnk",
    CSET: b"cset",
    TAG: b"tag",
}

# Tree entry kinds.
K_FILE = "f"  # regular file stored in history
K_BAM = "b"  # regular file whose bytes live in BAM pools/servers
K_LINK = "l"  # symbolic link; id names a blob holding the target
K_DIR = "d"  # directory; id names a tree
K_COMP = "c"  # component of a nested product; id names the component's cset
LEAF_KINDS = (K_FILE, K_BAM, K_LINK)
ALL_KINDS = (K_FILE, K_BAM, K_LINK, K_DIR, K_COMP)

# The unit a byte range is verified in, recorded per pointer.  256 KiB (IPFS's block size): a
# cold random read waits for, and transfers, a quarter of what 1 MiB chunks cost, and the chunk
# list stays 1/8192 of the file.  Files recorded before 2026-12-07 have 1 MiB chunks.
CHUNK_SIZE = 1 << 18
CHUNK_SIZES = (CHUNK_SIZE, 1 << 20)  # every chunk size bkr has recorded, newest first
CHUNK_ALG = "blake3"
DIGEST_LEN = 32


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def name_to_str(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def str_to_name(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def obj_id(kind: bytes, payload: bytes) -> ObjectId:
    return object_id(KIND_NAMES[kind], payload)


class TreeEntry(NamedTuple):
    """One name in a directory.  ``rootkey`` is empty for directories and components."""

    name: bytes
    kind: str
    mode: int
    size: int
    mtime: int
    rootkey: bytes
    id: bytes

    def same_content(self, other: TreeEntry) -> bool:
        """Equal as a user sees it: kind, mode and content, whatever the mtime."""
        return self.kind == other.kind and self.mode == other.mode and self.id == other.id


def encode_tree(entries: list[TreeEntry]) -> bytes:
    rows = [
        [name_to_str(e.name), e.kind, e.mode, e.size, e.mtime, e.rootkey.hex(), e.id.hex()]
        for e in sorted(entries, key=lambda e: e.name)
    ]
    return canonical_json(rows)


def decode_tree(payload: bytes) -> list[TreeEntry]:
    out = []
    for name, kind, mode, size, mtime, rk, oid in json.loads(payload):
        if kind not in ALL_KINDS:
            raise ValueError(f"bad tree entry kind {kind!r}")
        out.append(
            TreeEntry(
                str_to_name(name), kind, mode, size, mtime, bytes.fromhex(rk), bytes.fromhex(oid)
            )
        )
    return out


class BamPointer(NamedTuple):
    """What history records about a BAM file's content; enough to verify any byte range."""

    oid: Oid
    size: int
    chunk_size: int
    chunks: ObjectId  # id of the chunk-list object
    chunk_alg: str = CHUNK_ALG

    def encode(self) -> bytes:
        return canonical_json(
            {
                "chunk_alg": self.chunk_alg,
                "chunk_size": self.chunk_size,
                "chunks": self.chunks.hex(),
                "oid": self.oid.hex(),
                "size": self.size,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> BamPointer:
        d = json.loads(payload)
        return cls(
            oid=Oid(bytes.fromhex(d["oid"])),
            size=int(d["size"]),
            chunk_size=int(d["chunk_size"]),
            chunks=parse_object_id(d["chunks"]),
            chunk_alg=d["chunk_alg"],
        )

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk_size)


class Cset(NamedTuple):
    parents: tuple[ObjectId, ...]
    tree: ObjectId
    author: str
    time: int
    comment: str

    def encode(self) -> bytes:
        return canonical_json(
            {
                "author": self.author,
                "comment": self.comment,
                "parents": [p.hex() for p in self.parents],
                "time": self.time,
                "tree": self.tree.hex(),
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Cset:
        d = json.loads(payload)
        return cls(
            parents=tuple(parse_object_id(p) for p in d["parents"]),
            tree=parse_object_id(d["tree"]),
            author=d["author"],
            time=int(d["time"]),
            comment=d["comment"],
        )


class Tag(NamedTuple):
    name: str
    target: ObjectId
    author: str
    time: int

    def encode(self) -> bytes:
        return canonical_json(
            {
                "author": self.author,
                "name": self.name,
                "target": self.target.hex(),
                "time": self.time,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Tag:
        d = json.loads(payload)
        return cls(
            name=d["name"],
            target=parse_object_id(d["target"]),
            author=d["author"],
            time=int(d["time"]),
        )


def references(kind: bytes, payload: bytes) -> list[ObjectId]:
    """Ids an object points at inside history (used to check that a received set is closed)."""
    if kind == TREE:
        return [ObjectId(e.id) for e in decode_tree(payload) if e.kind != K_COMP]
    if kind == BAMP:
        return [BamPointer.decode(payload).chunks]
    if kind == CSET:
        c = Cset.decode(payload)
        return [c.tree, *c.parents]
    if kind == TAG:
        return [Tag.decode(payload).target]
    return []
