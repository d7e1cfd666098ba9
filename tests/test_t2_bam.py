"""BAM rules through the real CLI: which files become BAM, the pool's layout, ``bam du``."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from conftest import CLI, keys, write_files
from t2help import binary, pool_files, run_bytes

MakeRepo = Callable[..., Path]
K = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_default_threshold_binary_and_text(make_repo: MakeRepo, cli: CLI) -> None:
    below = binary(64 * K - 1, 1)
    at = binary(64 * K, 2)
    text = b"a line of text\n" * 10_000  # 150 KB, no NUL
    repo = make_repo("r", {"below.bin": below, "at.bin": at, "big.txt": text})
    assert pool_files(repo) == [sha(at)]
    # the pool file: named by SHA-256 of the content, read-only, in a fan-out directory
    obj = repo / ".bk" / "bam" / sha(at)[:2] / sha(at)
    assert obj.read_bytes() == at
    assert stat.S_IMODE(obj.stat().st_mode) == 0o444
    # the working copy is an ordinary writable file with the same bytes
    assert (repo / "at.bin").read_bytes() == at
    assert os.access(repo / "at.bin", os.W_OK)


def test_threshold_option_and_config(tmp_path: Path, cli: CLI) -> None:
    cli("init", "r", "--bam-threshold", "1K", cwd=tmp_path)
    repo = tmp_path / "r"
    small, big = binary(1023, 1), binary(1024, 2)
    write_files(repo, {"small.bin": small, "big.bin": big})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "x", cwd=repo)
    assert pool_files(repo) == [sha(big)]
    # raising the threshold affects new files only
    cli("config", "bam.threshold", "1M", cwd=repo)
    again = binary(2048, 3)
    write_files(repo, {"again.bin": again})
    cli("add", "again.bin", cwd=repo)
    cli("commit", "-m", "y", cwd=repo)
    assert pool_files(repo) == [sha(big)]
    # off
    cli("config", "bam.threshold", "off", cwd=repo)
    huge = binary(2 * 1024 * K, 4)
    write_files(repo, {"huge.bin": huge})
    cli("add", "huge.bin", cwd=repo)
    cli("commit", "-m", "z", cwd=repo)
    assert pool_files(repo) == [sha(big)]


def test_no_bam_init(tmp_path: Path, cli: CLI) -> None:
    cli("init", "r", "--no-bam", cwd=tmp_path)
    repo = tmp_path / "r"
    write_files(repo, {"big.bin": binary(200 * K), "x.psd": b"psd"})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "x", cwd=repo)
    assert pool_files(repo) == []


def test_patterns(tmp_path: Path, cli: CLI) -> None:
    cli("init", "r", cwd=tmp_path)
    repo = tmp_path / "r"
    cli("config", "bam.patterns", "*.psd, art/*.txt", cwd=repo)
    data = {
        "a.psd": b"tiny psd",
        "deep/dir/b.psd": b"another psd",
        "art/notes.txt": b"text but patterned\n",
        "art/sub/other.txt": b"not matched: the glob has a slash\n",
        "c.txt": b"plain\n",
    }
    write_files(repo, data)
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "x", cwd=repo)
    assert pool_files(repo) == sorted(
        sha(data[p]) for p in ("a.psd", "deep/dir/b.psd", "art/notes.txt")
    )
    # a clone keeps the BAM policy
    cli("clone", "r", "c", cwd=tmp_path)
    assert "*.psd" in cli("config", "bam.patterns", cwd=tmp_path / "c")


def test_identical_content_stored_once(make_repo: MakeRepo, cli: CLI) -> None:
    data = binary(100 * K, 7)
    repo = make_repo("r", {"one.bin": data, "two.bin": data, "d/three.bin": data})
    assert pool_files(repo) == [sha(data)]
    # committing it again under another name later stores nothing new
    write_files(repo, {"four.bin": data})
    cli("add", "four.bin", cwd=repo)
    cli("commit", "-m", "again", cwd=repo)
    assert pool_files(repo) == [sha(data)]
    du = cli("bam", "du", cwd=repo)
    assert "local               1 objects" in du and "100.0 KiB" in du
    assert not list((repo / ".bk" / "bam" / "tmp").glob("*"))


def test_bam_for_life_even_when_it_shrinks(make_repo: MakeRepo, cli: CLI, tmp_path: Path) -> None:
    big = binary(100 * K, 1)
    repo = make_repo("r", {"f.bin": big})
    write_files(repo, {"f.bin": b"tiny"})  # text, far below the threshold
    cli("commit", "-m", "shrink", cwd=repo)
    assert sha(b"tiny") in pool_files(repo)
    # renamed, it is still BAM
    cli("mv", "f.bin", "g.bin", cwd=repo)
    write_files(repo, {"g.bin": b"tinier"})
    cli("commit", "-m", "rename+edit", cwd=repo)
    assert sha(b"tinier") in pool_files(repo)
    # and a file that started small and text stays non-BAM when it grows
    write_files(repo, {"grow.dat": b"small\n"})
    cli("add", "grow.dat", cwd=repo)
    cli("commit", "-m", "small", cwd=repo)
    grown = binary(200 * K, 9)
    write_files(repo, {"grow.dat": grown})
    cli("commit", "-m", "grown", cwd=repo)
    assert sha(grown) not in pool_files(repo)
    # clones agree
    cli("clone", "r", "c", cwd=tmp_path)
    c = tmp_path / "c"
    write_files(c, {"g.bin": b"x"})
    cli("commit", "-m", "in clone", cwd=c)
    assert sha(b"x") in pool_files(c)
    assert (c / "grow.dat").read_bytes() == grown


def test_bam_du_numbers(make_repo: MakeRepo, cli: CLI) -> None:
    a, b = binary(100 * K, 1), binary(300 * K, 2)
    repo = make_repo("r", {"a.bin": a, "b.bin": b})
    du = cli("bam", "du", cwd=repo).splitlines()
    assert du[0].split() == ["local", "2", "objects", "400.0", "KiB"]
    assert du[1].split() == ["remote-only", "0", "objects", "0", "B"]
    assert du[2].split() == ["unreferenced", "0", "objects", "0", "B"]
    # an object gone from the pool counts as remote-only
    obj = repo / ".bk" / "bam" / sha(a)[:2] / sha(a)
    obj.unlink()
    du = cli("bam", "du", cwd=repo).splitlines()
    assert du[0].split() == ["local", "1", "objects", "300.0", "KiB"]
    assert du[1].split() == ["remote-only", "1", "objects", "100.0", "KiB"]
    # a stray copy of uncommitted work is unreferenced
    write_files(repo, {"c.bin": binary(70 * K, 3)})
    cli("add", "c.bin", cwd=repo)
    cli("commit", "-m", "c", cwd=repo)
    cli("undo", "-r", "+", cwd=repo)
    du = cli("bam", "du", cwd=repo).splitlines()
    assert du[2].split() == ["unreferenced", "1", "objects", "70.0", "KiB"]
    assert len(keys(cli, repo)) == 1


def test_bam_file_modes_and_edits(make_repo: MakeRepo, cli: CLI, tmp_path: Path) -> None:
    v1, v2 = binary(90 * K, 1), binary(90 * K, 2)
    repo = make_repo("r", {"tool.bin": v1})
    os.chmod(repo / "tool.bin", 0o755)
    assert cli("status", cwd=repo) == "M  tool.bin\n"
    cli("commit", "-m", "exec", cwd=repo)
    write_files(repo, {"tool.bin": v2})
    assert cli("status", cwd=repo) == "M  tool.bin\n"
    assert "Binary files" in cli("diff", cwd=repo)
    cli("commit", "-m", "v2", cwd=repo)
    assert pool_files(repo) == sorted([sha(v1), sha(v2)])
    cli("clone", "r", "c", cwd=tmp_path)
    c = tmp_path / "c"
    assert (c / "tool.bin").read_bytes() == v2
    assert stat.S_IMODE((c / "tool.bin").stat().st_mode) == 0o755
    assert run_bytes(cli, "get", "-p", "-r", "+~2", "tool.bin", cwd=c) == v1
