"""Inode numbers for an immutable tree whose directories load lazily, one tree object each.

A directory's entries are loaded the first time the kernel looks inside it, as one *block*
with a serial number; the inode of entry ``i`` of block ``s`` is ``s << 32 | i``.  So an inode
finds its entry in two dictionary-free steps (block by serial, entry by index), a directory
costs one decoded tree object and nothing per file beyond its entry, and mounting a tree of a
million files reads only the root's tree object before the first ``ls`` answers.  The root is
inode 1 (block 0 holds no entries).

A directory's subdirectories are decoded ahead: when a directory is listed, a background task
reads and decodes the tree objects of its subdirectories (one worker thread, one tree at a
time), so a walk that goes on into them (``ls -R``, ``find``) finds them decoded instead of
waiting for a thread round trip per directory.  Only the children of the directory listed last
are read ahead (a path looked up name by name reads none), and only one directory waits
unvisited (:data:`AHEAD_ENTRIES`): the cost still grows with what is visited, not with the
tree.

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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from bkfs.errors import SourceError
from bkfs.source import COMP, DIR, Entry, Source

ROOT_INO = 1
# What waits decoded and not yet visited, at most: one directory (of any size), the next one
# a depth-first walk enters.  Reading further ahead made the first `ls -lR` of 100,000 files
# slower, not faster (8 runs each: 0.89 s with one, 0.91 s with up to 1,000 entries, 1.01 s
# with up to 8,000): decoding competes for the GIL with the listings the daemon is serving.
AHEAD_ENTRIES = 1
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
        # Read-ahead: tree id -> (the listing it was read for, its entries), oldest first
        self._ahead: dict[bytes, tuple[int, Sequence[Entry]]] = {}
        self._ahead_entries = 0
        self._ahead_pending: dict[bytes, trio.Event] = {}  # tree id -> done, while decoding
        self._ahead_queue: deque[bytes] = deque()  # the newest listing's subdirectories to do
        self._ahead_generation = 0  # listings so far
        self._ahead_room = trio.Event()  # set when a visit or a listing may make room
        self._ahead_running = False

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
        return block

    # -- read-ahead of subdirectories ----------------------------------------------------------
    async def _decoded(self, tree_id: bytes) -> Sequence[Entry]:
        """A directory's entries: decoded ahead (waiting for the read-ahead if it is on this
        one right now), else read and decoded in a worker thread."""
        pending = self._ahead_pending.get(tree_id)
        if pending is not None:
            await pending.wait()
        got = self._ahead.pop(tree_id, None)
        if got is None:
            return await trio.to_thread.run_sync(self._source.tree, tree_id)
        self._ahead_entries -= len(got[1])
        self._ahead_room.set()
        return got[1]

    def read_ahead(self, block: Block) -> None:
        """A directory is being listed: decode its subdirectories next, in the background.
        The subdirectories of the directory listed before it that are still to do are
        forgotten, and those already decoded make room for these (a depth-first walk lists
        a directory, then its subdirectories: the newest listing with subdirectories is where
        it goes next)."""
        subdirs = deque(e.id for e in block.entries if e.kind == DIR)
        if not subdirs:
            return  # a leaf: the walk goes on with its siblings, still queued
        self._ahead_generation += 1
        self._ahead_queue = subdirs
        self._ahead_room.set()
        if not self._ahead_running:
            self._ahead_running = True
            self._nursery.start_soon(self._read_ahead)

    async def _read_ahead(self) -> None:
        """Decode the queued trees one by one while the newest listing's decoded entries fit
        in :data:`AHEAD_ENTRIES`; wait for visits (or a newer listing) to make room."""
        try:
            while self._ahead_queue:
                generation = self._ahead_generation
                while self._ahead_entries >= AHEAD_ENTRIES:
                    oldest = next(iter(self._ahead))
                    gen, entries = self._ahead[oldest]
                    if gen == generation:
                        break
                    del self._ahead[oldest]  # decoded for an older listing, never visited
                    self._ahead_entries -= len(entries)
                if self._ahead_entries >= AHEAD_ENTRIES:
                    self._ahead_room = trio.Event()
                    await self._ahead_room.wait()
                    continue
                tree_id = self._ahead_queue.popleft()
                if tree_id in self._ahead or tree_id in self._ahead_pending:
                    continue
                done = self._ahead_pending[tree_id] = trio.Event()
                try:
                    entries = await trio.to_thread.run_sync(self._source.tree, tree_id)
                except SourceError:
                    continue  # damaged history: the visit that needs it reports it
                finally:
                    del self._ahead_pending[tree_id]
                    done.set()
                self._ahead[tree_id] = (generation, entries)
                self._ahead_entries += len(entries)
        finally:
            self._ahead_running = False

    # -- lookup counts -------------------------------------------------------------------------
    def counted(self, ino: int) -> None:
        """The kernel now holds one more reference to ``ino`` (lookup, readdirplus)."""
        if ino != ROOT_INO:
            self._blocks[ino >> _SHIFT].refs += 1

    def counted_in(self, block: Block, n: int) -> None:
        """The kernel now holds one more reference to each of ``n`` entries of ``block``
        (a readdirplus reply)."""
        block.refs += n

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

    def decoded_ahead(self) -> tuple[int, int]:
        """Directories decoded ahead and not yet visited, and their entries (for status)."""
        return len(self._ahead), self._ahead_entries
