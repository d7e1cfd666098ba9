"""The mount daemon: one process per mount, started fresh (never forked from a process that
opened LMDB), serving FUSE requests, the control channel and the cache writer on one trio loop.

Lifecycle::

    check the mountpoint (clean a stale one) → open the repository (read-only) → open the
    shared cache → bind the control socket → mount → serve until unmounted or signalled →
    fail waiting reads → flush the cache writer → unmount → close the cache and repository

Readiness: once the mountpoint answers a ``stat`` (served by this loop, so it proves the
mount works) the daemon writes ``ready`` to the file descriptor ``bkfs mount`` gave it and
tells systemd ``READY=1`` (``Type=notify``).  SIGTERM, SIGINT and SIGHUP unmount cleanly;
an external ``umount`` ends the loop the same way.

Everything runs in one nursery owned here: pyfuse3's request tasks, the fetcher's fetch tasks,
the cache writer, the control server and the signal watcher.  Blocking work goes to worker
threads from the components themselves.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gc
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import pyfuse3
import trio

from bkfs import control
from bkfs.errors import BkfsError, MountError
from bkfs.fetch import ConnectionPool, Fetcher
from bkfs.fs import KERNEL_KEEPS_LISTINGS, NO_FLUSH_AT_CLOSE, Operations
from bkfs.inodes import RootEntry, Tree
from bkfs.source import BAM, DIR, Entry, RepoSource, Source, describe_rev, fsname
from bkrepo import malloc
from bkrepo.chunkcache import ChunkCache
from bkrepo.sdnotify import notify as sd_notify

log = logging.getLogger("bkfs")

READ_AHEAD_KB = 1024  # the kernel's largest FUSE read; 8x fewer round trips than its default
FLUSH_TIMEOUT = 10.0  # seconds to finish cache writes when unmounting
PREFETCH_FILES = 2  # objects prefetched at once (each keeps several requests in flight)


@dataclass(frozen=True)
class MountOptions:
    repo: Path
    mountpoint: Path
    rev: str | None
    cache_dir: Path
    cache_size: int | None  # None: the cap the cache records
    offline: bool
    ready_fd: int | None = None  # where ``bkfs mount`` waits for "ready" or "error ..."


class Readiness:
    """Tells whoever started the daemon that the mount answers (or why it never will)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ready(self, status: str) -> None:
        self._send(b"ready\n")
        sd_notify(f"READY=1\nSTATUS={status}")

    def failed(self, message: str) -> None:
        self._send(b"error " + message.replace("\n", " ").encode() + b"\n")

    def _send(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
            os.close(self._fd)
        except OSError:
            pass  # the starter went away; nothing to tell
        self._fd = None


# The cyclic collector's thresholds (young, middle, old generations).  A walk creates an entry
# object per file and keeps it while the kernel knows the file: with Python's defaults
# (700, 10, 10) a first `ls -lR` of 100,000 files ran ~140 young and ~12 middle collections
# and two full ones (45 ms together, each traversing every entry).  Collecting the young
# every 10,000 allocations and the old ten times less often took ~3 % off that walk (8
# walks each: 0.754 s against 0.776 s); cycles (trio's exceptions make some) are still
# collected young.
GC_THRESHOLDS = (10_000, 10, 100)


def run(opts: MountOptions) -> None:
    """Mount and serve until unmounted or signalled.  Raises BkfsError when the mount could
    not be made (after telling the starter why)."""
    malloc.tame()
    gc.set_threshold(*GC_THRESHOLDS)
    readiness = Readiness(opts.ready_fd)
    try:
        prepare_mountpoint(opts.mountpoint)
        source = RepoSource(opts.repo, opts.rev)
        try:
            try:
                # Commits wait for no sync (a process crash loses nothing; a host crash
                # empties the cache at the next open): the writer had set a cold read's pace.
                cache = ChunkCache(opts.cache_dir, opts.cache_size, user=True, sync_at_commit=False)
            except (lmdb.Error, OSError) as e:
                raise MountError(f"cannot open the cache at {opts.cache_dir}: {e}") from e
            try:
                daemon = Daemon(opts, source, cache, readiness)
                try:
                    trio.run(daemon.main)
                except BaseExceptionGroup as eg:
                    raise _first_domain_error(eg) from None
                finally:
                    if daemon.mounted:
                        # After an external umount the path may already hold a new mount:
                        # take down ours only if it is still there.
                        pyfuse3.close(unmount=not daemon.unmounted)
                        log.info("unmounted %s", opts.mountpoint)
            finally:
                cache.close()
        finally:
            source.close()
    except BkfsError as e:
        readiness.failed(str(e))
        raise


def _first_domain_error(eg: BaseExceptionGroup) -> BaseException:
    """Nurseries wrap failures in groups; a user-facing failure is reported as itself."""
    for e in _leaves(eg):
        if isinstance(e, BkfsError):
            return e
    return eg


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def prepare_mountpoint(mnt: Path) -> None:
    """Refuse a mountpoint in use; clean one left stale by a daemon that died ("Transport
    endpoint is not connected"), so a crash never needs a manual force-unmount."""
    m = control.mount_at(mnt)
    if m is not None and m.fstype == control.FSTYPE:
        if _daemon_answers(mnt):
            raise MountError(f"{mnt}: already a bkfs mount; run 'bkfs umount {mnt}' first")
        _clean_stale(mnt)
    elif m is not None:
        try:
            os.stat(mnt)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise MountError(f"{mnt}: {e.strerror}") from None
            _clean_stale(mnt)
        else:
            raise MountError(f"{mnt}: already a mount point ({m.fstype}); unmount it first")
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise MountError(f"{mnt}: no such directory; create it first") from None
    except OSError as e:
        raise MountError(f"{mnt}: {e.strerror}") from None
    if not os.path.isdir(mnt) or not st.st_mode & 0o040000:
        raise MountError(f"{mnt}: not a directory")


def _daemon_answers(mnt: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(control.address(mnt))
        except OSError:
            return False
    return True


def _clean_stale(mnt: Path) -> None:
    log.warning("%s: cleaning a stale mount left by a daemon that died", mnt)
    p = subprocess.run(
        ["fusermount3", "-u", "-z", str(mnt)], capture_output=True, text=True, timeout=30
    )
    if p.returncode != 0:
        raise MountError(f"{mnt}: cannot clean a stale mount: {p.stderr.strip()}")


def set_read_ahead(dev: int) -> None:
    """Raise the mount's read-ahead so the kernel asks for 1 MiB per read, not 128 KiB."""
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(READ_AHEAD_KB))
    except OSError as e:
        log.info("could not raise read-ahead at %s (%s); reads stay 128 KiB", path, e)


class Daemon:
    def __init__(
        self, opts: MountOptions, source: Source, cache: ChunkCache, readiness: Readiness
    ) -> None:
        self.opts = opts
        self.source = source
        self.cache = cache
        self.readiness = readiness
        self.mounted = False
        self.terminated = False  # we ended the FUSE loop (a signal)
        self.unmounted = False  # the FUSE loop ended because someone unmounted us
        self.started = time.time()
        self._nursery: trio.Nursery
        self.fetcher: Fetcher | None = None
        self.client: ConnectionPool | None = None
        self.ops: Operations | None = None

    async def main(self) -> None:
        origin = self.source.origin
        use_server = bool(self.source.servers()) and not self.opts.offline
        client = self.client = ConnectionPool() if use_server else None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._signals)  # from here a signal stops us cleanly
                await nursery.start(control.serve, self.opts.mountpoint, self.handle)
                fetcher = self.fetcher = Fetcher(
                    nursery,
                    self.cache,
                    server_url=origin.server_url,
                    client=client,
                    offline=self.opts.offline,
                    headers=self.source.server_headers,
                )
                tree = Tree(self.source, RootEntry(origin.root_tree, origin.root_mtime), nursery)
                ops = self.ops = Operations(self.source, tree, fetcher)
                options = {"fsname=" + fsname(origin), "subtype=bkfs", "default_permissions", "ro"}
                try:
                    pyfuse3.init(ops, str(self.opts.mountpoint), options)
                except RuntimeError as e:
                    raise MountError(f"cannot mount on {self.opts.mountpoint}: {e}") from None
                self.mounted = True
                nursery.start_soon(fetcher.run_writer)
                nursery.start_soon(self._announce)
                try:
                    await pyfuse3.main()
                    self.unmounted = not self.terminated  # the loop ended: umount by someone
                finally:
                    fetcher.abort()
                    with trio.CancelScope(shield=True):
                        await fetcher.close(FLUSH_TIMEOUT)
                    nursery.cancel_scope.cancel()
        finally:
            if client is not None:
                client.close()

    def stop(self, why: str) -> None:
        """Unmount: fail waiting reads at once, then end the FUSE loop (before the mount
        exists: just stop starting)."""
        log.info("%s: unmounting %s", why, self.opts.mountpoint)
        sd_notify("STOPPING=1")
        self.terminated = True
        if not self.mounted:
            self._nursery.cancel_scope.cancel()
            return
        if self.fetcher is not None:
            self.fetcher.abort()
        pyfuse3.terminate()

    async def _signals(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            task_status.started()
            async for signum in sigs:
                self.stop(signal.Signals(signum).name)
                return

    async def _announce(self) -> None:
        mnt = self.opts.mountpoint
        try:
            # Abandoned if we stop first: the stat then waits on a loop that no longer runs,
            # until the unmount ends it.
            st = await trio.to_thread.run_sync(os.stat, mnt, abandon_on_cancel=True)
        except OSError as e:
            message = f"the mount at {mnt} does not answer: {e.strerror}"
            log.error("%s", message)
            self.readiness.failed(message)
            self.stop("not answering")
            return
        await trio.to_thread.run_sync(set_read_ahead, st.st_dev)
        if self.client is not None:
            # The first cold read then skips the connect and the server's new-connection
            # setup (~1-2 ms of a ~5 ms first byte); no request is sent.
            for url in self.source.servers():
                self._nursery.start_soon(
                    partial(
                        trio.to_thread.run_sync, self.client.preconnect, url, abandon_on_cancel=True
                    )
                )
        origin = self.source.origin
        what = f"{origin.repo} at {describe_rev(origin)}"
        log.info("mounted %s on %s (pid %d)", what, mnt, os.getpid())
        if not KERNEL_KEEPS_LISTINGS:
            log.info(
                "this pyfuse3 cannot let the kernel keep directory listings (scripts/setup "
                "builds one that can): every listing is served by the daemon"
            )
        if not NO_FLUSH_AT_CLOSE:
            log.info(
                "this pyfuse3 cannot open files without a flush at close (scripts/setup "
                "builds one that can): the first close of the mount waits for a FLUSH"
            )
        self.readiness.ready(f"serving {what}")

    # -- control requests ----------------------------------------------------------------------
    async def handle(self, request: dict[str, Any], send: control.Send) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return await self.status()
        if op == "prefetch":
            globs = request.get("globs")
            if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
                raise MountError("prefetch: expected a list of globs")
            return await self.prefetch(globs, send)
        raise MountError(f"unknown request {op!r}")

    async def status(self) -> dict[str, Any]:
        assert self.fetcher is not None
        assert self.ops is not None
        origin = self.source.origin
        s = self.fetcher.stats
        try:
            stored, chunks = await trio.to_thread.run_sync(self.cache.totals)
            cache: dict[str, Any] = {"bytes": stored, "chunks": chunks}
        except lmdb.Error as e:
            cache = {"error": str(e)}
        dirs, entries = self.ops.tree.loaded()
        ahead_dirs, ahead_entries = self.ops.tree.decoded_ahead()
        return {
            "mountpoint": str(self.opts.mountpoint),
            "repo": origin.repo,
            "rev": origin.key,
            "rev_name": origin.rev,
            "server": origin.server_url,
            "offline": self.opts.offline,
            "pid": os.getpid(),
            "started": self.started,
            "bam_bytes_fetched": s.bytes_fetched,
            "bam_objects_fetched": len(s.objects_fetched),
            "server_requests": s.requests,
            "cache_hits": s.cache_hits,
            "memory_hits": s.memory_hits,
            "pool_reads": s.pool_reads,
            "bytes_served": s.bytes_served,
            "open_files": self.ops.open_files(),
            "fetches_in_flight": self.fetcher.inflight(),
            "dirs_loaded": dirs,
            "entries_loaded": entries,
            "read_ahead": {"dirs": ahead_dirs, "entries": ahead_entries},
            "listings_served": self.ops.listings_served,
            "kernel_keeps_listings": KERNEL_KEEPS_LISTINGS,
            "no_flush_at_close": NO_FLUSH_AT_CLOSE,
            "cache": {
                "dir": str(self.cache.root),
                "cap": self.cache.cap,
                "inserts": s.cache_inserts,
                "evictions": s.cache_evictions,
                **cache,
            },
            "errors": list(s.errors),
        }

    async def prefetch(self, globs: list[str], send: control.Send) -> dict[str, Any]:
        """Bring every BAM file matching ``globs`` into the shared cache."""
        assert self.fetcher is not None
        fetcher = self.fetcher
        files = await trio.to_thread.run_sync(self._matching, globs)
        result: dict[str, Any] = {
            "files": len(files),
            "bytes": sum(e.size for _, e in files),
            "fetched": 0,
            "failed": [],
        }
        limiter = trio.CapacityLimiter(PREFETCH_FILES)
        done = 0

        async def one(path: str, entry: Entry) -> None:
            nonlocal done
            async with limiter:
                try:
                    obj = await trio.to_thread.run_sync(Fetcher.load, self.source, entry.id)
                    result["fetched"] += await fetcher.prefetch(obj)
                except BkfsError as e:
                    result["failed"].append({"path": path, "reason": str(e)})
                    if fetcher.stats.record_error(path, None, str(e)):
                        log.warning("prefetch %s: %s", path, e)
                done += 1
                with contextlib.suppress(trio.BrokenResourceError):  # the asker may leave
                    await send({"progress": {"done": done, "files": len(files)}})

        async with trio.open_nursery() as nursery:
            for path, entry in files:
                nursery.start_soon(one, path, entry)
        return result

    def _matching(self, globs: list[str]) -> list[tuple[str, Entry]]:
        """BAM files whose path (below the root) matches a glob; a glob without ``/`` also
        matches names at any depth; a matching directory brings everything below it."""
        pats = [g.strip("/") for g in globs if g.strip("/")]
        out: list[tuple[str, Entry]] = []

        def hit(path: str) -> bool:
            name = path.rsplit("/", 1)[-1]
            return any(
                fnmatch.fnmatchcase(path, p) or ("/" not in p and fnmatch.fnmatchcase(name, p))
                for p in pats
            )

        def walk(tree_id: bytes, prefix: str, inherited: bool) -> None:
            for e in self.source.tree(tree_id):
                path = prefix + os.fsdecode(e.name)
                matched = inherited or hit(path)
                if e.kind == DIR:
                    walk(e.id, path + "/", matched)
                elif e.kind == BAM and matched:
                    out.append((path, e))

        walk(self.source.origin.root_tree, "", False)
        return out
