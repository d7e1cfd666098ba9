"""The control channel of a running mount, and finding mounts.

Each daemon listens on an abstract unix socket named after its mountpoint
(``\\0bkfs/<hash of the mountpoint>``): nothing on disk to go stale after a crash, and no path
length limit.  A request is one JSON line; the daemon answers with JSON lines, the last one
holding ``result`` or ``error``.  Only the daemon's own user (or root) may ask for anything
but ``status``.

Mounts are found through ``/proc/self/mountinfo`` (filesystem type ``fuse.bkfs``), never by
touching the mountpoint, so a hung or dead daemon cannot hang a command that looks for it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bkfs.errors import MountError

if TYPE_CHECKING:
    import trio

log = logging.getLogger("bkfs")

FSTYPE = "fuse.bkfs"
MAX_REQUEST = 1 << 20
_PEERCRED = struct.Struct("3i")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Send], Awaitable[dict[str, Any]]]


def canonical(mountpoint: Path | str) -> Path:
    """The mountpoint's absolute path, resolving symlinks in its parent only (resolving the
    mountpoint itself would ask a possibly hung filesystem)."""
    p = Path(os.path.abspath(mountpoint))
    return Path(os.path.realpath(p.parent)) / p.name if p.name else p


def address(mountpoint: Path | str) -> bytes:
    digest = hashlib.sha256(os.fsencode(canonical(mountpoint))).hexdigest()[:32]
    return b"\0bkfs/" + digest.encode()


# -- the daemon's side -------------------------------------------------------------------------
async def serve(mountpoint: Path, handler: Handler, *, task_status: Any) -> None:
    """Answer control requests until cancelled; ``task_status.started()`` once listening.

    The name may still be held by a daemon whose mount was detached lazily (it serves its
    open files until they close): that one is asked to ``release`` the name, which it does
    since its mountpoint no longer leads to it.  The caller checked that nothing is mounted
    here, so a holder is always such a daemon."""
    import trio  # here, not at the top: the CLI's commands start faster without it

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for attempt in range(20):
        try:
            await sock.bind(address(mountpoint))
            break
        except OSError as e:
            if e.errno != errno.EADDRINUSE or attempt == 19:
                sock.close()
                raise MountError(f"{mountpoint}: cannot listen for bkfs commands: {e}") from e
            if attempt == 0:
                with contextlib.suppress(MountError, OSError):
                    release = functools.partial(call, mountpoint, {"op": "release"}, timeout=2)
                    await trio.to_thread.run_sync(release)
            await trio.sleep(0.1)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_answer, stream, handler, nursery.cancel_scope)


async def _answer(stream: trio.SocketStream, handler: Handler, listening: trio.CancelScope) -> None:
    import trio

    async with stream:
        try:
            await _answer_one(stream, handler, listening)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:  # a bug answering one request must not take the mount down
            log.exception("control request failed")


async def _answer_one(
    stream: trio.SocketStream, handler: Handler, listening: trio.CancelScope
) -> None:
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    import trio

    sending = trio.Lock()  # a handler may report progress from several tasks

    async def send(message: dict[str, Any]) -> None:
        async with sending:
            await stream.send_all(json.dumps(message).encode() + b"\n")

    try:
        line = await _read_line(stream)
        if not line:
            return  # a probe: connecting was the question
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("expected a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        await send({"error": f"bad request: {e}"})
        return
    if request.get("op") != "status" and uid not in (0, os.getuid()):
        await send({"error": "permission denied: the mount belongs to another user"})
        return
    if request.get("op") == "release":
        log.info("a new mount took this mountpoint: no longer answering commands")
        await send({"result": {"released": True}})
        listening.cancel()
        return
    try:
        result = await handler(request, send)
    except MountError as e:
        await send({"error": str(e)})
        return
    await send({"result": result})


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        part = await stream.receive_some(65536)
        if not part:
            break
        buf += part
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


# -- the client's side -------------------------------------------------------------------------
def request(
    mountpoint: Path, message: dict[str, Any], *, timeout: float | None = 10.0
) -> Iterator[dict[str, Any]]:
    """Send one request; yield each message of the answer (the last one holds the result).
    ``timeout`` bounds the wait for each message."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(address(mountpoint))
        except OSError:
            raise MountError(f"{mountpoint}: no bkfs daemon serves this mountpoint") from None
        s.sendall(json.dumps(message).encode() + b"\n")
        f = s.makefile("rb")
        try:
            for line in f:
                yield json.loads(line)
        except TimeoutError:
            raise MountError(f"{mountpoint}: the bkfs daemon did not answer in time") from None
        finally:
            f.close()
    finally:
        s.close()


def call(mountpoint: Path, message: dict[str, Any], *, timeout: float | None = 10.0) -> Any:
    """Send one request and return its result (progress messages are ignored)."""
    for m in request(mountpoint, message, timeout=timeout):
        if "error" in m:
            raise MountError(f"{mountpoint}: {m['error']}")
        if "result" in m:
            return m["result"]
    raise MountError(f"{mountpoint}: the bkfs daemon closed the connection without an answer")


# -- finding mounts ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MountEntry:
    mountpoint: Path
    fstype: str
    source: str


def mounts() -> list[MountEntry]:
    """Every mount of this mount namespace (from /proc/self/mountinfo)."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            out.append(
                MountEntry(
                    Path(os.fsdecode(_unescape(fields[4]))),
                    os.fsdecode(fields[sep + 1]),
                    os.fsdecode(_unescape(fields[sep + 2])),
                )
            )
    return out


def mount_at(mountpoint: Path) -> MountEntry | None:
    """The mount whose mountpoint is exactly this path (the last one, if stacked)."""
    target = canonical(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m
    return found


def bkfs_mounts() -> list[MountEntry]:
    return [m for m in mounts() if m.fstype == FSTYPE]


def _unescape(field: bytes) -> bytes:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)
