"""bkfs mounts of a lazy clone against the real ``bkr serve``: the tree without data, lazy
verified reads, the shared cache across remounts and daemons, prefetch and offline mounts."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from bamhelp import binary
from conftest import CLI, write_files
from fusehelp import BAM_FILES, Bkfs, Lazy, MiB, Mounts, make_lazy, pread

from bkrepo.objects import CHUNK_SIZE

pytestmark = pytest.mark.fuse


def tree_of(root: Path) -> dict[str, tuple[str, int, int, int, bytes | None]]:
    """path -> (kind, permission bits, size, mtime in s, link target) for everything below."""
    out: dict[str, tuple[str, int, int, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".bk")
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0o777, st.st_size, int(st.st_mtime), os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode & 0o777, 0, int(st.st_mtime), None)
            else:
                out[rel] = ("file", st.st_mode & 0o777, st.st_size, int(st.st_mtime), None)
    return out


def history_of(repo: Path) -> dict[str, tuple[str, int, int, int, bytes | None]]:
    """The same, as the tip's history records it (read with the engine, read-only)."""
    from bkrepo import objects as ob
    from bkrepo.repo import Repo

    kinds = {ob.K_FILE: "file", ob.K_BAM: "file", ob.K_LINK: "link", ob.K_DIR: "dir"}
    out: dict[str, tuple[str, int, int, int, bytes | None]] = {}
    r = Repo(repo, readonly=True)
    try:
        with r.store.read() as txn:

            def walk(tree: bytes, prefix: str) -> None:
                for e in txn.tree(tree):
                    path = prefix + os.fsdecode(e.name)
                    target = txn.blob(e.id) if e.kind == ob.K_LINK else None
                    size = 0 if e.kind == ob.K_DIR else e.size
                    mode = 0o777 if e.kind == ob.K_LINK else e.mode
                    out[path] = (kinds[e.kind], mode, size, e.mtime, target)
                    if e.kind == ob.K_DIR:
                        walk(e.id, path + "/")

            walk(r.tip_tree(txn) or b"", "")
    finally:
        r.close()
    return out


def test_tree_is_exact_from_the_first_ls_without_reading_data(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    m = mounts.background(lazy.lazy, "mnt")
    mnt = m.mountpoint
    assert sorted(os.listdir(mnt)) == ["docs", "link", "other", "src", "tex", "tools"]
    seen = tree_of(mnt)
    assert seen == history_of(lazy.lazy)
    assert (
        {k: v[:3] + v[4:] for k, v in seen.items()}
        == {  # the same files as the original
            k: v[:3] + v[4:] for k, v in tree_of(lazy.central).items()
        }
    )
    assert os.readlink(mnt / "link") == "src/main.c"
    assert (mnt / "link").read_bytes() == lazy.files["src/main.c"]  # non-BAM: from history
    assert (mnt / "docs/deep/er/readme.txt").read_bytes() == b"read me\n"
    assert b"caf\xe9.txt" in os.listdir(os.fsencode(mnt / "docs"))  # names are bytes
    with open(os.fsencode(mnt / "docs") + b"/caf\xe9.txt", "rb") as f:
        assert f.read() == b"latin-1 name\n"
    assert os.access(mnt / "tools/run.sh", os.X_OK)
    # A directory's mtime is the newest below it; the root's too.
    assert int(os.stat(mnt).st_mtime) == max(v[3] for v in seen.values())
    s = bkfs.status(mnt)
    assert s["bam_bytes_fetched"] == 0
    assert s["server_requests"] == 0
    assert s["repo"] == str(lazy.lazy)
    assert s["server"] == lazy.url
    assert len(s["rev"]) == 64
    assert s["errors"] == []
    assert not list((lazy.lazy / ".bk" / "bam").glob("??/*"))  # nothing was fetched anywhere

    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "tex" / "nope.bin")
    for attempt in (
        lambda: open(mnt / "tex/a.bin", "r+b"),  # noqa: SIM115 - must fail before a handle exists
        lambda: open(mnt / "new.txt", "wb"),  # noqa: SIM115
        lambda: os.mkdir(mnt / "newdir"),
        lambda: os.unlink(mnt / "src/main.c"),
        lambda: os.rename(mnt / "src/main.c", mnt / "src/x.c"),
        lambda: os.chmod(mnt / "tools/run.sh", 0o700),
        lambda: os.utime(mnt / "tools/run.sh"),
        lambda: os.symlink("x", mnt / "l2"),
    ):
        with pytest.raises(OSError, match="Read-only file system") as e:
            attempt()
        assert e.value.errno == errno.EROFS
    human = bkfs.run("status", str(mnt)).stdout
    assert str(lazy.lazy) in human and lazy.url in human
    assert "listings served (kept by the kernel)" in human

    bkfs.run("umount", str(mnt))
    assert not os.path.ismount(mnt)
    assert os.listdir(mnt) == []


