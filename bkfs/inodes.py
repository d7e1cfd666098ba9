"""Inode numbers for an immutable tree whose directories load lazily, one tree object each.

A directory's entries are loaded the first time the kernel looks inside it, as one *block*
with a serial number; the inode of entry ``i`` of block ``s`` is ``s << 32 | i``.  So an inode
finds its entry in two dictionary-free steps (block by serial, entry by index), a directory
costs one decoded tree object and nothing per file beyond its entry, and mounting a tree of a
million files reads only the root's tree object before the first ``ls`` answers.  The root is
inode 1 (block 0 holds no entries).

Lookup counts (FUSE's contract: every entry returned by ``lookup`` or ``readdir`` is counted,
and the kernel later ``forget``\\ s them) are kept per block, as the sum over its entries plus
the directory handles open on it.  When a block's count falls to zero the kernel knows none of
its inodes, so the block is dropped; looking inside that directory again loads it afresh with
new inode numbers.  Serials only grow, so an inode number is never reused.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from bkfs.source import COMP, DIR, Entry, Source

ROOT_INO = 1
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

    def __init__(self, source: Source, root: RootEntry) -> None:
        self._source = source
        self.root = root
        self._blocks: dict[int, Block] = {}
        self._dir_blocks: dict[int, int] = {}  # directory inode -> serial of its block
        self._loading: dict[int, trio.Event] = {}
        self._next_serial = 1

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
            serial = self._dir_blocks.get(dir_ino)
            if serial is not None:
                return self._blocks[serial]
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
                entries = await trio.to_thread.run_sync(self._source.tree, entry.id)
            block = Block(self._next_serial, dir_ino, self.path(dir_ino), entries)
            self._next_serial += 1
            self._blocks[block.serial] = block
            self._dir_blocks[dir_ino] = block.serial
            return block
        finally:
            del self._loading[dir_ino]
            done.set()

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
            if self._dir_blocks.get(block.dir_ino) == block.serial:
                del self._dir_blocks[block.dir_ino]

    def loaded(self) -> tuple[int, int]:
        """Directories loaded and the entries they hold (for status)."""
        return len(self._blocks), sum(len(b.entries) for b in self._blocks.values())
