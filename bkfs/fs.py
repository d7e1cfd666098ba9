"""The FUSE operations of a bkfs mount: the only place errno appears.

- A name a directory does not have → ENOENT; an inode the mount does not know → ESTALE.
- A read whose bytes are missing, corrupt or unavailable → EIO for that read only, with the
  reason logged and kept, with the file's path, for ``bkfs status``.
- Anything that would change the tree → EROFS (a revision's tree is immutable).

Only :class:`pyfuse3.FUSEError` may leave a handler; a real bug is logged with its traceback
and answered with EIO rather than taking the mount down.

Attributes and entries carry long timeouts, every open sets ``keep_cache`` (and ``noflush``:
a close costs no request) and directories have no handles (``KERNEL_KEEPS_LISTINGS``): a
revision never changes, so the kernel may keep names, attributes, listings and file pages for
as long as it likes, and warm reads and walks never reach the daemon.  Extended attributes are
not implemented (ENOSYS), so the kernel stops asking after the first try: ``ls -l`` would
otherwise cost a round trip per file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import pyfuse3
import trio

from bkfs.errors import BkfsError
from bkfs.fetch import Fetcher, Opening, ReadAhead
from bkfs.inodes import ROOT_INO, Block, Tree, UnknownInode
from bkfs.source import BAM, COMP, DIR, FILE, LINK, Entry, Source

log = logging.getLogger("bkfs")

TIMEOUT = 24 * 3600.0  # seconds the kernel may keep entries and attributes (immutable tree)
BLOCK_SIZE = 1 << 20  # st_blksize: tools size their reads by it
assert pyfuse3.ROOT_INODE == ROOT_INO
# With pyfuse3 as scripts/setup builds it (patches/pyfuse3-3.5.0-no-opendir-inode.patch),
# opendir answers ENOSYS: the kernel then sends no OPENDIR or RELEASEDIR at all and keeps each
# directory's listing (FOPEN_CACHE_DIR) for as long as it keeps the directory, so a warm walk
# never reaches the daemon; readdir gets the directory's inode instead of a handle.  Stock
# pyfuse3 gives readdir no way to tell directories apart then, so handles are used.
KERNEL_KEEPS_LISTINGS: bool = getattr(pyfuse3, "NO_OPENDIR_INODE_AS_FH", False)
# ... and an open file can say it needs no FLUSH at close (libfuse's ``noflush``, pyfuse3
# with patches/pyfuse3-3.5.0-open-noflush.patch): there is nothing to flush in a read-only
# tree, and the kernel would otherwise make the first close of every mount wait for a FLUSH
# round trip (it stops sending them only after one has answered ENOSYS).
NO_FLUSH_AT_CLOSE: bool = hasattr(pyfuse3.FileInfo(), "noflush")
OPEN_FLAGS: dict[str, bool] = {"keep_cache": True}
if NO_FLUSH_AT_CLOSE:
    OPEN_FLAGS["noflush"] = True

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errno(handler: F) -> F:
    """Map the domain's errors to errno at the edge; never let another exception escape."""

    @wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except UnknownInode:
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except BkfsError as e:
            log.warning("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("bug in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class Handle:
    """An open file: a BAM object (found in the background, waited for by each read) and its
    reader state, or history bytes."""

    ino: int
    opening: Opening | None = None
    data: bytes | None = None
    ra: ReadAhead | None = None


def _fill(a: pyfuse3.EntryAttributes, ino: int, e: Entry) -> pyfuse3.EntryAttributes:
    """Set the attributes that differ from entry to entry (the rest are the same for all)."""
    a.st_ino = ino
    kind = e.kind
    if kind in (DIR, COMP):
        a.st_mode = stat.S_IFDIR | (e.mode & 0o7777)
        size = 0
    elif kind == LINK:
        a.st_mode = stat.S_IFLNK | 0o777
        size = e.size
    else:
        a.st_mode = stat.S_IFREG | (e.mode & 0o7777)
        size = e.size
    a.st_size = size
    a.st_blocks = -(-size // 512)
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime * 1_000_000_000
    return a


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, source: Source, tree: Tree, fetcher: Fetcher) -> None:
        super().__init__()
        self.source = source
        self.tree = tree
        self.fetcher = fetcher
        self._files: dict[int, Handle] = {}
        self._dirs: dict[int, Block] = {}
        self._next_fh = 1
        self.listings_served = 0  # readdir requests answered (the kernel keeps listings)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._listed_attrs = self.attrs(ROOT_INO, tree.root)

    # -- attributes ----------------------------------------------------------------------------
    def attrs(self, ino: int, e: Entry) -> pyfuse3.EntryAttributes:
        """A new attributes object: pyfuse3 keeps it until the request's reply is sent."""
        a = pyfuse3.EntryAttributes()
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_nlink = 1  # a directory's too: 1 tells find(1) not to count subdirectories
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        a.st_blksize = BLOCK_SIZE
        return _fill(a, ino, e)

    @_errno
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(inode, self.tree.entry(inode))

    @_errno
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = self.tree.parent(parent_inode)
        else:
            block = await self.tree.children(parent_inode)
            index = block.find(name)
            if index is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            ino = block.ino(index)
        e = self.tree.entry(ino)
        if e.kind == BAM:  # a file named on its own is often opened next: find its object now
            self.fetcher.opening(self.source, e.id, hint=True)
        attrs = self.attrs(ino, e)
        self.tree.counted(ino)
        return attrs

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.tree.forget(ino, n)

    @_errno
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        e = self.tree.entry(inode)
        if e.kind != LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await trio.to_thread.run_sync(self.source.blob, e.id)

    # -- directories ---------------------------------------------------------------------------
    @_errno
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if KERNEL_KEEPS_LISTINGS:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        block = await self.tree.children(inode)
        self.tree.hold(block)
        fh = self._new_fh()
        self._dirs[fh] = block
        return fh

    @_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Without directory handles, fh is the directory's inode (see KERNEL_KEEPS_LISTINGS).
        block = await self.tree.children(fh) if KERNEL_KEEPS_LISTINGS else self._dirs[fh]
        self.listings_served += 1
        if start_id == 0:
            self.tree.read_ahead(block)
        # One attributes object for every entry: readdir_reply copies it into the reply.
        a = self._listed_attrs
        entries = block.entries
        n = 0
        for i in range(start_id, len(entries)):
            e = entries[i]
            if not pyfuse3.readdir_reply(token, e.name, _fill(a, block.ino(i), e), i + 1):
                break
            n += 1
        self.tree.counted_in(block, n)

    async def releasedir(self, fh: int) -> None:
        block = self._dirs.pop(fh, None)
        if block is not None:
            self.tree.unhold(block)

    # -- files ---------------------------------------------------------------------------------
    @_errno
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        e = self.tree.entry(inode)
        h = Handle(inode)
        if e.kind == BAM:
            h.opening = self.fetcher.opening(self.source, e.id)
            h.ra = ReadAhead()
        elif e.kind == FILE:
            h.data = await trio.to_thread.run_sync(self.source.blob, e.id)
        else:
            raise pyfuse3.FUSEError(errno.EISDIR if e.kind in (DIR, COMP) else errno.EINVAL)
        fh = self._new_fh()
        self._files[fh] = h
        return pyfuse3.FileInfo(fh=fh, **OPEN_FLAGS)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._files[fh]
        if h.data is not None:
            return h.data[off : off + size]
        assert h.opening is not None
        assert h.ra is not None
        try:
            obj = h.opening.peek() or await h.opening.wait()
            data = await self.fetcher.read(obj, off, size, h.ra)
        except BkfsError as e:  # the object cannot be read (or history is damaged)
            self._read_failed(h, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("bug in read")
            raise pyfuse3.FUSEError(errno.EIO) from None
        return data

    def _read_failed(self, h: Handle, e: BkfsError) -> None:
        try:
            path = os.fsdecode(self.tree.path(h.ino))
        except UnknownInode:
            path = f"inode {h.ino}"
        obj = h.opening.value if h.opening else None
        oid = obj.pointer.oid if obj else None
        if self.fetcher.stats.record_error(path, oid, str(e)):
            log.warning("read %s: %s", path, e)

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def open_files(self) -> int:
        return len(self._files)

    @_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_namemax = 255
        return s

    # -- changes: refused ----------------------------------------------------------------------
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)
