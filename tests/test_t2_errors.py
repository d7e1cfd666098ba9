"""Errors as SPEC §6 wants them: exit 1 or 2, one line ``bkr: …`` on stderr, no traceback,
and a failed operation leaves nothing half done."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CLI, keys
from t2help import binary, fails, snapshot

MakeRepo = Callable[..., Path]
K = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


USAGE_ERRORS = [
    ["frobnicate"],
    ["commit", "--no-such-option", "-m", "x"],
    ["log", "-r"],
    ["clone"],
    ["get"],
    ["tag", "a", "b"],
    ["init", "--bam-threshold"],
    ["bam", "frob"],
    ["undo"],
    ["config", "no.such.key"],
    ["pull", "--ours", "--theirs"],
]


def test_usage_errors_exit_2(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"f": b"f"})
    for args in USAGE_ERRORS:
        fails(cli, *args, cwd=repo, code=2)
    assert len(keys(cli, repo)) == 1


def test_help_and_no_command(tmp_path: Path, cli: CLI) -> None:
    p = cli.run("--help", cwd=tmp_path)
    assert "commit" in p.stdout and p.returncode == 0
    p = cli.run(cwd=tmp_path, ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_not_a_repository(tmp_path: Path, cli: CLI) -> None:
    for args in (
        ["status"],
        ["log"],
        ["diff"],
        ["get", "x"],
        ["config", "-l"],
        ["undo", "-r", "+"],
    ):
        line = fails(cli, *args, cwd=tmp_path)
        assert "not inside a bkr repository" in line
    line = fails(cli, "pull", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert "repository" in line


def test_missing_paths_and_unknown_revisions(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"f.txt": b"f\n"})
    cli("clone", "r", "c0", cwd=repo.parent)
    before = snapshot(cli, repo)
    for args in (
        ["add", "missing"],
        ["rm", "missing"],
        ["mv", "missing", "x"],
        ["commit", "-m", "x", "missing"],
        ["get", "missing"],
        ["log", "missing"],
        ["get", "-r", "0123456789", "f.txt"],
        ["log", "-r", "nope"],
        ["log", "-r", "nope..+"],
        ["diff", "-r", "nope"],
        ["tag", "t", "-r", "nope"],
        ["undo", "-r", "nope"],
        ["clone", "-r", "nope", ".", "../c"],
        ["send", "-r", "nope", "../b.bkb"],
        ["pull", "-r", "nope", "../c0"],
    ):
        line = fails(cli, *args, cwd=repo)
        assert ("missing" in line) or ("nope" in line) or ("0123456789" in line), line
    assert snapshot(cli, repo) == before
    assert not (repo.parent / "c").exists() and not (repo.parent / "b.bkb").exists()


def test_clone_errors_leave_nothing(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    make_repo("a", {"f.txt": b"f\n"})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "plain").mkdir()
    before = listing(tmp_path)
    line = fails(cli, "clone", "a", "full", cwd=tmp_path, code=2)
    assert "not empty" in line
    assert listing(tmp_path / "full") == ["x"]
    line = fails(cli, "clone", "plain", "c1", cwd=tmp_path)
    assert "not a bkr repository" in line
    fails(cli, "clone", "does-not-exist", "c2", cwd=tmp_path)
    fails(cli, "clone", "a", "sub/deeper/c3", "-r", "nope", cwd=tmp_path)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("hardlinks", [True, False])
def test_clone_with_bam_object_missing_from_source(
    tmp_path: Path, make_repo: MakeRepo, cli: CLI, hardlinks: bool
) -> None:
    one, two = binary(70 * K, 1), binary(70 * K, 2)
    a = make_repo("a", {"one.bin": one, "two.bin": two, "t.txt": b"t\n"})
    (a / ".bk" / "bam" / sha(two)[:2] / sha(two)).unlink()
    before = listing(tmp_path)
    args = ["clone", "a", "c"] + ([] if hardlinks else ["--no-hardlinks"])
    line = fails(cli, *args, cwd=tmp_path)
    assert "BAM" in line
    assert listing(tmp_path) == before  # no target, no temp directory


def test_failed_clone_removes_the_directories_it_made(
    tmp_path: Path, make_repo: MakeRepo, cli: CLI
) -> None:
    data = binary(70 * K, 3)
    a = make_repo("a", {"one.bin": data})
    (a / ".bk" / "bam" / sha(data)[:2] / sha(data)).unlink()
    (tmp_path / "kept").mkdir()
    before = listing(tmp_path)
    fails(cli, "clone", "a", "new/nested/c", cwd=tmp_path)
    fails(cli, "clone", "a", "kept/deeper/c", cwd=tmp_path)
    assert listing(tmp_path) == before and listing(tmp_path / "kept") == []


@pytest.mark.parametrize("hardlinks", [True, False])
def test_clone_with_corrupt_bam_object_in_source(
    tmp_path: Path, make_repo: MakeRepo, cli: CLI, hardlinks: bool
) -> None:
    data = binary(70 * K, 1)
    a = make_repo("a", {"one.bin": data})
    obj = a / ".bk" / "bam" / sha(data)[:2] / sha(data)
    obj.chmod(0o644)
    obj.write_bytes(data[:-1] + b"X")
    obj.chmod(0o444)
    before = listing(tmp_path)
    args = ["clone", "a", "c"] + ([] if hardlinks else ["--no-hardlinks"])
    line = fails(cli, *args, cwd=tmp_path)
    assert "corrupt" in line
    assert listing(tmp_path) == before


def test_pull_with_bam_object_missing_from_source(
    tmp_path: Path, make_repo: MakeRepo, cli: CLI
) -> None:
    a = make_repo("a", {"t.txt": b"t\n"})
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    big = binary(80 * K, 5)
    (a / "big.bin").write_bytes(big)
    cli("add", "big.bin", cwd=a)
    cli("commit", "-m", "big", cwd=a)
    (a / ".bk" / "bam" / sha(big)[:2] / sha(big)).unlink()
    before = snapshot(cli, b)
    line = fails(cli, "pull", cwd=b)
    assert "BAM" in line
    assert snapshot(cli, b) == before


def test_send_to_unwritable_place(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"f": b"f"})
    line = fails(cli, "send", str(repo / "no" / "such" / "dir" / "x.bkb"), cwd=repo)
    assert "send" in line


def test_newer_repository_format(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"f": b"f"})
    (repo / ".bk" / "FORMAT").write_text("bkrepo 99\n")
    for args in (["status"], ["log"], ["commit", "-m", "x"]):
        line = fails(cli, *args, cwd=repo)
        assert "newer" in line and "99" in line
    line = fails(cli, "clone", "r", "c", cwd=repo.parent)
    assert "newer" in line
    assert not (repo.parent / "c").exists()
    (repo / ".bk" / "FORMAT").write_text("garbage\n")
    line = fails(cli, "status", cwd=repo)
    assert "format" in line


def test_damaged_database(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"f": b"f"})
    db = repo / ".bk" / "db" / "data.mdb"
    db.write_bytes(b"\0" * 100)
    line = fails(cli, "status", cwd=repo)
    assert "database" in line or "damaged" in line


def test_broken_pipe_is_quiet(make_repo: MakeRepo, cli: CLI) -> None:
    import subprocess

    from conftest import BKR

    repo = make_repo("r", {"f": b"f"})
    (repo / "f").write_text("g")
    cli("commit", "-q", "-m", "long comment line\n" * 5_000, cwd=repo)  # more than a pipe holds
    p = subprocess.run(
        f"{' '.join(BKR)} log | head -1",
        shell=True,
        cwd=repo,
        env=cli.env,
        capture_output=True,
        text=True,
    )
    assert p.stdout.startswith("cset ")
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr


def test_pull_and_push_to_itself(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"f": b"f"})
    for args in (["pull", "."], ["push", str(repo)], ["pull", f"file://{repo}"]):
        line = fails(cli, *args, cwd=repo, code=2)
        assert "this repository" in line
    cli("parent", ".", cwd=repo)
    fails(cli, "pull", cwd=repo, code=2)
