"""Inode numbers for an immutable tree whose directories load lazily, one tree object each.

A directory's entries are loaded the first time the kernel looks inside it, as one *block*
with a serial number; the inode of entry ``i`` of block ``s`` is ``s << 32 | i``.  So an inode
finds its entry in two dictionary-free steps (block by serial, entry by index), a directory
costs one decoded tree object and nothing per file beyond its entry, and mounting a tree of a
million files reads only the root's tree object before the first ``ls`` answers.  The root is
inode 1 (block 0 holds no entries).

A directory's subdirectories are decoded ahead: once a directory is loaded, a background task
reads and decodes the tree objects of its subdirectories (one worker thread, one tree at a
time), so a walk that goes on into them (``ls -R``, ``find``) finds them decoded instead of
waiting for a thread round trip per directory.  Only the children of directories actually
visited are read ahead, and what waits unused is bounded (:data:`AHEAD_ENTRIES`): the cost
still grows with what is visited, not with the tree.

Lookup counts (FUSE's contract: every entry returned by ``lookup`` or ``readdir`` is counted,
and the kernel later ``forget``\\ s them) are kept per block, as the sum over its entries plus
the directory handles open on it.  When a block's count falls to zero the kernel knows none of
its inodes, so the block is dropped; looking inside that directory again loads it afresh,
under the serial it had: a directory keeps its serial for the life of the mount (one number
per directory visited), so every file keeps its inode number, and listings the kernel still
caches (which carry inode numbers) never disagree with ``stat``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from bkfs.errors import SourceError
from bkfs.source import COMP, DIR, Entry, Source

ROOT_INO = 1
AHEAD_ENTRIES = 100_000  # entries of directories decoded ahead and not yet visited, at most
_SHIFT = 32
_INDEX = (1 << _SHIFT) - 1
DIR_MODE = 0o755


class UnknownInode(Exception):
    """The kernel named an inode this mount does not know (stale, or already forgotten)."""


@dataclass(frozen=True)
class RootEntry:
    """The mount's root directory, which no tree lists."""

    id: bytes
    mtime: int
    name: bytes = b""
    kind: str = DIR
    mode: int = DIR_MODE
    size: int = 0


class Block:
    """The loaded entries of one directory."""

    __slots__ = ("dir_ino", "entries", "path", "refs", "serial")

    def __init__(self, serial: int, dir_ino: int, path: bytes, entries: Sequence[Entry]) -> None:
        self.serial = serial
        self.dir_ino = dir_ino
        self.path = path
        self.entries = entries
        self.refs = 0

    def ino(self, index: int) -> int:
        return self.serial << _SHIFT | index

    def find(self, name: bytes) -> int | None:
        """The index of ``name`` (entries are sorted by name), or None."""
        i = bisect_left(self.entries, name, key=lambda e: e.name)
        return i if i < len(self.entries) and self.entries[i].name == name else None


