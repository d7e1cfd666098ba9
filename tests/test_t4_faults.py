"""bkfs when things go wrong: corrupt and missing objects, a dead server, signals, a daemon
that died, and the command line's errors (SPEC §6)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, proc_environ
from fusehelp import Bkfs, Lazy, MiB, Mounts, answers, gone, pread

from bkrepo.chunkcache import BOOT_ID

pytestmark = pytest.mark.fuse


def eio(path: Path, off: int = 0, n: int = 4096) -> float:
    """Read that must fail with EIO; returns how long it took."""
    t = time.monotonic()
    with pytest.raises(OSError, match="Input/output error") as e:
        pread(path, off, n)
    assert e.value.errno == errno.EIO
    return time.monotonic() - t


def test_corrupt_and_missing_objects_fail_only_their_reads(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    corrupt = lazy.pool_file("tex/a.bin")
    os.chmod(corrupt, 0o644)
    with open(corrupt, "r+b") as f:  # damage one chunk only
        f.seek(2 * MiB + 100)
        f.write(b"\xff" * 16)
    lazy.pool_file("tex/b.bin").unlink()
    mnt = mounts.foreground(lazy.lazy, "mnt").mountpoint
    data = lazy.files["tex/a.bin"]

    assert pread(mnt / "tex/a.bin", 0, 4096) == data[:4096]  # chunk 0 is fine
    assert eio(mnt / "tex/a.bin", 2 * MiB + 5) < 5
    assert eio(mnt / "tex/a.bin", 2 * MiB + 5) < 0.5  # remembered: fails at once
    assert eio(mnt / "tex/b.bin") < 5
    # Everything else keeps working.
    assert (mnt / "other/c.bin").read_bytes() == lazy.files["other/c.bin"]
    assert (mnt / "src/main.c").read_bytes() == lazy.files["src/main.c"]
    assert pread(mnt / "tex/a.bin", 4 * MiB, 100) == data[4 * MiB : 4 * MiB + 100]

    errors = {e["path"]: e["reason"] for e in bkfs.status(mnt)["errors"]}
    assert set(errors) == {"tex/a.bin", "tex/b.bin"}
    assert "does not match" in errors["tex/a.bin"]
    assert "not on the server" in errors["tex/b.bin"]
    log = (mounts.started[0].log or Path()).read_text()
    assert "tex/a.bin" in log and "does not match" in log  # the reason is logged


def test_a_damaged_chunk_list_fails_the_read_not_the_mount(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    """Opening a BAM file answers at once (its chunk list loads in the background), so damaged
    history shows at the first read: EIO, the reason in ``status``, the rest unharmed."""
    from bkrepo.repo import Repo

    repo = Repo.open(lazy.lazy)
    try:
        with repo.store.write() as txn:
            tex = txn.tree_map(txn.cset(repo.tip(txn)).tree)[b"tex"]  # type: ignore[arg-type]
            entry = txn.tree_map(tex.id)[b"b.bin"]
            txn.delete_object(txn.pointer(entry.id).chunks)
    finally:
        repo.close()
    mnt = mounts.foreground(lazy.lazy, "mnt").mountpoint
    assert os.stat(mnt / "tex/b.bin").st_size == len(lazy.files["tex/b.bin"])
    with open(mnt / "tex/b.bin", "rb") as f:  # the open itself succeeds
        with pytest.raises(OSError, match="Input/output error") as e:
            f.read(4096)
        assert e.value.errno == errno.EIO
    [err] = bkfs.status(mnt)["errors"]
    assert err["path"] == "tex/b.bin" and "history is damaged" in err["reason"]
    assert (mnt / "tex/a.bin").read_bytes() == lazy.files["tex/a.bin"]


def test_server_killed_reads_fail_fast_and_umount_is_clean(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    m = mounts.background(lazy.lazy, "mnt")
    mnt = m.mountpoint
    assert pread(mnt / "tex/a.bin", 0, 100) == lazy.files["tex/a.bin"][:100]
    lazy.server.kill()
    took = eio(mnt / "tex/b.bin")
    assert took < 10
    assert eio(mnt / "other/c.bin") < 10
    assert sorted(os.listdir(mnt / "tex")) == ["a.bin", "b.bin", "small.bin"]
    assert (mnt / "src/main.c").read_bytes() == lazy.files["src/main.c"]
    [*_, last] = bkfs.status(mnt)["errors"]
    assert "unavailable" in last["reason"]
    # A reader blocked on the dead server must not hold up umount either.
    t = time.monotonic()
    bkfs.run("umount", str(mnt))
    assert time.monotonic() - t < 10
    assert not os.path.ismount(mnt)
    assert gone(m.pid, 10)


def test_sigterm_unmounts_cleanly(lazy: Lazy, mounts: Mounts) -> None:
    m = mounts.foreground(lazy.lazy, "mnt")
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(15) == 0
    assert not os.path.ismount(m.mountpoint)
    m = mounts.foreground(lazy.lazy, "mnt2")
    assert m.proc is not None
    m.proc.send_signal(signal.SIGINT)
    assert m.proc.wait(15) == 0
    assert not os.path.ismount(m.mountpoint)


def test_a_daemon_that_died_leaves_nothing_a_mount_cannot_fix(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    m = mounts.foreground(lazy.lazy, "mnt")
    assert m.proc is not None
    # What the daemon cached before it died is kept: its commits were in the page cache
    # (they wait for no sync), and the next daemon puts them on disk (chunkcache docstring).
    assert (m.mountpoint / "tex/b.bin").read_bytes() == lazy.files["tex/b.bin"]
    deadline = time.monotonic() + 10
    while bkfs.status(m.mountpoint)["cache"]["bytes"] < len(lazy.files["tex/b.bin"]):
        assert time.monotonic() < deadline, "the chunks were not cached"
        time.sleep(0.05)
    unsynced = Path(bkfs.status(m.mountpoint)["cache"]["dir"]) / "unsynced"
    boot = BOOT_ID.read_text().strip()
    assert os.listdir(unsynced) == [f"{boot}.{m.pid}"]
    m.proc.kill()
    m.proc.wait(10)
    with pytest.raises(OSError, match="not connected") as e:
        os.stat(m.mountpoint / "src/main.c")  # a name the kernel has not looked up yet
    assert e.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
    assert "stale" in bkfs.fails("status", str(m.mountpoint))
    m2 = mounts.foreground(lazy.lazy, "mnt")  # cleans the stale mount, then mounts
    assert (m2.mountpoint / "src/main.c").read_bytes() == lazy.files["src/main.c"]
    assert os.listdir(unsynced) == [f"{boot}.{m2.pid}"]  # the dead daemon's was settled
    assert (m2.mountpoint / "tex/b.bin").read_bytes() == lazy.files["tex/b.bin"]
    s = bkfs.status(m2.mountpoint)
    assert s["bam_bytes_fetched"] == 0
    assert s["cache_hits"] >= 3
    assert m2.proc is not None
    m2.proc.kill()
    m2.proc.wait(10)
    bkfs.run("umount", str(m2.mountpoint))  # umount works without a daemon too
    assert not os.path.ismount(m2.mountpoint)


def test_command_line_errors(
    cli: CLI, lazy: Lazy, bkfs: Bkfs, mounts: Mounts, tmp_path: Path
) -> None:
    (tmp_path / "free").mkdir()
    free = str(tmp_path / "free")
    assert "required" in bkfs.fails("mount", code=2)
    assert "--cache-size" in bkfs.fails("mount", str(lazy.lazy), free, "--cache-size", "x", code=2)
    assert "no such repository" in bkfs.fails("mount", str(tmp_path / "nope"), free)
    assert "not a bkr repository" in bkfs.fails("mount", str(tmp_path), free)
    assert "unknown revision" in bkfs.fails("mount", str(lazy.lazy), free, "--rev", "nosuch")
    assert "no such directory" in bkfs.fails("mount", str(lazy.lazy), str(tmp_path / "none"))
    assert not answers(tmp_path / "free")
    m = mounts.background(lazy.lazy, "mnt")
    assert "already a bkfs mount" in bkfs.fails("mount", str(lazy.lazy), str(m.mountpoint))
    assert "not mounted" in bkfs.fails("umount", free)
    assert "no bkfs daemon" in bkfs.fails("status", free)
    # Busy: a process holds a file open; --lazy detaches anyway, and the old daemon keeps
    # serving that process while a new mount takes the mountpoint.
    holder = subprocess.Popen(["sleep", "30"], cwd=m.mountpoint / "tex")
    try:
        assert "busy" in bkfs.fails("umount", str(m.mountpoint))
        bkfs.run("umount", "--lazy", str(m.mountpoint))
        assert not os.path.ismount(m.mountpoint)
        again = mounts.background(lazy.lazy, "mnt")
        assert again.pid != m.pid
    finally:
        holder.kill()
        holder.wait(10)
    assert gone(m.pid, 15)
    assert (again.mountpoint / "src/main.c").read_bytes() == lazy.files["src/main.c"]


def test_the_daemon_keeps_its_heap_on_huge_pages(lazy: Lazy, bkfs: Bkfs, mounts: Mounts) -> None:
    """As bkr serve: a daemon sitting idle, then asked for a cold read, answers faster on
    huge pages.  ``bkfs mount`` starts it so; ``--foreground`` restarts itself so (same
    pid: systemd's Type=notify sees the pid it started)."""
    from bkrepo.malloc import THP_ENABLED

    huge = "[never]" not in THP_ENABLED.read_text()
    for m in (mounts.background(lazy.lazy, "bg"), mounts.foreground(lazy.lazy, "fg")):
        env = proc_environ(m.pid)
        assert (env.get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1") is huge
        assert int(bkfs.status(m.mountpoint)["pid"]) == m.pid