def walk_inodes(mnt: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``mnt``: (inode number its directory listing gave, ``lstat``'s)."""
    out: dict[str, tuple[int, int]] = {}
    todo = [mnt]
    while todo:
        d = todo.pop()
        with os.scandir(d) as it:
            for e in it:
                rel = os.path.relpath(e.path, mnt)
                out[rel] = (e.inode(), os.lstat(e.path).st_ino)
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
    return out


def test_listings_are_kept_by_the_kernel_and_inodes_survive_forgetting(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    """A walk lists each directory once: the kernel keeps the listings (no request reaches
    the daemon on the next walk).  When the kernel forgets the inodes (memory pressure, here
    drop_caches) the daemon drops those directories and loads them again on the next visit,
    with the same inode numbers, so a listing the kernel kept never disagrees with stat."""
    mnt = mounts.background(lazy.lazy, "mnt").mountpoint
    os.listdir(mnt)  # the root's first subdirectory is decoded ahead of a walk into it
    deadline = time.monotonic() + 10
    while bkfs.status(mnt)["read_ahead"]["dirs"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # and no more than that one
    assert bkfs.status(mnt)["read_ahead"]["dirs"] == 1  # docs, of docs other src tex tools
    first = walk_inodes(mnt)
    assert all(listed == stat for listed, stat in first.values())
    s = bkfs.status(mnt)
    assert s["read_ahead"]["dirs"] == 0  # all visited
    assert s["kernel_keeps_listings"] is True  # scripts/setup's pyfuse3
    assert s["no_flush_at_close"] is True  # the same
    served = s["listings_served"]
    assert served > 0
    assert walk_inodes(mnt) == first
    assert bkfs.status(mnt)["listings_served"] == served  # the kernel answered every listing

    loaded = bkfs.status(mnt)["dirs_loaded"]
    for _ in range(3):  # inodes still referenced by a dentry go on the next pass
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
    assert bkfs.status(mnt)["dirs_loaded"] < loaded  # the kernel forgot; so did the daemon
    assert walk_inodes(mnt) == first
    assert (mnt / "docs/deep/er/readme.txt").read_bytes() == b"read me\n"


def test_rev_shows_an_older_tree(
    cli: CLI, lazy: Lazy, bkfs: Bkfs, mounts: Mounts, tmp_path: Path
) -> None:
    first = cli("log", "--keys", cwd=lazy.central).split()[0]
    newer = binary(MiB + 3, seed=9)
    write_files(lazy.central, {"tex/a.bin": newer})
    cli("rm", "other/c.bin", cwd=lazy.central)
    cli("add", ".", cwd=lazy.central)
    cli("commit", "-m", "second", cwd=lazy.central)
    cli("pull", cwd=lazy.lazy)
    tip = mounts.foreground(lazy.lazy, "tip")
    old = mounts.foreground(lazy.lazy, "old", "--rev", first[:12])
    assert (tip.mountpoint / "tex/a.bin").read_bytes() == newer
    assert not (tip.mountpoint / "other/c.bin").exists()
    assert (old.mountpoint / "tex/a.bin").stat().st_size == len(lazy.files["tex/a.bin"])
    assert (old.mountpoint / "other/c.bin").read_bytes() == lazy.files["other/c.bin"]
    assert bkfs.status(old.mountpoint)["rev"] == first


def test_local_pools_are_read_without_a_server(
    cli: CLI, lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    lazy.server.stop()
    own = mounts.foreground(lazy.central, "own").mountpoint  # its own BAM server: all local
    cli("config", "bam.pools", str(lazy.central), cwd=lazy.lazy)
    other = mounts.foreground(lazy.lazy, "other").mountpoint  # reads the central pool
    for mnt in (own, other):
        for rel in BAM_FILES:
            assert (mnt / rel).read_bytes() == lazy.files[rel]
        s = bkfs.status(mnt)
        assert s["bam_bytes_fetched"] == 0
        assert s["pool_reads"] > 0
        assert s["errors"] == []
    assert bkfs.cache_du()["bytes"] == 0  # local data is never copied into the cache


def test_random_read_fetches_only_the_chunk_it_touches(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    mnt = mounts.foreground(lazy.lazy, "mnt").mountpoint
    data = lazy.files["tex/a.bin"]
    off = 4 * MiB + 1000
    assert pread(mnt / "tex/a.bin", off, 4096) == data[off : off + 4096]
    s = bkfs.status(mnt)
    assert s["bam_objects_fetched"] == 1
    assert 4096 <= s["bam_bytes_fetched"] <= CHUNK_SIZE  # the one chunk it touches
    assert bkfs.cache_du()["bytes"] <= CHUNK_SIZE


def test_full_read_and_reread_after_remount_come_from_the_cache(
    cli: CLI, tmp_path: Path, serve, bkfs: Bkfs, mounts: Mounts
) -> None:  # type: ignore[no-untyped-def]
    big = binary(64 * MiB, seed=64)
    lazy = make_lazy(cli, tmp_path, serve, {"big/big.bin": big})
    mnt = mounts.foreground(lazy.lazy, "mnt").mountpoint
    with open(mnt / "big/big.bin", "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    assert digest == hashlib.sha256(big).hexdigest()
    for rel in BAM_FILES:
        assert (mnt / rel).read_bytes() == lazy.files[rel]
    s = bkfs.status(mnt)
    total = len(big) + sum(len(lazy.files[r]) for r in BAM_FILES)
    assert s["bam_bytes_fetched"] == total  # each byte once
    assert s["bam_objects_fetched"] == 5
    assert s["server_requests"] < 64 // 2  # read-ahead asks for several chunks at a time
    # A warm re-read is served by the kernel's page cache (keep_cache): the daemon sees next
    # to nothing (the kernel may re-ask for a few pages it had not kept).
    assert (mnt / "big/big.bin").read_bytes() == big
    assert bkfs.status(mnt)["bytes_served"] - s["bytes_served"] < len(big) // 20

    mounts.cleanup()
    lazy.server.stop()  # from here on there is no server at all
    mnt = mounts.foreground(lazy.lazy, "again").mountpoint
    assert (mnt / "big/big.bin").read_bytes() == big
    for rel in BAM_FILES:
        assert (mnt / rel).read_bytes() == lazy.files[rel]
    s = bkfs.status(mnt)
    assert s["bam_bytes_fetched"] == 0
    assert s["cache_hits"] >= 64
    assert s["errors"] == []


def test_concurrent_readers_share_one_fetch(lazy: Lazy, bkfs: Bkfs, mounts: Mounts) -> None:
    mnt = mounts.foreground(lazy.lazy, "mnt").mountpoint
    names = ["tex/a.bin", "tex/b.bin"]
    results: dict[tuple[str, int], bytes] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def reader(rel: str, k: int) -> None:
        try:
            barrier.wait()
            fd = os.open(mnt / rel, os.O_RDONLY)
            try:
                offsets = list(range(0, os.fstat(fd).st_size, 256 << 10))
                start = (k * 5) % len(offsets)  # each reader starts elsewhere and wraps around
                parts = {o: os.pread(fd, 256 << 10, o) for o in offsets[start:] + offsets[:start]}
                results[(rel, k)] = b"".join(parts[o] for o in offsets)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(names[k % 2], k)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for (rel, _k), got in results.items():
        assert got == lazy.files[rel]
    s = bkfs.status(mnt)
    assert s["bam_objects_fetched"] == 2
    assert s["bam_bytes_fetched"] == sum(len(lazy.files[r]) for r in names)


def test_prefetch_then_offline(lazy: Lazy, bkfs: Bkfs, mounts: Mounts) -> None:
    mnt = mounts.foreground(lazy.lazy, "mnt").mountpoint
    out = bkfs.run("prefetch", str(mnt), "tex/*.bin").stdout
    assert "prefetched 3 of 3 files" in out
    s = bkfs.status(mnt)
    prefetched = ["tex/a.bin", "tex/b.bin", "tex/small.bin"]
    assert s["bam_bytes_fetched"] == sum(len(lazy.files[r]) for r in prefetched)
    assert bkfs.run("prefetch", str(mnt), "*.bin", "other").stdout.startswith(
        "prefetched 4 of 4 files"
    )
    mounts.cleanup()
    lazy.server.stop()

    mnt = mounts.foreground(lazy.lazy, "offline", "--offline").mountpoint
    for rel in [*prefetched, "other/c.bin"]:
        assert (mnt / rel).read_bytes() == lazy.files[rel]
    assert bkfs.status(mnt)["bam_bytes_fetched"] == 0


def test_offline_fails_at_once_for_what_is_not_local(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    mnt = mounts.foreground(lazy.lazy, "mnt", "--offline").mountpoint
    with pytest.raises(OSError, match="Input/output error") as e:
        (mnt / "tex/b.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / "src/main.c").read_bytes() == lazy.files["src/main.c"]
    s = bkfs.status(mnt)
    assert s["offline"] is True
    assert s["server_requests"] == 0
    [err] = s["errors"]
    assert err["path"] == "tex/b.bin" and "offline" in err["reason"]
    line = bkfs.fails("prefetch", str(mnt), "other/*")
    assert "other/c.bin" in line and "offline" in line


def test_cache_cap_is_held_with_two_daemons_sharing_it(
    lazy: Lazy, bkfs: Bkfs, mounts: Mounts
) -> None:
    one = mounts.foreground(lazy.lazy, "one", "--cache-size", "4M").mountpoint
    two = mounts.foreground(lazy.lazy, "two", "--cache-size", "4M").mountpoint
    errors: list[BaseException] = []

    def read_all(mnt: Path) -> None:
        try:
            for rel in BAM_FILES:
                assert (mnt / rel).read_bytes() == lazy.files[rel]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=read_all, args=(m,)) for m in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    du = bkfs.cache_du()
    assert du["cap"] == 4 * MiB
    assert 0 < du["bytes"] <= 4 * MiB
    assert du["file_bytes"] <= 12 * MiB  # LMDB reuses freed pages: the file stays near the cap
    assert "emptied" in bkfs.run("cache", "clean").stdout  # daemons are using it
    assert bkfs.cache_du()["bytes"] == 0
    assert (one / "other/c.bin").read_bytes() == lazy.files["other/c.bin"]
    mounts.cleanup()
    assert "removed" in bkfs.run("cache", "clean").stdout
