"""``bkfs``: the command line of the lazy filesystem.

The only module that reads arguments and the environment, prints, and turns errors into exit
codes: 0 success, 1 the operation failed, 2 usage error.  Failures print one line,
``bkfs: <what>: <why>``, never a traceback.

``bkfs mount`` without ``--foreground`` starts the daemon as a fresh process
(``python -m bkfs mount --foreground``; never a fork of this one) with its output going to a
log file under the cache directory, and returns once the daemon reports that the mount
answers — or prints why it could not mount.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from bkfs import control
from bkfs.errors import BkfsError, MountError, UsageError
from bkrepo import malloc
from bkrepo.chunkcache import ChunkCache, cache_dir
from bkrepo.cli import human_size

READY_TIMEOUT = 60.0  # seconds `bkfs mount` waits for the daemon to answer
EXIT_TIMEOUT = 15.0  # seconds `bkfs umount` waits for the daemon to finish
LOG_KEEP = 1 << 20  # a mount's log is rotated when it is bigger than this


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        what = self.prog.removeprefix("bkfs ") if self.prog != "bkfs" else "usage"
        raise UsageError(f"{what}: {message} (see '{self.prog} --help')")


def parse_size(text: str) -> int:
    from bkrepo import config
    from bkrepo.errors import UsageError as RepoUsageError

    try:
        n = config.parse_size(text)
    except RepoUsageError as e:
        raise UsageError(f"--cache-size: {e}") from None
    if n < 1 << 20:
        raise UsageError(f"--cache-size: {text!r} is too small: at least 1M")
    return n


# -- mount -------------------------------------------------------------------------------------
def cmd_mount(a: argparse.Namespace) -> None:
    repo = Path(a.repo).absolute()
    if not repo.is_dir():
        raise MountError(f"mount: {a.repo}: no such repository")
    mountpoint = control.canonical(a.mountpoint)
    cache_size = parse_size(a.cache_size) if a.cache_size else None
    if not a.foreground:
        # The daemon is a new process that imports the whole mount (trio, pyfuse3, bkrepo):
        # starting it without importing that here first saves ~0.3 s of CPU per mount.
        _background(a, repo, mountpoint, cache_dir())
        return
    malloc.restart_on_huge_pages()  # a long-running daemon: its heap on huge pages
    from bkfs.daemon import MountOptions

    opts = MountOptions(
        repo=repo,
        mountpoint=mountpoint,
        rev=a.rev,
        cache_dir=cache_dir(),
        cache_size=cache_size,
        offline=a.offline,
        ready_fd=_ready_fd(),
    )
    _foreground(opts)


def _ready_fd() -> int | None:
    v = os.environ.get("BKFS_READY_FD")
    return int(v) if v and v.isdigit() else None


def _foreground(opts: Any) -> None:
    from bkfs import daemon

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s bkfs[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    try:
        daemon.run(opts)
    except BkfsError as e:
        if not e.message.startswith("mount:"):
            e.message = f"mount: {e.message}"
        raise


def _background(a: argparse.Namespace, repo: Path, mountpoint: Path, cache: Path) -> None:
    """Start the daemon as a new process and wait until the mount answers."""
    log_path = _log_path(cache, mountpoint)
    args = [sys.executable, "-m", "bkfs", "mount", "--foreground", str(repo), str(mountpoint)]
    if a.rev:
        args += ["--rev", a.rev]
    if a.cache_size:
        args += ["--cache-size", a.cache_size]
    if a.offline:
        args.append("--offline")
    r, w = os.pipe()
    try:
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd="/",  # the daemon must not keep the caller's directory busy
                # started on huge pages at once (bkrepo/malloc.py), not restarted for them
                env={**(malloc.huge_page_env(os.environ) or os.environ), "BKFS_READY_FD": str(w)},
                pass_fds=(w,),
                start_new_session=True,
            )
        os.close(w)
        w = -1
        answer = _wait_ready(r, proc)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if answer == "ready":
        print(f"mounted {repo} on {mountpoint} (pid {proc.pid}, log {log_path})")
        return
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if answer.startswith("error "):
        raise MountError(f"mount: {answer[6:]}")
    raise MountError(f"mount: the daemon {answer}; see {log_path}")


def _wait_ready(r: int, proc: subprocess.Popen[bytes]) -> str:
    """The daemon's first line on the readiness pipe: "ready", "error WHY", or what happened."""
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"did not answer within {READY_TIMEOUT:g} s"
        readable, _, _ = select.select([r], [], [], min(left, 1.0))
        if readable:
            part = os.read(r, 4096)
            if not part:
                code = proc.wait(5)
                return f"exited (code {code}) before the mount answered"
            buf += part
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def _log_path(base: Path, mountpoint: Path) -> Path:
    logs = base / "log"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / (control.address(mountpoint)[6:].decode() + ".log")
    try:
        if path.stat().st_size > LOG_KEEP:
            path.replace(path.with_suffix(".log.1"))
    except FileNotFoundError:
        pass
    return path


