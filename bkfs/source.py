"""Where a mount's tree and content come from: the :class:`Source` interface and its adapter
over a bkr repository.

The filesystem never touches the repository directly; it asks a ``Source`` for one directory
at a time (trees are stored one object per directory, so a mount of a million files reads one
object for its first ``ls``), for the bytes of small files, and for the pointer of a BAM file:
its oid, size and the chunk-hash list that history recorded, which is what lets any byte range
be verified without the rest of the object.

Every method is synchronous and may block (LMDB, disk): callers run them in worker threads.
:class:`RepoSource` opens each LMDB transaction inside one call, never across an ``await``
(py-lmdb's thread rule), and opens the repository read-only: a mount never writes to history.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bkfs.errors import ObjectCorrupt, SourceError
from bkrepo import bamflow, nested
from bkrepo import objects as ob
from bkrepo.errors import BkError
from bkrepo.repo import Repo, is_repo
from bkrepo.transport import is_url
from bkrepo.transport.credentials import auth_headers

# Kinds of tree entry: the letters bkr's trees use.
FILE = "f"  # bytes in history
BAM = "b"  # bytes in BAM pools and servers, fetched on first read
LINK = "l"  # symbolic link; id names a blob holding the target
DIR = "d"  # directory; id names a tree
COMP = "c"  # a product's record of a component (its files are listed in its place)
assert (FILE, BAM, LINK, DIR, COMP) == (ob.K_FILE, ob.K_BAM, ob.K_LINK, ob.K_DIR, ob.K_COMP)

DIGEST_LEN = ob.DIGEST_LEN
HOME_HINTS = 200_000  # object ids remembered as a component's (then forgotten all at once)


class Entry(Protocol):
    """One name in a directory, exactly as history recorded it (mtime in seconds)."""

    @property
    def name(self) -> bytes: ...
    @property
    def kind(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime(self) -> int: ...
    @property
    def id(self) -> bytes: ...


DIGEST_BLOCK = 1024  # digests read from history at a time (32 KiB of a chunk list)


@dataclass(eq=False)
class ChunkDigests:
    """A chunk list (one BLAKE3 digest per chunk), read from history a block at a time when
    a chunk of the block is first verified.  A 10 GiB file's list is 1.3 MB, and copying it
    whole when the file was opened cost a cold first read milliseconds, for the 32 bytes the
    read needs.  Blocks read stay (as much as the whole list, for a file read whole).

    ``read(start, end)`` returns bytes of the list; it blocks (worker threads only)."""

    read: Callable[[int, int], bytes]
    length: int  # bytes in the list
    _blocks: dict[int, bytes] = field(default_factory=dict, init=False, repr=False)

    def digest(self, index: int) -> bytes:
        b, k = divmod(index, DIGEST_BLOCK)
        block = self._blocks.get(b)
        if block is None:
            start = b * DIGEST_BLOCK * DIGEST_LEN
            block = self.read(start, min(start + DIGEST_BLOCK * DIGEST_LEN, self.length))
            # fetch threads verify chunks of one file side by side: two may read a block,
            # one keeps it (setdefault is atomic)
            block = self._blocks.setdefault(b, block)
        return block[k * DIGEST_LEN : (k + 1) * DIGEST_LEN]


@dataclass(frozen=True)
class Pointer:
    """A BAM file's content as history describes it: enough to verify every chunk alone."""

    oid: bytes  # SHA-256 of the whole content (the Git LFS object id)
    size: int
    chunk_size: int
    digests: ChunkDigests  # the last chunk may be short
    server: str | None = None  # its own BAM server (a component's), else the mount's

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def digest(self, index: int) -> bytes:
        """The digest of chunk ``index`` (may read history: worker threads only)."""
        return self.digests.digest(index)

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def chunks_in(self, nbytes: int) -> int:
        """How many of this object's chunks make up ``nbytes`` (at least one)."""
        return max(1, nbytes // self.chunk_size)


@dataclass(frozen=True)
class Origin:
    """What a mount shows and where its BAM bytes may be found."""

    repo: str  # the repository's root directory
    rev: str  # the revision as the user named it
    key: str  # the cset key it resolved to (hex)
    root_tree: bytes
    root_mtime: int  # newest mtime in the tree (a directory's mtime is the newest below it)
    server_url: str | None  # an http(s) BAM server, or None when every copy is on local disk


class Source(Protocol):
    origin: Origin

    def tree(self, tree_id: bytes) -> Sequence[Entry]:
        """The entries of one directory, sorted by name."""
        ...

    def blob(self, blob_id: bytes) -> bytes:
        """The bytes of a file or a symlink target stored in history."""
        ...

    def pointer(self, pointer_id: bytes) -> Pointer:
        """A BAM file's pointer with its chunk-hash list."""
        ...

    def local_copies(self, oid: bytes) -> list[Path]:
        """Files on local disk that may hold the object, in search order (unverified)."""
        ...

    def servers(self) -> list[str]:
        """Every http(s) BAM server the content may come from."""
        ...

    def server_headers(self, url: str) -> dict[str, str]:
        """Headers (credentials) to send to a BAM server."""
        ...

    def close(self) -> None: ...


@dataclass
class _Part:
    """One repository of what is mounted: the repository itself, or (in a product) one of its
    components, with where its BAM data may be."""

    repo: Repo
    pools: list[Path]  # local pool directories, own first
    server: str | None  # an http(s) BAM server


def _part(repo: Repo) -> _Part:
    with repo.store.read() as txn:
        ref = bamflow.get_server(txn)
        pools = repo.bam_pools(txn)
    dirs = [repo.pool.root, *(p.root for p in pools)]
    server = None
    if ref is not None and not ref.is_self:
        if is_url(ref.url):
            server = ref.url.rstrip("/")
        else:  # a server on local disk is read like any other pool
            path = Path(ref.url)
            dirs.append(path / ".bk" / "bam" if is_repo(path) else path)
    return _Part(repo, dirs, server)


class RepoSource:
    """A :class:`Source` over one revision of a bkr repository, opened read-only.

    A product is mounted with its components: each directory holding a component's record
    (nested.py) lists the files of the component's cset the product records, from the
    component's own repository when it is populated here (empty otherwise).  Objects are
    content addressed, so a tree, blob or pointer is read from whichever repository has it."""

    def __init__(self, root: Path, rev: str | None) -> None:
        try:
            self.repo = Repo(root.resolve(), readonly=True)
        except BkError as e:
            raise SourceError(str(e)) from None
        self._parts: list[_Part] = []
        self._by_project: dict[bytes, _Part] = {}
        self._home: dict[bytes, _Part] = {}  # object id -> the component whose tree named it
        try:
            with self.repo.store.read() as txn:
                key = self.repo.resolve(txn, rev or "+")
                tree = txn.cset(key).tree
                comps = nested.components(txn, tree) if nested.is_product_txn(txn) else {}
            main = _part(self.repo)
            self._parts.append(main)
            for path, e in sorted(comps.items()):
                croot = self.repo.root / os.fsdecode(path)
                if is_repo(croot):
                    part = _part(Repo(croot.resolve(), readonly=True))
                    self._parts.append(part)
                    self._by_project[e.rootkey] = part
            entries = self.tree(tree)
        except BkError as e:
            self.close()
            raise SourceError(str(e)) from None
        self._pool_dirs = [d for part in self._parts for d in part.pools]
        self.origin = Origin(
            repo=str(self.repo.root),
            rev=rev or "+",
            key=key.hex(),
            root_tree=tree,
            root_mtime=max((e.mtime for e in entries), default=0),
            server_url=main.server,
        )

    def _get(self, oid: bytes) -> tuple[_Part, bytes]:
        """An object's raw bytes, and the repository they came from: the one whose tree
        listed it first (a component's objects are not looked for in every repository of
        the product, one transaction each), then each in turn."""
        hint = self._home.get(oid)
        for part in ([hint] if hint is not None else []) + self._parts:
            with part.repo.store.read() as txn:
                raw = txn.get_raw(oid)
            if raw is not None:
                return part, raw
        raise SourceError(f"history is damaged: object {oid.hex()[:16]} is missing")

    def _listed(self, part: _Part, entries: Sequence[Entry]) -> None:
        """Remember where the objects a component's tree names are (bounded: a hint only)."""
        if part is self._parts[0]:
            return
        if len(self._home) > HOME_HINTS:
            self._home.clear()
        for e in entries:
            self._home[e.id] = part

    def _payload(self, oid: bytes, kind: bytes) -> tuple[_Part, bytes]:
        part, raw = self._get(oid)
        if raw[:1] != kind:
            raise SourceError(f"history is damaged: object {oid.hex()[:16]} has the wrong kind")
        return part, raw[1:]

    def tree(self, tree_id: bytes) -> Sequence[Entry]:
        try:
            part, payload = self._payload(tree_id, ob.TREE)
            entries = ob.decode_tree(payload)
        except (BkError, ValueError) as e:
            raise SourceError(f"history is damaged: tree {tree_id.hex()[:16]}: {e}") from None
        self._listed(part, entries)
        comp = next((e for e in entries if e.kind == COMP and e.name == nested.COMP), None)
        if comp is None:
            return entries
        return self._with_component(entries, comp)

    def _with_component(self, entries: list[ob.TreeEntry], comp: ob.TreeEntry) -> list[Entry]:
        """A product directory holding a component: the component's files at the cset the
        product records, and the product's own entries (nested components) beside them."""
        mine: dict[bytes, Entry] = {e.name: e for e in entries if e is not comp}
        part = self._by_project.get(comp.rootkey)
        if part is not None:
            try:
                with part.repo.store.read() as txn:
                    theirs = txn.tree(txn.cset(comp.id).tree)
            except BkError as e:
                raise SourceError(
                    f"component {part.repo.root}: lacks cset {comp.id.hex()[:12]}: {e}"
                ) from None
            self._listed(part, theirs)
            for e in theirs:
                mine.setdefault(e.name, e)
        return [mine[n] for n in sorted(mine)]

    def blob(self, blob_id: bytes) -> bytes:
        try:
            return self._payload(blob_id, ob.BLOB)[1]
        except BkError as e:
            raise SourceError(f"history is damaged: {e}") from None

    def pointer(self, pointer_id: bytes) -> Pointer:
        """A BAM file's pointer; its chunk list is checked (present, of the right length)
        but read a block at a time as chunks are verified (:class:`ChunkDigests`)."""
        try:
            part, payload = self._payload(pointer_id, ob.BAMP)
            ptr = ob.BamPointer.decode(payload)
            length = part.repo.store.object_part(ptr.chunks, ob.CHNK, 0, 0)[0]
        except (BkError, ValueError, KeyError) as e:
            raise SourceError(f"history is damaged: {e}") from None
        if ptr.chunk_alg != ob.CHUNK_ALG or ptr.chunk_size <= 0:
            raise SourceError(
                f"BAM object {ptr.oid.hex()} uses chunk hashing {ptr.chunk_alg!r}/"
                f"{ptr.chunk_size}, which this bkfs cannot verify; upgrade bkfs"
            )
        if length != ptr.nchunks * DIGEST_LEN:
            raise SourceError(
                f"history is damaged: the chunk list of {ptr.oid.hex()} has "
                f"{length // DIGEST_LEN} digests for {ptr.nchunks} chunks"
            )
        store, chunks, oid = part.repo.store, ptr.chunks, ptr.oid

        def read(start: int, end: int) -> bytes:
            try:
                return store.object_part(chunks, ob.CHNK, start, end)[1]
            except BkError as e:  # the repository changed under the mount
                raise ObjectCorrupt(f"the chunk list of {oid.hex()} cannot be read: {e}") from None

        return Pointer(ptr.oid, ptr.size, ptr.chunk_size, ChunkDigests(read, length), part.server)

    def local_copies(self, oid: bytes) -> list[Path]:
        h = oid.hex()
        return [d / h[:2] / h for d in self._pool_dirs]

    def servers(self) -> list[str]:
        """Every http(s) BAM server the mounted repositories name."""
        return sorted({p.server for p in self._parts if p.server})

    def server_headers(self, url: str) -> dict[str, str]:
        return auth_headers(url)

    def close(self) -> None:
        for part in self._parts[1:]:
            part.repo.close()
        self.repo.close()


def describe_rev(origin: Origin) -> str:
    """A short human name of what is mounted, for logs and messages."""
    short = origin.key[:12]
    return short if origin.rev in ("+", short) else f"{origin.rev} ({short})"


def fsname(origin: Origin) -> str:
    """The name shown as the mount's source in /proc/mounts (no spaces or commas)."""
    return "bkfs:" + os.path.basename(origin.repo).replace(",", "_").replace(" ", "_")
