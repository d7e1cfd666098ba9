"""Helpers for the t4 tests: a served repository with BAM files, a lazy clone of it, the
``bkfs`` CLI, and real mounts — every daemon stopped by pid and every mount detached in
teardown, whatever the test did."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bamhelp import binary
from conftest import CLI, write_files
from servers import Server

BKFS = [sys.executable, "-m", "bkfs"]
MiB = 1 << 20

FILES: dict[str, bytes] = {
    "tex/a.bin": binary(6 * MiB + 12345, seed=1),
    "tex/b.bin": binary(3 * MiB, seed=2),
    "tex/small.bin": binary(100_000, seed=3),
    "other/c.bin": binary(2 * MiB + 7, seed=4),
    "src/main.c": b"int main(void) { return 0; }\n",
    "tools/run.sh": b"#!/bin/sh\necho run\n",
    "docs/deep/er/readme.txt": b"read me\n",
}
BAM_FILES = ("tex/a.bin", "tex/b.bin", "tex/small.bin", "other/c.bin")


class Bkfs:
    """Runs ``bkfs`` as a user would, with the test's home and cache."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(
        self, *args: str, ok: bool | None = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [*BKFS, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd="/"
        )
        if ok is True and p.returncode != 0:
            raise AssertionError(f"bkfs {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
        if ok is False and p.returncode == 0:
            raise AssertionError(f"bkfs {' '.join(args)} unexpectedly succeeded:\n{p.stdout}")
        return p

    def fails(self, *args: str, code: int = 1) -> str:
        """A failure as SPEC §6 says: exit ``code``, one line ``bkfs: …``, no traceback."""
        p = self.run(*args, ok=None)
        what = f"bkfs {' '.join(args)}"
        assert p.returncode == code, f"{what}: exit {p.returncode}, wanted {code}:\n{p.stderr}"
        lines = p.stderr.splitlines()
        assert len(lines) == 1, f"{what}: wanted one line on stderr:\n{p.stderr}"
        assert lines[0].startswith("bkfs: "), lines[0]
        return lines[0]

    def status(self, mnt: Path) -> dict[str, Any]:
        return dict(json.loads(self.run("status", str(mnt), "--json").stdout))

    def cache_du(self) -> dict[str, Any]:
        return dict(json.loads(self.run("cache", "du", "--json").stdout))


@dataclass
class Lazy:
    """A central repo that is its own BAM server, served over HTTP, and a lazy clone."""

    server: Server
    central: Path
    lazy: Path
    files: dict[str, bytes]
    url: str

    def pool_file(self, rel: str) -> Path:
        import hashlib

        h = hashlib.sha256(self.files[rel]).hexdigest()
        return self.central / ".bk" / "bam" / h[:2] / h


def make_lazy(cli: CLI, tmp: Path, serve: Any, extra: dict[str, bytes] | None = None) -> Lazy:
    central = tmp / "srv" / "game"
    files = {**FILES, **(extra or {})}
    cli("init", str(central), cwd=tmp)
    write_files(central, files)
    os.chmod(central / "tools/run.sh", 0o755)
    os.symlink("src/main.c", central / "link")
    with open(os.fsencode(central / "docs") + b"/caf\xe9.txt", "wb") as f:  # not UTF-8
        f.write(b"latin-1 name\n")
    cli("add", "-q", ".", cwd=central)  # quiet: the test harness reads output as UTF-8
    cli("commit", "-q", "-m", "assets", cwd=central)
    cli("bam", "server", ".", cwd=central)
    server = serve()
    url = f"{server.url}/game"
    cli("clone", "--checkout", "none", url, "lazy", cwd=tmp)
    return Lazy(server, central, tmp / "lazy", files, url)


@dataclass
class Mount:
    mountpoint: Path
    pid: int
    proc: subprocess.Popen[bytes] | None = None  # when the test started the daemon itself
    log: Path | None = None


@dataclass
class Mounts:
    """Starts mounts and, in :meth:`cleanup`, detaches each one and stops its daemon by pid."""

    bkfs: Bkfs
    tmp: Path
    started: list[Mount] = field(default_factory=list)

    def foreground(self, repo: Path, name: str, *args: str, wait: float = 30) -> Mount:
        """``bkfs mount --foreground`` in a subprocess; returns once the mount answers."""
        mnt = self.tmp / name
        with contextlib.suppress(FileExistsError):  # exist_ok would stat a stale mount
            mnt.mkdir()
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                [*BKFS, "mount", "--foreground", str(repo), str(mnt), *args],
                env=self.bkfs.env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                cwd="/",
            )
        m = Mount(mnt, proc.pid, proc, log)
        self.started.append(m)
        deadline = time.monotonic() + wait
        while not answers(mnt):
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({proc.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the mount did not answer:\n{log.read_text()}")
            time.sleep(0.05)
        return m

    def background(self, repo: Path, name: str, *args: str) -> Mount:
        """``bkfs mount`` as a user runs it: returns when the mount answers."""
        mnt = self.tmp / name
        mnt.mkdir(exist_ok=True)
        self.bkfs.run("mount", str(repo), str(mnt), *args)
        m = Mount(mnt, int(self.bkfs.status(mnt)["pid"]))
        self.started.append(m)
        assert answers(mnt)
        return m

    def cleanup(self) -> None:
        """Detach every mount started so far and stop its daemon (again: a no-op)."""
        started, self.started = self.started, []
        for m in started:
            subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)], capture_output=True)
            stop_pid(m.pid, m.proc)


def answers(mnt: Path) -> bool:
    """Is ``mnt`` a bkfs mount whose daemon answers?  (``statvfs``, which the kernel always
    asks the daemon: a dead mount's ``stat`` and listings may be answered from its caches.)"""
    from bkfs import control

    m = control.mount_at(mnt)
    if m is None or m.fstype != control.FSTYPE:
        return False
    try:
        os.statvfs(mnt)
    except OSError:
        return False
    return True


def stop_pid(pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, wait, then SIGKILL one process we started (by pid, never by name)."""
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if gone(pid, 10):
            return


def gone(pid: int, timeout: float) -> bool:
    """Has a process (not necessarily our child) exited within ``timeout`` seconds?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def pread(path: Path, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)
