"""``bkr bam server|check|clean|pull|push|repair|reattach|convert|du`` with real servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bamhelp import binary, oid, pool, pool_path
from conftest import CLI, write_files

A = binary(400_000, seed=51)
B = binary(300_000, seed=52)


def repo_with_bam(cli: CLI, root: Path, name: str = "r") -> Path:
    repo = root / name
    cli("init", str(repo), cwd=root)
    write_files(repo, {"art/a.bin": A, "art/b.bin": B, "doc.txt": b"doc\n"})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "art", cwd=repo)
    return repo


def test_server_change_copies_what_the_new_server_lacks(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    repo = repo_with_bam(cli, tmp_path)
    for name in ("s1", "s2"):
        cli("init", str(server_root / name), cwd=server_root)
        cli("bam", "server", ".", cwd=server_root / name)
    server = serve("--anonymous", "write")
    assert "no BAM server" in cli("bam", "server", cwd=repo)
    cli("bam", "server", f"{server.url}/s1", cwd=repo)
    assert {oid(A), oid(B)} <= pool(server_root / "s1")
    assert cli("bam", "server", "-l", cwd=repo).strip() == f"{server.url}/s1"
    cli("bam", "server", "-s", f"{server.url}/s2", cwd=repo)  # -s: no copy
    assert pool(server_root / "s2") == set()
    p = cli.run("bam", "server", "http://127.0.0.1:9/x", cwd=repo, ok=False)
    assert "unable to get the repo id" in p.stderr
    # becoming a server needs every object locally; giving it up needs -f
    cli("bam", "server", ".", cwd=repo)
    p = cli.run("bam", "server", "-r", cwd=repo, ok=False)
    assert "-f" in p.stderr
    cli("bam", "server", "-f", "-r", cwd=repo)
    assert "no BAM server" in cli("bam", "server", cwd=repo)


def test_clean_never_deletes_the_only_copy(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    repo = repo_with_bam(cli, tmp_path)
    extra = binary(100_000, seed=53)
    write_files(repo, {"tmp.bin": extra})
    cli("add", "tmp.bin", cwd=repo)
    cli("commit", "-m", "tmp", cwd=repo)
    cli("undo", "-r", "+", cwd=repo)
    out = cli("bam", "clean", "-n", cwd=repo)
    assert "would remove" in out and oid(extra) in out and oid(extra) in pool(repo)
    cli("bam", "clean", cwd=repo)
    assert pool(repo) == {oid(A), oid(B)}
    cli("bam", "clean", "-a", cwd=repo)  # no server: nothing else may go
    assert pool(repo) == {oid(A), oid(B)}
    cli("init", str(server_root / "s"), cwd=server_root)
    cli("bam", "server", ".", cwd=server_root / "s")
    server = serve("--anonymous", "write")
    cli("bam", "server", "-s", f"{server.url}/s", cwd=repo)
    cli("bam", "push", cwd=repo)
    assert {oid(A), oid(B)} <= pool(server_root / "s")
    cli("bam", "clean", "-a", cwd=repo)
    assert pool(repo) == set()
    assert "passed" in cli("bam", "check", cwd=repo)
    p = cli.run("bam", "clean", cwd=server_root / "s", ok=False)
    assert "will not run in a BAM server" in p.stderr
    cli("bam", "pull", "-a", cwd=repo)
    assert pool(repo) == {oid(A), oid(B)}


def test_check_names_missing_and_corrupt_files_and_repair_fixes_them(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    repo = repo_with_bam(cli, tmp_path)
    assert "hashes verified" in cli("bam", "check", cwd=repo)
    backup = tmp_path / "backup"
    # a copy, not hardlinks: corrupting a hardlinked object corrupts it in both pools
    cli("clone", "--no-hardlinks", "--checkout", "none", str(repo), str(backup), cwd=tmp_path)
    pa = pool_path(repo, oid(A))
    os.chmod(pa, 0o644)
    pa.write_bytes(b"\0" + A[1:-1] + b"!")  # same size, wrong bytes
    assert "passed" in cli("bam", "check", "--fast", cwd=repo)  # presence only: no hashing
    assert "corrupt: art/a.bin" in cli.run("bam", "check", cwd=repo, ok=False).stdout
    pool_path(repo, oid(B)).unlink()
    assert "passed" not in cli.run("bam", "check", "--fast", cwd=repo, ok=False).stdout
    p = cli.run("bam", "check", cwd=repo, ok=False)
    assert "corrupt: art/a.bin" in p.stdout and "missing: art/b.bin" in p.stdout
    assert p.stderr.startswith("bkr: bam check:") and p.stderr.count("\n") == 1
    p = cli.run("bam", "repair", cwd=repo, ok=False)
    assert "--from" in p.stderr
    cli("bam", "repair", "--from", str(backup), cwd=repo)
    assert pool_path(repo, oid(A)).read_bytes() == A
    assert "hashes verified" in cli("bam", "check", cwd=repo)


def test_repair_from_the_server_and_from_http_urls(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = repo_with_bam(cli, server_root, "game")
    cli("bam", "server", ".", cwd=central)
    server = serve()
    url = f"{server.url}/game"
    cli("clone", url, "c", cwd=tmp_path)  # holds the tip's data, its server is game
    c = tmp_path / "c"
    pa = pool_path(c, oid(A))
    os.chmod(pa, 0o644)
    pa.write_bytes(A[:-1] + b"!")
    pool_path(c, oid(B)).unlink()
    out = cli("bam", "repair", cwd=c)  # no --from: the BAM server is the source
    assert "repaired 1 of 1" in out  # B is not broken: the server holds it
    assert pool_path(c, oid(A)).read_bytes() == A and not pool_path(c, oid(B)).exists()
    assert (c / ".bk" / "bam" / "bad" / oid(A)).is_file()  # the bad copy is kept aside
    assert "1 at the BAM server, hashes verified" in cli("bam", "check", cwd=c)
    # a serverless repo repairs from an HTTP URL named with --from
    cli("clone", "-B", "none", url, "alone", cwd=tmp_path)
    alone = tmp_path / "alone"
    pool_path(alone, oid(B)).unlink()
    p = cli.run("bam", "repair", cwd=alone, ok=False)
    assert "--from" in p.stderr and p.stderr.count("\n") == 1
    cli("bam", "repair", "--from", url, cwd=alone)
    assert "hashes verified" in cli("bam", "check", cwd=alone)


def test_bam_pull_fills_what_both_this_repo_and_its_server_lack(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = repo_with_bam(cli, server_root, "game")
    cli("bam", "server", ".", cwd=central)
    backup = tmp_path / "backup"
    cli("clone", "-B", "none", "--no-hardlinks", str(central), str(backup), cwd=tmp_path)
    server = serve()
    cli("clone", "--checkout", "none", f"{server.url}/game", "c", cwd=tmp_path)
    c = tmp_path / "c"
    pool_path(central, oid(B)).unlink()  # the server lost B
    p = cli.run("bam", "pull", cwd=c, ok=False)
    assert p.returncode == 2 and "-a" in p.stderr
    assert "fetched 1" in cli("bam", "pull", str(backup), cwd=c)
    assert pool(c) == {oid(B)}  # A is at the server: not copied here
    cli("bam", "pull", "-a", cwd=c)  # -a: everything, from the server
    assert pool(c) == {oid(A), oid(B)}
    assert "passed" in cli("bam", "check", cwd=c)


def test_reattach_reinstates_matching_files(cli: CLI, tmp_path: Path) -> None:
    repo = repo_with_bam(cli, tmp_path)
    pool_path(repo, oid(A)).unlink()
    pool_path(repo, oid(B)).unlink()
    stray = tmp_path / "found"
    stray.mkdir()
    (stray / "copy-of-a").write_bytes(A)
    (stray / "unrelated").write_bytes(b"nope")
    paths = f"{stray / 'unrelated'}\n{stray / 'copy-of-a'}\n".encode()
    p = cli.run("bam", "reattach", cwd=repo, input=paths, ok=False)
    assert "reattached" in p.stdout and "still missing" in p.stderr
    assert pool_path(repo, oid(A)).read_bytes() == A
    (stray / "copy-of-b").write_bytes(B)
    p = cli.run("bam", "reattach", cwd=repo, input=f"{stray / 'copy-of-b'}\n".encode())
    assert "all missing BAM data found" in p.stdout


def test_convert_is_deterministic_shrink_only_and_splits_projects(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    cli("init", "--no-bam", str(base), cwd=tmp_path)
    big = binary(200_000, seed=61)
    write_files(base, {"big.bin": big, "small.bin": binary(10_000, seed=62), "t.txt": b"t\n"})
    cli("add", ".", cwd=base)
    cli("commit", "-m", "one", cwd=base)
    (base / "big.bin").write_bytes(binary(150_000, seed=63))
    cli("commit", "-m", "two", cwd=base)
    cli("tag", "v1", cwd=base)
    assert pool(base) == set()
    for name in ("x", "y", "plain", "older"):
        cli("clone", str(base), name, cwd=tmp_path)
    x, y, plain = tmp_path / "x", tmp_path / "y", tmp_path / "plain"
    cli("bam", "convert", "100K", cwd=x)
    cli("bam", "convert", "100K", cwd=y)
    kx = cli("log", "--keys", cwd=x).split()
    assert kx == cli("log", "--keys", cwd=y).split()
    assert kx != cli("log", "--keys", cwd=base).split()
    assert cli("id", cwd=x) == cli("id", cwd=y) != cli("id", cwd=base)
    assert pool(x) == {oid(big), oid((x / "big.bin").read_bytes())}  # every revision is BAM
    assert (x / "big.bin").read_bytes() == (base / "big.bin").read_bytes()
    assert cli("status", cwd=x) == ""
    assert "v1" in cli("tag", cwd=x)
    (y / "t.txt").write_text("changed\n")
    cli("commit", "-m", "y", cwd=y)
    cli("pull", str(y), cwd=x)  # converted at the same size: they sync
    p = cli.run("pull", str(x), cwd=plain, ok=False)
    assert "different project" in p.stderr
    # The same conversion by a bkr that recorded 1 MiB chunks (before 2026-12-07) made other
    # keys for the same files: it is another project, never merged with this one.
    from bkrepo import objects as ob
    from bkrepo.convert import convert
    from bkrepo.repo import Repo

    monkeypatch.setattr(ob, "CHUNK_SIZE", 1 << 20)
    older = Repo.open(tmp_path / "older")
    try:
        convert(older, 100 << 10)  # what `bam convert 100K` asks for
    finally:
        older.close()
    monkeypatch.undo()
    assert cli("log", "--keys", cwd=tmp_path / "older").split() != kx
    p = cli.run("pull", str(tmp_path / "older"), cwd=x, ok=False)
    assert "different project" in p.stderr
    p = cli.run("bam", "convert", "200K", cwd=x, ok=False)
    assert "less than" in p.stderr
    assert "no files needing conversion" in cli("bam", "convert", "50K", cwd=x)


def test_du_reports_local_and_remote_only(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    repo = repo_with_bam(cli, server_root, "game")
    cli("bam", "server", ".", cwd=repo)
    server = serve()
    cli("clone", "--checkout", "none", f"{server.url}/game", "lazy", cwd=tmp_path)
    out = cli("bam", "du", cwd=tmp_path / "lazy")
    assert "local               0 objects" in out
    assert "remote-only         2 objects" in out