class Tree:
    """The inode table of one mount."""

    def __init__(self, source: Source, root: RootEntry, nursery: trio.Nursery) -> None:
        self._source = source
        self.root = root
        self._nursery = nursery  # runs the read-ahead of subdirectories
        self._blocks: dict[int, Block] = {}  # serial -> the block, while loaded
        self._serials: dict[int, int] = {}  # directory inode -> its serial, once visited
        self._loading: dict[int, trio.Event] = {}
        self._ahead: dict[bytes, Sequence[Entry]] = {}  # tree id -> entries decoded ahead
        self._ahead_entries = 0
        self._ahead_pending: dict[bytes, trio.Event] = {}
        self._ahead_limiter = trio.CapacityLimiter(1)

    # -- finding -------------------------------------------------------------------------------
    def entry(self, ino: int) -> Entry:
        if ino == ROOT_INO:
            return self.root
        block = self._blocks.get(ino >> _SHIFT)
        index = ino & _INDEX
        if block is None or index >= len(block.entries):
            raise UnknownInode(ino)
        return block.entries[index]

    def parent(self, ino: int) -> int:
        if ino == ROOT_INO:
            return ROOT_INO
        block = self._blocks.get(ino >> _SHIFT)
        if block is None:
            raise UnknownInode(ino)
        return block.dir_ino

    def path(self, ino: int) -> bytes:
        """The path below the mount root (for messages and status)."""
        if ino == ROOT_INO:
            return b""
        block = self._blocks.get(ino >> _SHIFT)
        if block is None:
            raise UnknownInode(ino)
        name = self.entry(ino).name
        return block.path + b"/" + name if block.path else name

    async def children(self, dir_ino: int) -> Block:
        """The block of a directory, loading its tree object (in a thread) on first use;
        concurrent first uses share one load."""
        while True:
            block = self._blocks.get(self._serials.get(dir_ino, 0))
            if block is not None:
                return block
            loading = self._loading.get(dir_ino)
            if loading is None:
                break
            await loading.wait()
        entry = self.entry(dir_ino)
        if entry.kind != DIR and entry.kind != COMP:
            raise NotADirectoryError(dir_ino)
        done = self._loading[dir_ino] = trio.Event()
        try:
            entries: Sequence[Entry] = ()
            if entry.kind == DIR:
                entries = await self._decoded(entry.id)
            serial = self._serials.setdefault(dir_ino, len(self._serials) + 1)
            block = Block(serial, dir_ino, self.path(dir_ino), entries)
            self._blocks[serial] = block
        finally:
            del self._loading[dir_ino]
            done.set()
        subdirs = [e.id for e in entries if e.kind == DIR and e.id not in self._ahead]
        if subdirs and self._ahead_entries < AHEAD_ENTRIES:
            self._nursery.start_soon(self._read_ahead, subdirs)
        return block

    # -- read-ahead of subdirectories ----------------------------------------------------------
    async def _decoded(self, tree_id: bytes) -> Sequence[Entry]:
        """A directory's entries: decoded ahead (waiting for the read-ahead if it is on this
        one right now), else read and decoded in a worker thread."""
        pending = self._ahead_pending.get(tree_id)
        if pending is not None:
            await pending.wait()
        entries = self._ahead.pop(tree_id, None)
        if entries is not None:
            self._ahead_entries -= len(entries)
            return entries
        return await trio.to_thread.run_sync(self._source.tree, tree_id)

    async def _read_ahead(self, tree_ids: list[bytes]) -> None:
        """Decode these subdirectories' trees one by one in the background, while fewer than
        :data:`AHEAD_ENTRIES` entries wait unvisited."""
        for tree_id in tree_ids:
            if tree_id in self._ahead or tree_id in self._ahead_pending:
                continue
            if self._ahead_entries >= AHEAD_ENTRIES:
                return
            done = self._ahead_pending[tree_id] = trio.Event()
            try:
                entries = await trio.to_thread.run_sync(
                    self._source.tree, tree_id, limiter=self._ahead_limiter
                )
            except SourceError:
                continue  # damaged history: the visit that needs it reports it
            finally:
                del self._ahead_pending[tree_id]
                done.set()
            self._ahead[tree_id] = entries
            self._ahead_entries += len(entries)

    # -- lookup counts -------------------------------------------------------------------------
    def counted(self, ino: int) -> None:
        """The kernel now holds one more reference to ``ino`` (lookup, readdirplus)."""
        if ino != ROOT_INO:
            self._blocks[ino >> _SHIFT].refs += 1

    def forget(self, ino: int, n: int) -> None:
        if ino == ROOT_INO:
            return
        block = self._blocks.get(ino >> _SHIFT)
        if block is not None:
            self._release(block, n)

    def hold(self, block: Block) -> None:
        """An open directory handle keeps its block loaded."""
        block.refs += 1

    def unhold(self, block: Block) -> None:
        self._release(block, 1)

    def _release(self, block: Block, n: int) -> None:
        block.refs -= n
        if block.refs <= 0 and self._blocks.get(block.serial) is block:
            del self._blocks[block.serial]

    def loaded(self) -> tuple[int, int]:
        """Directories loaded and the entries they hold (for status)."""
        return len(self._blocks), sum(len(b.entries) for b in self._blocks.values())
