"""The working tree through the real CLI: init, add, rm, mv, commit, status, diff, get, config."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from conftest import CLI, keys, write_files
from t2help import binary, fails, files

MakeRepo = Callable[..., Path]


def status(cli: CLI, repo: Path, *args: str) -> list[str]:
    return cli("status", *args, cwd=repo).splitlines()


# -- init ----------------------------------------------------------------------------------------
def test_init_new_dir_and_existing_dir_with_files(tmp_path: Path, cli: CLI) -> None:
    out = cli("init", "fresh", cwd=tmp_path)
    assert "fresh" in out
    assert (tmp_path / "fresh" / ".bk" / "FORMAT").is_file()
    assert status(cli, tmp_path / "fresh") == []
    assert keys(cli, tmp_path / "fresh") == []
    assert cli("log", cwd=tmp_path / "fresh") == ""

    existing = tmp_path / "existing"
    write_files(existing, {"a.txt": b"a\n", "sub/b.txt": b"b\n"})
    cli("init", cwd=existing)  # no DIR: the current directory
    assert files(existing) == {"a.txt": b"a\n", "sub/b.txt": b"b\n"}
    assert status(cli, existing) == ["?  a.txt", "?  sub/b.txt"]
    cli("add", ".", cwd=existing)
    cli("commit", "-m", "adopt", cwd=existing)
    assert status(cli, existing) == []
    assert len(keys(cli, existing)) == 1
    # -q prints nothing, after the command or before it
    assert cli("init", "-q", "quiet", cwd=tmp_path) == ""
    assert cli("-q", "init", "quiet2", cwd=tmp_path) == ""
    assert cli("-q", "bam", "check", cwd=tmp_path / "quiet2") == ""


def test_init_twice_is_refused(tmp_path: Path, cli: CLI) -> None:
    cli("init", "r", cwd=tmp_path)
    (tmp_path / "r" / "f").write_text("x\n")
    cli("add", "f", cwd=tmp_path / "r")
    cli("commit", "-m", "one", cwd=tmp_path / "r")
    before = keys(cli, tmp_path / "r")
    pid = cli("id", cwd=tmp_path / "r")
    line = fails(cli, "init", "r", cwd=tmp_path, code=2)
    assert "already" in line
    assert keys(cli, tmp_path / "r") == before
    assert cli("id", cwd=tmp_path / "r") == pid


def test_init_bam_options(tmp_path: Path, cli: CLI) -> None:
    cli("init", "t", "--bam-threshold", "1K", cwd=tmp_path)
    assert cli("config", "bam.threshold", cwd=tmp_path / "t").strip() == "1K"
    cli("init", "n", "--no-bam", cwd=tmp_path)
    assert cli("config", "bam.threshold", cwd=tmp_path / "n").strip() == "off"
    fails(cli, "init", "bad", "--bam-threshold", "lots", cwd=tmp_path, code=2)
    assert not (tmp_path / "bad" / ".bk").exists()
    cli("init", "d", cwd=tmp_path)
    assert cli("config", "bam.threshold", cwd=tmp_path / "d").strip() == "64K"


# -- add -------------------------------------------------------------------------------------------
def test_add_files_dirs_symlinks_ignores_and_nested_repos(tmp_path: Path, cli: CLI) -> None:
    repo = tmp_path / "r"
    cli("init", str(repo), cwd=tmp_path)
    write_files(
        repo,
        {
            "top.txt": b"top\n",
            "dir/a.txt": b"a\n",
            "dir/deep/b.txt": b"b\n",
            "dir/junk.o": b"obj\n",
            "build/out.txt": b"out\n",
            ".bkignore": b"# comment\n*.o\nbuild/\n",
        },
    )
    os.symlink("top.txt", repo / "link")
    os.symlink("dir", repo / "dirlink")
    cli("init", str(repo / "nested"), cwd=tmp_path)
    (repo / "nested" / "inner.txt").write_text("inner\n")

    st = status(cli, repo)
    assert "?  dir/junk.o" not in st and not any("build" in s for s in st)
    assert not any("nested" in s for s in st)

    out = cli("add", "dir", cwd=repo)
    assert out.splitlines() == ["A  dir/a.txt", "A  dir/deep/b.txt"]
    out = cli("add", ".", cwd=repo)
    assert sorted(out.splitlines()) == ["A  .bkignore", "A  dirlink", "A  link", "A  top.txt"]
    # adding again is a no-op
    assert cli("add", ".", cwd=repo) == ""
    assert status(cli, repo) == [
        "A  .bkignore",
        "A  dir/a.txt",
        "A  dir/deep/b.txt",
        "A  dirlink",
        "A  link",
        "A  top.txt",
    ]
    cli("commit", "-m", "first", cwd=repo)
    assert status(cli, repo) == []
    cli("clone", "r", "c", cwd=tmp_path)
    c = tmp_path / "c"
    assert os.readlink(c / "link") == "top.txt"
    assert os.readlink(c / "dirlink") == "dir"
    assert (c / "dir" / "deep" / "b.txt").read_bytes() == b"b\n"
    assert not (c / "nested").exists() and not (c / "build").exists()
    assert not (c / "dir" / "junk.o").exists()

    # naming a nested repo or a file in it is refused: that repo tracks it
    for path in ("nested", "nested/inner.txt"):
        line = fails(cli, "add", path, cwd=repo)
        assert "nested repository" in line
    assert "nested" not in cli("status", cwd=repo)
    # the nested repo is its own repo: commands inside it act on it
    cli("add", "inner.txt", cwd=repo / "nested")
    cli("commit", "-m", "inner", cwd=repo / "nested")
    assert len(keys(cli, repo / "nested")) == 1
    assert len(keys(cli, repo)) == 1


def test_add_from_subdirectory_and_missing_path(tmp_path: Path, cli: CLI) -> None:
    repo = tmp_path / "r"
    cli("init", str(repo), cwd=tmp_path)
    write_files(repo, {"sub/x.txt": b"x\n", "y.txt": b"y\n"})
    assert cli("add", "x.txt", "../y.txt", cwd=repo / "sub").splitlines() == [
        "A  sub/x.txt",
        "A  y.txt",
    ]
    line = fails(cli, "add", "nope.txt", cwd=repo)
    assert "nope.txt" in line
    fails(cli, "add", str(tmp_path), cwd=repo)  # outside the repo
    fails(cli, "add", cwd=repo, code=2)


def test_add_bam_and_no_bam_flags(tmp_path: Path, cli: CLI) -> None:
    repo = tmp_path / "r"
    cli("init", str(repo), cwd=tmp_path)
    write_files(repo, {"small.txt": b"tiny text\n", "big.bin": binary(100_000)})
    cli("add", "--bam", "small.txt", cwd=repo)
    cli("add", "--no-bam", "big.bin", cwd=repo)
    cli("commit", "-m", "forced", cwd=repo)
    du = cli("bam", "du", cwd=repo)
    assert "local" in du and " 1 objects" in du
    import hashlib

    assert [p.name for p in (repo / ".bk" / "bam").glob("??/*")] == [
        hashlib.sha256(b"tiny text\n").hexdigest()
    ]
    fails(cli, "add", "--bam", "--no-bam", "small.txt", cwd=repo, code=2)


# -- rm --------------------------------------------------------------------------------------------
def test_rm_variants(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n", "b.txt": b"b\n", "c.txt": b"c\n", "d/e.txt": b"e\n"})
    # plain rm: file goes, D shows, commit records it
    assert cli("rm", "a.txt", cwd=repo).strip() == "D  a.txt"
    assert not (repo / "a.txt").exists()
    assert status(cli, repo) == ["D  a.txt"]
    # --keep: file stays, untracked
    cli("rm", "--keep", "b.txt", cwd=repo)
    assert (repo / "b.txt").read_bytes() == b"b\n"
    assert sorted(status(cli, repo)) == ["?  b.txt", "D  a.txt", "D  b.txt"]
    # modified file refused, nothing changed
    (repo / "c.txt").write_bytes(b"changed\n")
    line = fails(cli, "rm", "c.txt", cwd=repo)
    assert "c.txt" in line
    assert (repo / "c.txt").read_bytes() == b"changed\n"
    assert "M  c.txt" in status(cli, repo)
    # -f removes it anyway
    cli("rm", "-f", "c.txt", cwd=repo)
    assert not (repo / "c.txt").exists()
    # a directory
    cli("rm", "d", cwd=repo)
    assert not (repo / "d").exists()
    fails(cli, "rm", "never.txt", cwd=repo)
    cli("commit", "-m", "removals", cwd=repo)
    assert status(cli, repo) == ["?  b.txt"]
    assert "D  a.txt" in cli("log", "-v", "-r", "+", cwd=repo)
    # the removed file is still in history
    assert cli("get", "-p", "-r", "+~1", "a.txt", cwd=repo) == "a\n"


def test_rm_unadds_an_added_file(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n"})
    (repo / "new.txt").write_text("new\n")
    cli("add", "new.txt", cwd=repo)
    assert status(cli, repo) == ["A  new.txt"]
    cli("rm", "new.txt", cwd=repo)
    assert (repo / "new.txt").read_text() == "new\n"
    assert status(cli, repo) == ["?  new.txt"]
    fails(cli, "commit", "-m", "nothing", cwd=repo)


def test_rm_then_commit_of_file_deleted_by_hand(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n", "b.txt": b"b\n"})
    (repo / "a.txt").unlink()
    assert status(cli, repo) == ["!  a.txt"]
    # a missing file is not a change to commit: bkr rm it first
    p = cli.run("commit", "-m", "x", cwd=repo, ok=False)
    assert "nothing to commit" in p.stderr
    cli("rm", "a.txt", cwd=repo)
    assert status(cli, repo) == ["D  a.txt"]
    cli("commit", "-m", "rm a", cwd=repo)
    assert status(cli, repo) == []


# -- mv --------------------------------------------------------------------------------------------
def test_mv_file_and_history_follows(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"one\n", "other.txt": b"o\n"})
    (repo / "a.txt").write_text("two\n")
    cli("commit", "-m", "edit a", cwd=repo)
    old = keys(cli, repo)
    assert cli("mv", "a.txt", "b.txt", cwd=repo).strip() == "R  a.txt -> b.txt"
    assert not (repo / "a.txt").exists() and (repo / "b.txt").read_text() == "two\n"
    assert status(cli, repo) == ["R  a.txt -> b.txt"]
    (repo / "b.txt").write_text("three\n")
    assert status(cli, repo) == ["RM a.txt -> b.txt"]
    cli("commit", "-m", "rename", cwd=repo)
    assert status(cli, repo) == []
    assert "RM a.txt -> b.txt" in cli("log", "-v", "-r", "+", cwd=repo)
    all_keys = keys(cli, repo)
    assert cli("log", "--keys", "b.txt", cwd=repo).split() == all_keys
    assert cli("log", "--keys", "other.txt", cwd=repo).split() == [old[-1]]
    # the old name is not tracked any more
    fails(cli, "mv", "a.txt", "c.txt", cwd=repo)


def test_mv_directory_into_existing_dir_and_back(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"src/a.txt": b"a\n", "src/sub/b.txt": b"b\n", "dest/keep.txt": b"k\n"})
    cli("mv", "src", "dest", cwd=repo)
    assert files(repo) == {
        "dest/keep.txt": b"k\n",
        "dest/src/a.txt": b"a\n",
        "dest/src/sub/b.txt": b"b\n",
    }
    assert status(cli, repo) == [
        "R  src/a.txt -> dest/src/a.txt",
        "R  src/sub/b.txt -> dest/src/sub/b.txt",
    ]
    # back to the original name: no change left
    cli("mv", "dest/src", "src", cwd=repo)
    assert status(cli, repo) == []
    fails(cli, "commit", "-m", "nothing", cwd=repo)
    # onto an existing file: refused
    fails(cli, "mv", "src/a.txt", "dest/keep.txt", cwd=repo)
    # into itself: refused
    fails(cli, "mv", "src", "src/sub/x", cwd=repo)
    cli("mv", "src", "moved", cwd=repo)
    cli("commit", "-m", "move dir", cwd=repo)
    assert status(cli, repo) == []
    assert sorted(files(repo)) == ["dest/keep.txt", "moved/a.txt", "moved/sub/b.txt"]
    assert len(cli("log", "--keys", "moved/sub/b.txt", cwd=repo).split()) == 2


def test_mv_added_file_stays_added(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n"})
    (repo / "n.txt").write_text("n\n")
    cli("add", "n.txt", cwd=repo)
    cli("mv", "n.txt", "m.txt", cwd=repo)
    assert status(cli, repo) == ["A  m.txt"]
    cli("commit", "-m", "add m", cwd=repo)
    assert "A  m.txt" in cli("log", "-v", "-r", "+", cwd=repo)


# -- commit ----------------------------------------------------------------------------------------
def test_commit_all_or_named_paths(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n", "b.txt": b"b\n", "d/c.txt": b"c\n"})
    (repo / "a.txt").write_text("a2\n")
    (repo / "b.txt").write_text("b2\n")
    (repo / "d" / "c.txt").write_text("c2\n")
    cli("commit", "-m", "only a and d", "a.txt", "d", cwd=repo)
    assert status(cli, repo) == ["M  b.txt"]
    log = cli("log", "-v", "-r", "+", cwd=repo)
    assert "M  a.txt" in log and "M  d/c.txt" in log and "b.txt" not in log
    cli("commit", "-m", "the rest", cwd=repo)
    assert status(cli, repo) == []
    assert len(keys(cli, repo)) == 3
    fails(cli, "commit", "-m", "x", "no-such-file", cwd=repo)


def test_commit_nothing_and_empty_message(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n"})
    line = fails(cli, "commit", "-m", "nothing", cwd=repo)
    assert "nothing to commit" in line
    (repo / "a.txt").write_text("changed\n")
    fails(cli, "commit", "-m", "", cwd=repo, code=2)
    fails(cli, "commit", "-m", "   ", cwd=repo, code=2)
    fails(cli, "commit", cwd=repo, code=2)
    assert status(cli, repo) == ["M  a.txt"]
    assert len(keys(cli, repo)) == 1


def test_commit_records_renamed_file_by_either_name(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n", "z.txt": b"z\n"})
    cli("mv", "a.txt", "b.txt", cwd=repo)
    (repo / "z.txt").write_text("z2\n")
    cli("commit", "-m", "rename by old name", "a.txt", cwd=repo)
    assert status(cli, repo) == ["M  z.txt"]
    assert "R  a.txt -> b.txt" in cli("log", "-v", "-r", "+", cwd=repo)


def test_commit_mode_change_and_symlink_retarget(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"run.sh": b"#!/bin/sh\necho hi\n"})
    os.chmod(repo / "run.sh", 0o755)
    os.symlink("run.sh", repo / "l")
    cli("add", "l", cwd=repo)
    assert status(cli, repo) == ["A  l", "M  run.sh"]
    cli("commit", "-m", "exec + link", cwd=repo)
    assert status(cli, repo) == []
    os.unlink(repo / "l")
    os.symlink("elsewhere", repo / "l")
    assert status(cli, repo) == ["M  l"]
    cli("commit", "-m", "retarget", cwd=repo)
    cli("clone", "r", "c", cwd=repo.parent)
    c = repo.parent / "c"
    assert os.stat(c / "run.sh").st_mode & 0o777 == 0o755
    assert os.readlink(c / "l") == "elsewhere"


# -- status ----------------------------------------------------------------------------------------
def test_status_codes(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo(
        "r",
        {"mod.txt": b"m\n", "del.txt": b"d\n", "ren.txt": b"r\n", "rm2.txt": b"r2\n", "gone": b"g"},
    )
    (repo / "mod.txt").write_text("m2\n")
    cli("rm", "del.txt", cwd=repo)
    cli("mv", "ren.txt", "renamed.txt", cwd=repo)
    cli("mv", "rm2.txt", "renamed2.txt", cwd=repo)
    (repo / "renamed2.txt").write_text("changed too\n")
    (repo / "gone").unlink()
    (repo / "new.txt").write_text("n\n")
    (repo / "added.txt").write_text("a\n")
    cli("add", "added.txt", cwd=repo)
    assert status(cli, repo) == [
        "A  added.txt",
        "D  del.txt",
        "!  gone",
        "M  mod.txt",
        "?  new.txt",
        "R  ren.txt -> renamed.txt",
        "RM rm2.txt -> renamed2.txt",
    ]
    # --no-untracked and path scoping
    assert "?  new.txt" not in status(cli, repo, "--no-untracked")
    assert status(cli, repo, "mod.txt") == ["M  mod.txt"]
    # status is read-only as far as the user can see: same answer twice
    assert status(cli, repo) == status(cli, repo)


def test_status_same_size_edit_is_seen(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"aaaa\n"})
    st = os.stat(repo / "a.txt")
    (repo / "a.txt").write_bytes(b"bbbb\n")
    os.utime(repo / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert status(cli, repo) == ["M  a.txt"]


# -- diff ------------------------------------------------------------------------------------------
def test_diff(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"one\ntwo\nthree\n", "b.bin": b"\0\1\2", "c.txt": b"c\n"})
    assert cli("diff", cwd=repo) == ""
    (repo / "a.txt").write_text("one\nTWO\nthree\n")
    (repo / "b.bin").write_bytes(b"\0\1\3")
    cli("rm", "c.txt", cwd=repo)
    (repo / "n.txt").write_text("new\n")
    cli("add", "n.txt", cwd=repo)
    out = cli("diff", cwd=repo)
    assert "diff --bkr a/a.txt b/a.txt" in out
    assert "-two\n+TWO\n" in out
    assert "Binary files a/b.bin and b/b.bin differ" in out
    assert "--- a/c.txt" in out and "-c\n" in out
    assert "+++ b/n.txt" in out and "+new\n" in out
    only = cli("diff", "a.txt", cwd=repo)
    assert "a.txt" in only and "b.bin" not in only
    cli("commit", "-m", "two", cwd=repo)
    assert cli("diff", cwd=repo) == ""
    # against an older revision
    old = cli("diff", "-r", "+~1", "a.txt", cwd=repo)
    assert "-two\n+TWO\n" in old


# -- get -------------------------------------------------------------------------------------------
def test_get_old_revision_stdout_force_and_restore(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"v1\n", "b.txt": b"b\n"})
    (repo / "a.txt").write_text("v2\n")
    cli("commit", "-m", "v2", cwd=repo)
    # -p: content to stdout, working tree untouched
    assert cli("get", "-p", "-r", "+~1", "a.txt", cwd=repo) == "v1\n"
    assert cli("get", "-p", "a.txt", cwd=repo) == "v2\n"
    assert (repo / "a.txt").read_text() == "v2\n"
    # -r writes the old content; it shows as a change
    cli("get", "-r", "+~1", "a.txt", cwd=repo)
    assert (repo / "a.txt").read_text() == "v1\n"
    assert status(cli, repo) == ["M  a.txt"]
    # refusing to overwrite a modified file, then -f
    line = fails(cli, "get", "a.txt", cwd=repo)
    assert "a.txt" in line
    assert (repo / "a.txt").read_text() == "v1\n"
    cli("get", "-f", "a.txt", cwd=repo)
    assert (repo / "a.txt").read_text() == "v2\n"
    assert status(cli, repo) == []
    # restoring a file deleted by hand
    (repo / "b.txt").unlink()
    assert status(cli, repo) == ["!  b.txt"]
    cli("get", "b.txt", cwd=repo)
    assert (repo / "b.txt").read_text() == "b\n"
    assert status(cli, repo) == []
    # the whole tree
    (repo / "a.txt").unlink()
    (repo / "b.txt").unlink()
    cli("get", ".", cwd=repo)
    assert files(repo) == {"a.txt": b"v2\n", "b.txt": b"b\n"}
    fails(cli, "get", "zzz.txt", cwd=repo)
    fails(cli, "get", "-r", "nosuchrev", "a.txt", cwd=repo)


def test_get_after_rm_and_mv(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n", "b.txt": b"b\n"})
    # getting a removed file back takes the removal back
    cli("rm", "a.txt", cwd=repo)
    cli("get", "a.txt", cwd=repo)
    assert (repo / "a.txt").read_text() == "a\n"
    assert status(cli, repo) == []
    fails(cli, "commit", "-m", "nothing", cwd=repo)
    # the old name of a renamed file gets an untracked copy; the rename stands
    cli("mv", "b.txt", "c.txt", cwd=repo)
    cli("get", "b.txt", cwd=repo)
    assert (repo / "b.txt").read_text() == "b\n"
    assert status(cli, repo) == ["?  b.txt", "R  b.txt -> c.txt"]
    cli("commit", "-m", "rename", cwd=repo)
    assert status(cli, repo) == ["?  b.txt"]
    (repo / "b.txt").write_text("edited copy\n")
    assert status(cli, repo) == ["?  b.txt"]
    fails(cli, "commit", "-m", "nothing", "b.txt", cwd=repo)


def test_get_bam_file_missing_from_pool(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"art/big.bin": binary(70_000), "t.txt": b"t\n"})
    for p in (repo / ".bk" / "bam").glob("??/*"):
        p.chmod(0o644)
        p.unlink()
    (repo / "art" / "big.bin").unlink()
    line = fails(cli, "get", "art/big.bin", cwd=repo)
    assert "art/big.bin" in line
    line = fails(cli, "get", "-p", "art/big.bin", cwd=repo)
    assert "BAM" in line
    assert not (repo / "art" / "big.bin").exists()


def test_get_restores_bam_file(make_repo: MakeRepo, cli: CLI) -> None:
    data = binary(200_000, 3)
    repo = make_repo("r", {"big.bin": data})
    (repo / "big.bin").unlink()
    cli("get", "big.bin", cwd=repo)
    assert (repo / "big.bin").read_bytes() == data
    assert (repo / "big.bin").stat().st_mode & 0o222  # the working copy is writable
    assert status(cli, repo) == []


def test_get_never_checks_out_a_corrupt_pool_object(
    make_repo: MakeRepo, cli: CLI, tmp_path: Path
) -> None:
    """SPEC §2.7: bytes read from the local pool are checked against their hash too (a pool
    file that rotted, or was changed in place through a hardlink)."""
    import hashlib
    import subprocess

    from conftest import BKR

    data = binary(200_000, 8)
    repo = make_repo("r", {"art/big.bin": data})
    cli("clone", "--no-hardlinks", "r", "backup", cwd=tmp_path)
    oid = hashlib.sha256(data).hexdigest()
    obj = repo / ".bk" / "bam" / oid[:2] / oid
    obj.chmod(0o644)
    obj.write_bytes(data[:-1] + b"!")
    (repo / "art" / "big.bin").unlink()
    line = fails(cli, "get", "art/big.bin", cwd=repo)
    assert "art/big.bin" in line and "corrupt" in line and "bam repair" in line
    assert not (repo / "art" / "big.bin").exists()
    p = subprocess.run(
        [*BKR, "get", "-p", "art/big.bin"], cwd=repo, env=cli.env, capture_output=True
    )
    assert p.returncode == 1 and p.stdout == b"" and b"corrupt" in p.stderr
    cli("bam", "repair", "--from", str(tmp_path / "backup"), cwd=repo)
    cli("get", "art/big.bin", cwd=repo)
    assert (repo / "art" / "big.bin").read_bytes() == data


# -- config and id ---------------------------------------------------------------------------------
def test_config(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r")
    listing = cli("config", "-l", cwd=repo)
    assert "bam.threshold=64K  (default)" in listing
    assert "checkout=get" in listing
    cli("config", "bam.threshold", "128K", cwd=repo)
    assert cli("config", "bam.threshold", cwd=repo) == "128K\n"
    assert "bam.threshold=128K\n" in cli("config", "-l", cwd=repo)
    cli("config", "--unset", "bam.threshold", cwd=repo)
    assert cli("config", "bam.threshold", cwd=repo) == "64K\n"
    cli("config", "user.name", "Ada <ada@example.com>", cwd=repo)
    (repo / "f").write_text("f\n")
    cli("add", "f", cwd=repo)
    cli("commit", "-m", "by ada", cwd=repo)
    assert "Ada <ada@example.com>" in cli("log", cwd=repo)
    line = fails(cli, "config", "no.such.key", cwd=repo, code=2)
    assert "no.such.key" in line
    fails(cli, "config", "no.such.key", "v", cwd=repo, code=2)
    fails(cli, "config", "--unset", "no.such.key", cwd=repo, code=2)
    fails(cli, "config", "bam.threshold", "huge", cwd=repo, code=2)
    fails(cli, "config", "checkout", "sometimes", cwd=repo, code=2)
    fails(cli, "config", "user.name", "two\nlines", cwd=repo, code=2)  # would break log
    assert cli("config", "bam.threshold", cwd=repo) == "64K\n"


def test_id_and_clone_ids(make_repo: MakeRepo, cli: CLI, tmp_path: Path) -> None:
    repo = make_repo("r", {"a": b"a"})
    pid = cli("id", cwd=repo).strip()
    rid = cli("id", "--repo", cwd=repo).strip()
    assert len(pid) == 32 and len(rid) == 32 and pid != rid
    cli("clone", "r", "c", cwd=tmp_path)
    assert cli("id", cwd=tmp_path / "c").strip() == pid
    assert cli("id", "--repo", cwd=tmp_path / "c").strip() not in (rid, pid)
    other = make_repo("o")
    assert cli("id", cwd=other).strip() != pid


def test_non_utf8_file_names(tmp_path: Path, cli: CLI) -> None:
    repo = tmp_path / "r"
    cli("init", str(repo), cwd=tmp_path)
    raw = os.fsencode(repo) + b"/\xff\xfe name.bin"
    with open(raw, "wb") as f:
        f.write(b"bytes\n")
    os.makedirs(os.fsencode(repo) + b"/d\xe9j\xe0")
    with open(os.fsencode(repo) + b"/d\xe9j\xe0/x", "wb") as f:
        f.write(b"x\n")
    cli("add", "-q", ".", cwd=repo)
    cli("commit", "-m", "odd names", cwd=repo)
    assert cli("status", cwd=repo) == ""
    cli("mv", "-q", os.fsdecode(b"\xff\xfe name.bin"), "plain.bin", cwd=repo)
    cli("commit", "-m", "rename", cwd=repo)
    cli("clone", "r", "c", cwd=tmp_path)
    names = sorted(os.listdir(os.fsencode(tmp_path / "c")))
    assert names == [b".bk", b"d\xe9j\xe0", b"plain.bin"]
    assert cli("get", "-p", "-r", "+~1", os.fsdecode(b"\xff\xfe name.bin"), cwd=tmp_path / "c")
    assert len(cli("log", "--keys", "plain.bin", cwd=tmp_path / "c").split()) == 2


def test_bkignore_globs(tmp_path: Path, cli: CLI) -> None:
    repo = tmp_path / "r"
    cli("init", str(repo), cwd=tmp_path)
    write_files(
        repo,
        {
            ".bkignore": b"/top.log\ndocs/*.tmp\n**/cache/\n",
            "top.log": b"",
            "sub/top.log": b"",
            "docs/a.tmp": b"",
            "docs/deep/b.tmp": b"",
            "x/cache/c": b"",
            "cache": b"a file named cache is not a directory\n",
        },
    )
    out = cli("add", ".", cwd=repo).split("\n")
    added = sorted(line[3:] for line in out if line)
    assert added == [".bkignore", "cache", "docs/deep/b.tmp", "sub/top.log"]
    # a tracked file stays tracked even when a pattern would ignore it later
    cli("commit", "-m", "x", cwd=repo)
    (repo / ".bkignore").write_text("*.tmp\n/top.log\n**/cache/\n")
    cli("commit", "-m", "ignore more", cwd=repo)
    (repo / "docs" / "deep" / "b.tmp").write_text("changed\n")
    assert cli("status", cwd=repo) == "M  docs/deep/b.tmp\n"


def test_non_utf8_names_under_a_strict_utf8_locale(tmp_path: Path, cli: CLI) -> None:
    """Under a real UTF-8 locale (en_US.UTF-8) Python's stdio refuses undecodable bytes;
    PYTHONIOENCODING=utf-8:strict gives the same streams.  Names still print and read back
    byte for byte: status, log -v, and paths given to bam reattach on stdin."""
    import hashlib
    import subprocess

    from conftest import BKR

    def raw(*args: str, stdin: bytes = b"") -> bytes:
        env = {**cli.env, "PYTHONIOENCODING": "utf-8:strict"}
        p = subprocess.run([*BKR, *args], cwd=repo, env=env, input=stdin, capture_output=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    repo = tmp_path / "r"
    cli("init", str(repo), cwd=tmp_path)
    name = b"caf\xe9.bin"
    data = binary(70 * 1024, 4)
    with open(os.fsencode(repo) + b"/" + name, "wb") as f:
        f.write(data)
    assert raw("status") == b"?  " + name + b"\n"
    raw("add", ".")
    raw("commit", "-m", "odd")
    assert b"A  " + name in raw("log", "-v")
    # the pool loses the object; the working file, named on stdin, brings it back
    for f in (repo / ".bk" / "bam" / hashlib.sha256(data).hexdigest()[:2]).iterdir():
        f.unlink()
    out = raw("bam", "reattach", stdin=os.fsencode(repo) + b"/" + name + b"\n")
    assert b"all missing BAM data found" in out
    assert "passed" in cli("bam", "check", cwd=repo)