# -- umount ------------------------------------------------------------------------------------
def cmd_umount(a: argparse.Namespace) -> None:
    mnt = control.canonical(a.mountpoint)
    m = control.mount_at(mnt)
    if m is None:
        raise MountError(f"umount: {mnt}: not mounted")
    if m.fstype != control.FSTYPE:
        raise MountError(f"umount: {mnt}: not a bkfs mount ({m.fstype})")
    pid = None
    try:
        pid = int(control.call(mnt, {"op": "status"}, timeout=2)["pid"])
    except (MountError, KeyError, TypeError, ValueError):
        pass  # no daemon (a stale mount) or a hung one: unmounting works without it
    cmd = ["fusermount3", "-u", *(["-z"] if a.lazy else []), str(mnt)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        why = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        if "busy" in why.lower():
            raise MountError(
                f"umount: {mnt}: busy (a process has a file open or its working directory "
                "inside); close it, or use 'bkfs umount --lazy'"
            )
        raise MountError(f"umount: {mnt}: {why}")
    # A lazy detach leaves the daemon serving open files until they close: don't wait for it.
    if pid is not None and not a.lazy and not _wait_exit(pid, EXIT_TIMEOUT):
        print(f"bkfs: umount: unmounted; daemon pid {pid} is still finishing", file=sys.stderr)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in (b"Z", b"X"):
            return True
        time.sleep(0.05)
    return False


# -- status and prefetch -----------------------------------------------------------------------
def _target(given: str | None) -> Path | None:
    """The mount named, else the bkfs mount containing the working directory, else None."""
    if given is not None:
        return control.canonical(given)
    cwd = Path(os.path.abspath(os.environ.get("PWD") or os.getcwd()))
    best: Path | None = None
    for m in control.bkfs_mounts():
        if (cwd == m.mountpoint or m.mountpoint in cwd.parents) and (
            best is None or len(str(m.mountpoint)) > len(str(best))
        ):
            best = m.mountpoint
    return best


def _status_of(mnt: Path) -> dict[str, Any]:
    try:
        info = control.call(mnt, {"op": "status"}, timeout=5)
    except MountError as e:
        m = control.mount_at(mnt)
        if m is not None and m.fstype == control.FSTYPE and "no bkfs daemon" in str(e):
            raise MountError(
                f"status: {mnt}: the daemon is gone (a stale mount); run 'bkfs umount {mnt}'"
            ) from None
        raise MountError(f"status: {e}") from None
    return dict(info)


def cmd_status(a: argparse.Namespace) -> None:
    mnt = _target(a.mountpoint)
    if mnt is None:
        infos = []
        for m in control.bkfs_mounts():
            try:
                infos.append(_status_of(m.mountpoint))
            except MountError as e:
                infos.append({"mountpoint": str(m.mountpoint), "error": str(e)})
        if a.json:
            print(json.dumps(infos))
        elif not infos:
            print("no bkfs mounts")
        for info in [] if a.json else infos:
            _print_status(info)
        return
    info = _status_of(mnt)
    if a.json:
        print(json.dumps(info))
    else:
        _print_status(info)


def _print_status(s: dict[str, Any]) -> None:
    if "error" in s:
        print(f"{s['mountpoint']}: {s['error']}")
        return
    rev = s["rev"][:12] if s["rev_name"] in ("+", s["rev"][:12]) else f"{s['rev_name']} "
    rev += "" if s["rev_name"] in ("+", s["rev"][:12]) else f"({s['rev'][:12]})"
    server = "offline" if s["offline"] else (s["server"] or "no server (local pools only)")
    cache = s["cache"]
    used = f"{human_size(cache['bytes'])} of " if "bytes" in cache else ""
    print(f"{s['mountpoint']}: {s['repo']} at {rev} (pid {s['pid']})")
    print(f"  server:  {server}")
    print(
        f"  fetched: {human_size(s['bam_bytes_fetched'])} of {s['bam_objects_fetched']} objects "
        f"in {s['server_requests']} requests"
    )
    print(
        f"  served:  {human_size(s['bytes_served'])}; cache hits {s['cache_hits']}, "
        f"pool reads {s['pool_reads']}, memory hits {s['memory_hits']}"
    )
    print(f"  cache:   {used}{human_size(cache['cap'])} at {cache['dir']}")
    kept = "kept by the kernel" if s["kernel_keeps_listings"] else "not kept by the kernel"
    print(
        f"  tree:    {s['dirs_loaded']} directories loaded, {s['read_ahead']['dirs']} read "
        f"ahead; {s['listings_served']} listings served ({kept})"
    )
    errors = s["errors"]
    if errors:
        print(f"  errors ({len(errors)}, newest last):")
        for e in errors:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            times = f" (x{e['count']})" if e["count"] > 1 else ""
            print(f"    {when} {e['path']}: {e['reason']}{times}")


def cmd_prefetch(a: argparse.Namespace) -> int:
    words = [a.mountpoint, *a.globs]
    first = control.canonical(words[0])
    m = control.mount_at(first)
    if m is not None and m.fstype == control.FSTYPE:
        mnt, globs = first, words[1:]
    else:
        found = _target(None)
        if found is None:
            raise MountError(
                f"prefetch: {words[0]}: not a bkfs mountpoint (and the working directory is "
                "not inside one)"
            )
        mnt, globs = found, words
    if not globs:
        raise UsageError("prefetch: give at least one GLOB (e.g. '*.psd' or textures/)")
    rel = [_relative(mnt, g) for g in globs]
    result: dict[str, Any] | None = None
    for message in control.request(mnt, {"op": "prefetch", "globs": rel}, timeout=None):
        if "error" in message:
            raise MountError(f"prefetch: {message['error']}")
        if "result" in message:
            result = message["result"]
    if result is None:
        raise MountError("prefetch: the daemon closed the connection without an answer")
    for f in result["failed"]:
        print(f"bkfs: prefetch: {f['path']}: {f['reason']}", file=sys.stderr)
    ok = result["files"] - len(result["failed"])
    print(
        f"prefetched {ok} of {result['files']} files ({human_size(result['bytes'])}; "
        f"{human_size(result['fetched'])} fetched, the rest was local or cached)"
    )
    return 1 if result["failed"] else 0


def _relative(mnt: Path, glob: str) -> str:
    """A glob as a path below the mount root (an absolute path inside the mount is accepted,
    as a shell expands it)."""
    if glob.startswith("/"):
        p = Path(os.path.abspath(glob))
        if p == mnt or mnt in p.parents:
            return p.relative_to(mnt).as_posix() if p != mnt else "*"
    return glob


# -- cache -------------------------------------------------------------------------------------
def cmd_cache(a: argparse.Namespace) -> None:
    cache = ChunkCache(cache_dir())
    try:
        if a.action == "clean":
            root = cache.root
            if cache.clean():
                print(f"removed the cache at {root}")
            else:
                print(
                    f"emptied the cache at {root} (mounts are using it; its disk space is reused)"
                )
            return
        u = cache.usage()
    finally:
        cache.close()
    if a.json:
        print(json.dumps({"dir": str(cache.root), **u.__dict__}))
        return
    print(
        f"{human_size(u.bytes)} in {u.chunks} chunks of {u.objects} objects "
        f"(cap {human_size(u.cap)}; file {human_size(u.file_bytes)}) at {cache.root}"
    )


# -- the parser --------------------------------------------------------------------------------
def build_parser() -> Parser:
    parser = Parser(
        prog="bkfs", description="Mount a bkr repository's tree; fetch BAM bytes lazily."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("mount", help="mount a revision of a repository (read-only)")
    sp.set_defaults(handler=cmd_mount)
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("-r", "--rev", help="revision to show (default: the tip, +)")
    sp.add_argument(
        "-f", "--foreground", action="store_true", help="run the daemon in this process"
    )
    sp.add_argument(
        "--cache-size",
        metavar="SIZE",
        help="cap of the shared cache, e.g. 20G (default: the cap last set, else 10G)",
    )
    sp.add_argument(
        "--offline", action="store_true", help="never ask the server: serve what is local"
    )

    sp = sub.add_parser("umount", help="unmount (works with a dead server or daemon)")
    sp.set_defaults(handler=cmd_umount)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("-z", "--lazy", action="store_true", help="detach now even if files are open")

    sp = sub.add_parser("status", help="what a mount serves, fetched, cached and failed")
    sp.set_defaults(handler=cmd_status)
    sp.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        nargs="?",
        help="default: the mount containing the working directory, else every mount",
    )
    sp.add_argument("--json", action="store_true", help="one JSON object")

    sp = sub.add_parser("prefetch", help="bring matching BAM files into the cache")
    sp.set_defaults(handler=cmd_prefetch)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument(
        "globs",
        metavar="GLOB",
        nargs="*",
        help="paths below the mount root; a glob without '/' matches names at any depth",
    )

    sp = sub.add_parser("cache", help="the shared cache: du (default) or clean")
    sp.set_defaults(handler=cmd_cache)
    sp.add_argument("action", nargs="?", choices=("du", "clean"), default="du")
    sp.add_argument("--json", action="store_true", help="du as one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    try:
        a = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        handler = getattr(a, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            sys.exit(2)
        sys.exit(handler(a) or 0)
    except BkfsError as e:
        print(f"bkfs: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("bkfs: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
