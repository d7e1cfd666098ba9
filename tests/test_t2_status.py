"""``bkr status`` against a reference walk, through every shortcut of the per-directory index,
and repositories whose index is in format 1 (one key per path)."""

from __future__ import annotations

import os
import random
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest
from conftest import CLI, write_files
from statusref import reference_status

from bkrepo import worktree
from bkrepo.lock import RepoLock
from bkrepo.repo import Repo
from bkrepo.worktree import WorkState

MakeRepo = Callable[..., Path]
TRUSTED = 0.06  # > RACY_NS: stats older than this are recorded by the next status


def status(cli: CLI, repo: Path, *args: str) -> list[str]:
    return cli("status", *args, cwd=repo).splitlines()


def agree(cli: CLI, repo: Path, *scope: str) -> list[str]:
    """``bkr status`` twice (the second run uses what the first recorded) equals the
    reference; returns the lines."""
    want = reference_status(repo, [os.fsencode(s) for s in scope] or None)
    assert status(cli, repo, *scope) == want
    assert status(cli, repo, *scope) == want
    return want


def index_table(repo: Path) -> dict[bytes, bytes]:
    with lmdb.open(str(repo / ".bk" / "db"), max_dbs=16, readonly=True, lock=False) as env:
        db = env.open_db(b"index", create=False)
        with env.begin(db=db) as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}


def recorded_dirs(repo: Path) -> dict[bytes, bool]:
    """Directory -> whether its stat is recorded (the listing shortcut), from the index's
    records (format 2: key ``/`` + directory, first byte of the value its flags)."""
    return {k[1:]: bool(v[0] & 1) for k, v in index_table(repo).items()}


def test_directory_shortcuts_see_every_change(make_repo: MakeRepo, cli: CLI) -> None:
    tree = {f"d{i}/sub/f{j}.txt": f"{i} {j}\n".encode() for i in range(3) for j in range(3)}
    repo = make_repo("r", {**tree, "top.txt": b"top\n", "d0/x.txt": b"x\n"})
    time.sleep(TRUSTED)
    assert agree(cli, repo) == []
    # a clean, settled tree: every directory's stat is recorded, so the next status lists none
    assert all(recorded_dirs(repo).values())
    assert set(recorded_dirs(repo)) == {b"", b"d0", b"d1", b"d2", b"d0/sub", b"d1/sub", b"d2/sub"}

    (repo / "d0" / "sub" / "new.txt").write_text("untracked\n")
    assert agree(cli, repo) == ["?  d0/sub/new.txt"]
    (repo / "d0" / "sub" / "new.txt").unlink()
    (repo / "d1" / "sub" / "f0.txt").unlink()
    assert agree(cli, repo) == ["!  d1/sub/f0.txt"]
    cli("get", "d1/sub/f0.txt", cwd=repo)
    # a file replaced by a directory; a directory replaced by a file
    (repo / "d0" / "x.txt").unlink()
    (repo / "d0" / "x.txt").mkdir()
    (repo / "d0" / "x.txt" / "in.txt").write_text("in\n")
    shutil.rmtree(repo / "d2" / "sub")
    (repo / "d2" / "sub").write_text("now a file\n")
    assert agree(cli, repo) == [
        "!  d0/x.txt",
        "?  d0/x.txt/in.txt",
        "?  d2/sub",
        "!  d2/sub/f0.txt",
        "!  d2/sub/f1.txt",
        "!  d2/sub/f2.txt",
    ]
    shutil.rmtree(repo / "d0" / "x.txt")
    (repo / "d2" / "sub").unlink()
    cli("get", "d0/x.txt", "d2", cwd=repo)
    time.sleep(TRUSTED)
    assert agree(cli, repo) == []
    # a nested repository where a tracked directory was: its files are its own
    cli("init", str(repo / "d1" / "sub"), cwd=repo)
    assert agree(cli, repo) == ["!  d1/sub/f0.txt", "!  d1/sub/f1.txt", "!  d1/sub/f2.txt"]
    shutil.rmtree(repo / "d1" / "sub" / ".bk")
    # staging changes the names a directory should hold
    cli("rm", "--keep", "d0/sub/f1.txt", cwd=repo)
    (repo / "d2" / "sub" / "added.txt").write_text("a\n")
    cli("add", "d2/sub/added.txt", cwd=repo)
    cli("mv", "top.txt", "d1/top.txt", cwd=repo)
    assert agree(cli, repo) == [
        "?  d0/sub/f1.txt",
        "D  d0/sub/f1.txt",
        "R  top.txt -> d1/top.txt",
        "A  d2/sub/added.txt",
    ]
    cli("commit", "-m", "staged", cwd=repo)
    time.sleep(TRUSTED)
    assert agree(cli, repo) == ["?  d0/sub/f1.txt"]
    # in-place edits never change a directory: same size, mtime put back (ctime still moves)
    f = repo / "d2" / "sub" / "f2.txt"
    st = f.stat()
    f.write_text("2 X\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    (repo / "d1" / "sub" / "f0.txt").chmod(0o755)
    assert agree(cli, repo) == ["?  d0/sub/f1.txt", "M  d1/sub/f0.txt", "M  d2/sub/f2.txt"]
    assert agree(cli, repo, "d2") == ["M  d2/sub/f2.txt"]
    assert agree(cli, repo, "d1/sub/f0.txt", "d0/sub") == ["?  d0/sub/f1.txt", "M  d1/sub/f0.txt"]


def test_status_agrees_with_the_reference_walk(make_repo: MakeRepo, cli: CLI) -> None:
    """Random edits of the tree and the staging area, checked after every step."""
    rng = random.Random(20261202)
    names = ["a", "b", "c"]
    tree = {f"{d}/{s}/{n}.txt": f"{d}{s}{n}\n".encode() for d in names for s in names for n in "xy"}
    repo = make_repo("r", {**tree, "a/top.bin": b"\0\1\2" * 10})
    time.sleep(TRUSTED)

    def pick(kind: str) -> Path | None:
        found = []
        for dirpath, dirnames, filenames in os.walk(repo):
            dirnames[:] = [d for d in dirnames if d != ".bk"]
            found += [Path(dirpath) / n for n in (filenames if kind == "file" else dirnames)]
        return rng.choice(found) if found else None

    def rel(p: Path) -> str:
        return str(p.relative_to(repo))

    for step in range(24):
        op = rng.choice(
            ["edit", "new", "delete", "file2dir", "dir2file", "link", "chmod", "nested",
             "add", "rm", "mv", "commit", "get", "mkdir", "rmtree", "ignore", "settle"]
        )  # fmt: skip
        f, d = pick("file"), pick("dir")
        if op == "edit" and f:
            f.write_bytes(f.read_bytes() + b"more\n") if not f.is_symlink() else None
        elif op == "new":
            base = d or repo
            (base / f"n{rng.randrange(100)}.{rng.choice(['txt', 'log'])}").write_text("new\n")
        elif op == "delete" and f:
            f.unlink()
        elif op == "file2dir" and f:
            f.unlink()
            f.mkdir()
            (f / "inside.txt").write_text("inside\n")
        elif op == "dir2file" and d:
            shutil.rmtree(d)
            d.write_text("was a directory\n")
        elif op == "link" and f:
            f.unlink()
            f.symlink_to("elsewhere")
        elif op == "chmod" and f and not f.is_symlink():
            f.chmod(f.stat().st_mode ^ 0o100)
        elif op == "nested" and d and not (d / ".bk").exists():
            cli("init", "-q", str(d), cwd=repo)
        elif op == "add" and f:
            cli.run("add", "-q", rel(f), cwd=repo, ok=None)
        elif op == "rm" and f:
            cli.run("rm", "-q", *rng.choice([[], ["--keep"], ["-f"]]), rel(f), cwd=repo, ok=None)
        elif op == "mv" and f:
            cli.run("mv", "-q", rel(f), rel(f) + ".moved", cwd=repo, ok=None)
        elif op == "commit":
            cli.run("commit", "-q", "-m", "step", cwd=repo, ok=None)
        elif op == "get":
            cli.run("get", "-q", "-f", ".", cwd=repo, ok=None)
        elif op == "mkdir":
            ((d or repo) / f"empty{rng.randrange(10)}").mkdir(exist_ok=True)
        elif op == "rmtree" and d:
            shutil.rmtree(d)
        elif op == "ignore":
            (repo / ".bkignore").write_text(rng.choice(["*.log\n", "b/\n", "**/x.txt\n", ""]))
        elif op == "settle":
            time.sleep(TRUSTED)
        agree(cli, repo)
        if step % 3 == 0 and d is not None and d.is_dir() and not d.is_symlink():
            assert status(cli, repo, rel(d)) == reference_status(repo, [os.fsencode(rel(d))])


def test_checkout_none_clone_status(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    make_repo("a", {"d/f.txt": b"f\n", "d/g.txt": b"g\n", "top.txt": b"t\n"})
    cli("clone", "--checkout", "none", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    assert agree(cli, b) == []  # the first status stores the index; the second reads it
    cli("get", "d/f.txt", cwd=b)
    assert agree(cli, b) == []
    (b / "d" / "f.txt").unlink()
    (b / "d" / "new.txt").write_text("n\n")
    assert agree(cli, b) == ["!  d/f.txt", "?  d/new.txt"]


def _to_format_1(repo: Path) -> None:
    """Rewrite a repository's index the way bkr format 1 stored it: one key per path, value
    ``<BcIqqqq16s32s`` (flags, kind, mode, size, mtime, ino, ctime, root key, id)."""
    with Repo.open(repo) as r, r.store.read() as txn:
        entries = WorkState.load(r, txn).entries
    v1 = struct.Struct("<BcIqqqq16s32s")
    with lmdb.open(str(repo / ".bk" / "db"), max_dbs=16) as env:
        index, meta = env.open_db(b"index"), env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.drop(index, delete=False)
            for p, e in entries.items():
                value = v1.pack(e.flags, e.kind.encode(), e.mode, e.size, e.mtime_ns, e.ino,
                                e.ctime_ns, e.rootkey, e.id)  # fmt: skip
                txn.put(p, value, db=index)
            txn.delete(b"index_format", db=meta)
            txn.put(b"format", b"1", db=meta)
    (repo / ".bk" / "FORMAT").write_text("bkrepo 1\n")


def test_format_1_repository_is_read_then_converted(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"d/a.txt": b"a\n", "d/b.txt": b"b\n", "top.txt": b"t\n"})
    (repo / "d" / "a.txt").write_text("changed\n")
    (repo / "new.txt").write_text("n\n")
    cli("add", "new.txt", cwd=repo)
    cli("mv", "top.txt", "d/top.txt", cwd=repo)
    want = ["M  d/a.txt", "R  top.txt -> d/top.txt", "A  new.txt"]
    want.sort(key=lambda line: line.split()[-1])
    assert status(cli, repo) == want
    _to_format_1(repo)
    assert sorted(index_table(repo)) == [b"d/a.txt", b"d/b.txt", b"d/top.txt", b"new.txt"]
    # a read that cannot take the lock reads format 1 as it is
    lock = RepoLock(repo / ".bk" / "lock")
    lock.acquire("test", 1)
    try:
        assert status(cli, repo) == want
        assert (repo / ".bk" / "FORMAT").read_text() == "bkrepo 1\n"
    finally:
        lock.release()
    # the first command that writes converts it (here status, storing what it learned)
    assert agree(cli, repo) == want
    assert (repo / ".bk" / "FORMAT").read_text() == "bkrepo 2\n"
    assert set(recorded_dirs(repo)) == {b"", b"d"}
    cli("commit", "-m", "after conversion", cwd=repo)
    assert agree(cli, repo) == []
    assert cli("get", "-p", "d/top.txt", cwd=repo) == "t\n"


def test_format_1_converted_by_a_write_command(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"x/y/z.txt": b"z\n", "w.txt": b"w\n"})
    _to_format_1(repo)
    write_files(repo, {"x/new.txt": b"n\n"})
    cli("add", "x/new.txt", cwd=repo)
    assert (repo / ".bk" / "FORMAT").read_text() == "bkrepo 2\n"
    assert set(recorded_dirs(repo)) == {b"", b"x", b"x/y"}
    assert agree(cli, repo) == ["A  x/new.txt"]


def test_two_process_check_finds_changes_in_both_halves(
    make_repo: MakeRepo, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-tree status of many files checks half of the directories in a forked child;
    changes in either half are found, and a child that cannot be started changes nothing.
    In a process with other threads neither the child nor the change of directory is used."""
    repo = make_repo(
        "r", {f"d{i}/f{j}.txt": f"{i}{j}\n".encode() for i in range(8) for j in range(4)}
    )
    time.sleep(TRUSTED)
    assert agree(cli, repo) == []
    for i in range(8):  # both halves: the child takes every other directory
        (repo / f"d{i}" / "f1.txt").write_text("edited\n")
    (repo / "d3" / "f2.txt").unlink()
    want = reference_status(repo)
    assert len(want) == 9
    monkeypatch.setattr(worktree, "PARALLEL_FILES", 1)
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())

    def scan_lines() -> list[str]:
        with Repo.open(repo) as r, r.store.read() as txn:
            return [c.display() for c in worktree.scan(r, txn, WorkState.load(r, txn)).changes]

    cwd = os.getcwd()
    assert scan_lines() == want and forks == [1]
    assert os.getcwd() == cwd  # status changes into directories to lstat names; put back

    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert scan_lines() == want
    # with another thread running: no child, no change of directory, the same answer
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    monkeypatch.setattr(os, "chdir", lambda path: pytest.fail("chdir with a thread running"))
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert scan_lines() == want and forks == [1]
    finally:
        release.set()
        other.join()
