"""Nested collections with the real CLI and the real server: clone (whole or a subset),
commit across components, status, log, pull (with component merges and conflicts), push,
populate, unpopulate, undo, attach."""

from __future__ import annotations

from pathlib import Path

import pytest
from bamhelp import binary, oid, pool
from conftest import CLI, commit_files, keys, write_files


@pytest.fixture
def served(cli: CLI, tmp_path: Path, server_root: Path, serve):  # type: ignore[no-untyped-def]
    """A product 'game' with components art (BAM files) and code, and a file of its own,
    made by partition and served read-write; the product and components are BAM servers."""
    a = tmp_path / "standalone"
    cli("init", str(a), cwd=tmp_path)
    commit_files(
        cli,
        a,
        {
            "README": b"game\n",
            "code/main.c": b"one\ntwo\nthree\nfour\nfive\n",
            "art/hero.bin": binary(300_000, seed=1),
            ".bkaliases": b"visual: art\n",
        },
        "start",
    )
    comps = tmp_path / "COMPS"
    comps.write_text("art\ncode\n")
    game = server_root / "game"
    cli("partition", "-C", str(comps), str(a), str(game), cwd=tmp_path)
    for rel in ("", "art", "code"):
        cli("bam", "server", ".", cwd=game / rel)
    return serve("--anonymous", "write"), game


def test_clone_commit_push_pull_over_http(cli: CLI, tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    server, game = served
    url = f"{server.url}/game"
    one, two = tmp_path / "one", tmp_path / "two"
    cli("clone", url, str(one), cwd=tmp_path)
    cli("clone", "--checkout", "none", url, str(two), cwd=tmp_path)
    assert cli("comps", cwd=one).split() == ["art", "code"]
    assert (one / "art" / "hero.bin").read_bytes() == binary(300_000, seed=1)
    assert cli("bam", "server", "-l", cwd=one / "art").strip() == f"{url}/art"
    # a commit touching two components and the product is one product cset
    write_files(one, {"code/main.c": b"one\ntwo\nthree\nfour\nFIVE\n", "README": b"game 2\n"})
    commit_files(cli, one, {"art/villain.bin": binary(100_000, seed=2)}, "two parts")
    status = cli("status", cwd=one)
    assert status == ""
    assert len(keys(cli, one)) == 2 and len(keys(cli, one / "code")) == 2
    log = cli("log", "-v", "-r", "+", cwd=one)
    assert "M  README" in log and "M  code/main.c" in log and "A  art/villain.bin" in log
    cli("push", cwd=one)
    assert keys(cli, game) == keys(cli, one) and keys(cli, game / "art") == keys(cli, one / "art")
    # the BAM data of the new art went to the server component's pool
    assert oid(binary(100_000, seed=2)) in pool(game / "art")
    # the other clone: edit a different hunk of the same file, then pull: a component merge
    write_files(two, {"code/main.c": b"ONE\ntwo\nthree\nfour\nfive\n"})
    cli("commit", "-m", "theirs", cwd=two)
    out = cli("pull", cwd=two)
    assert "merge" in out
    got = cli("get", "-p", "main.c", cwd=two / "code")
    assert got == "ONE\ntwo\nthree\nfour\nFIVE\n"
    assert cli("status", cwd=two) == ""
    assert not (two / "art" / "villain.bin").exists()  # checkout none: new files not written
    cli("push", cwd=two)
    cli("pull", cwd=one)
    assert (one / "code" / "main.c").read_bytes() == b"ONE\ntwo\nthree\nfour\nFIVE\n"
    assert keys(cli, one) == keys(cli, two) == keys(cli, game)


def test_conflict_in_a_component_changes_nothing(cli: CLI, tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    server, _game = served
    url = f"{server.url}/game"
    one, two = tmp_path / "one", tmp_path / "two"
    cli("clone", url, str(one), cwd=tmp_path)
    cli("clone", url, str(two), cwd=tmp_path)
    commit_files(cli, one, {"code/main.c": b"mine\n", "art/a.bin": binary(70_000, seed=5)}, "one")
    cli("push", cwd=one)
    commit_files(cli, two, {"code/main.c": b"theirs\n", "README": b"other\n"}, "two")
    before = {rel: keys(cli, two / rel) for rel in ("", "art", "code")}
    r = cli.run("pull", cwd=two, ok=False)
    assert "conflicts in code/main.c" in r.stderr
    assert {rel: keys(cli, two / rel) for rel in ("", "art", "code")} == before
    assert (two / "code" / "main.c").read_bytes() == b"theirs\n"
    assert not (two / "art" / "a.bin").exists()
    assert cli("status", cwd=two) == ""
    out = cli("pull", "--theirs", cwd=two)
    assert "merge" in out and (two / "code" / "main.c").read_bytes() == b"mine\n"


def test_partial_clone_populate_unpopulate(cli: CLI, tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    server, _game = served
    url = f"{server.url}/game"
    part = tmp_path / "part"
    cli("clone", "-s", "code", url, str(part), cwd=tmp_path)
    assert cli("comps", "--here", cwd=part).split() == ["code"]
    assert cli("comps", "--missing", cwd=part).split() == ["art"]
    assert not (part / "art").exists()
    # work goes on with the part that is here
    commit_files(cli, part, {"code/new.c": b"new\n"}, "code only")
    assert "art" not in cli("status", cwd=part)
    cli("push", cwd=part)
    # an alias from .bkaliases
    cli("populate", "visual", cwd=part)
    assert (part / "art" / "hero.bin").read_bytes() == binary(300_000, seed=1)
    # unpopulate refuses to lose anything
    write_files(part, {"art/scratch.txt": b"untracked\n"})
    r = cli.run("unpopulate", "art", cwd=part, ok=False)
    assert "scratch.txt" in r.stderr
    (part / "art" / "scratch.txt").unlink()
    commit_files(cli, part / "art", {"more.bin": binary(80_000, seed=9)}, "art alone")
    r = cli.run("unpopulate", "art", cwd=part, ok=False)
    assert "not yet in the product" in r.stderr
    cli("commit", "-m", "record art", cwd=part)
    r = cli.run("unpopulate", "art", cwd=part, ok=False)
    assert "exists nowhere else" in r.stderr
    assert (part / "art" / "more.bin").exists()
    cli("push", cwd=part)
    cli("unpopulate", "art", cwd=part)
    assert not (part / "art").exists()
    assert cli("comps", "--here", cwd=part).split() == ["code"]
    # a pull while art is not here leaves it out, and populate brings the recorded cset
    cli("populate", "art", cwd=part)
    assert (part / "art" / "more.bin").read_bytes() == binary(80_000, seed=9)
    r = cli.run("populate", "nosuch", cwd=part, ok=False)
    assert r.returncode == 2 and "names no component" in r.stderr


def test_undo_in_a_product_undoes_its_components(cli: CLI, tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    server, _game = served
    one = tmp_path / "one"
    cli("clone", f"{server.url}/game", str(one), cwd=tmp_path)
    start = {rel: keys(cli, one / rel) for rel in ("", "art", "code")}
    commit_files(
        cli, one, {"code/main.c": b"changed\n", "art/b.bin": binary(90_000, seed=4)}, "both"
    )
    # refuses, changing nothing, with uncommitted work in a component it would rewrite
    write_files(one, {"code/main.c": b"dirty\n"})
    r = cli.run("undo", "-r", "+", cwd=one, ok=False)
    assert "main.c" in r.stderr
    assert len(keys(cli, one / "code")) == 2
    write_files(one, {"code/main.c": b"changed\n"})
    cli("undo", "-r", "+", cwd=one)
    assert {rel: keys(cli, one / rel) for rel in ("", "art", "code")} == start
    assert not (one / "art" / "b.bin").exists()
    assert (one / "code" / "main.c").read_bytes() == b"one\ntwo\nthree\nfour\nfive\n"
    assert cli("status", cwd=one) == ""


def test_attach_a_repository(cli: CLI, tmp_path: Path, served, make_repo) -> None:  # type: ignore[no-untyped-def]
    server, _game = served
    one = tmp_path / "one"
    cli("clone", f"{server.url}/game", str(one), cwd=tmp_path)
    lib = make_repo("libfoo", {"foo.c": b"foo\n"})
    out = cli("attach", str(lib), "vendor/foo", cwd=one)
    assert "attached" in out
    assert cli("comps", cwd=one).split() == ["art", "code", "vendor/foo"]
    assert (one / "vendor" / "foo" / "foo.c").read_bytes() == b"foo\n"
    assert "vendor/foo" in cli("log", "-v", "-r", "+", cwd=one)
    cli("push", cwd=one)
    two = tmp_path / "two"
    cli("clone", f"{server.url}/game", str(two), cwd=tmp_path)
    assert (two / "vendor" / "foo" / "foo.c").read_bytes() == b"foo\n"
    # errors: an existing component, a product's own file, a product
    r = cli.run("attach", str(lib), "code", cwd=one, ok=False)
    assert "already a component" in r.stderr
    r = cli.run("attach", str(lib), "README", cwd=one, ok=False)
    assert "collides" in r.stderr
    r = cli.run("attach", str(two), "sub", cwd=one, ok=False)
    assert "is a product" in r.stderr
    r = cli.run("comps", cwd=lib, ok=False)
    assert r.returncode == 2 and "not a product" in r.stderr


@pytest.mark.fuse
def test_a_product_with_bam_components_mounted_by_bkfs(
    cli: CLI, tmp_path: Path, served, bkfs, mounts
) -> None:  # type: ignore[no-untyped-def]
    server, game = served
    commit_files(cli, game, {"art/more/big.bin": binary(3 << 20, seed=8)}, "more art")
    lazy = tmp_path / "lazy"
    cli("clone", "--checkout", "none", f"{server.url}/game", str(lazy), cwd=tmp_path)
    mnt = mounts.foreground(lazy, "mnt").mountpoint
    # the collection's tree, components in their places; no .bk entries; no data read
    names = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file())
    assert names == [".bkaliases", "README", "art/hero.bin", "art/more/big.bin", "code/main.c"]
    assert (mnt / "art" / "hero.bin").stat().st_size == 300_000
    assert not (mnt / "art" / ".bk").exists()
    assert bkfs.status(mnt)["bam_bytes_fetched"] == 0
    # reads fetch from the component's own BAM server, verified
    assert (mnt / "art" / "hero.bin").read_bytes() == binary(300_000, seed=1)
    assert (mnt / "art/more/big.bin").read_bytes() == binary(3 << 20, seed=8)
    assert (mnt / "code" / "main.c").read_bytes() == b"one\ntwo\nthree\nfour\nfive\n"
    s = bkfs.status(mnt)
    assert s["bam_objects_fetched"] == 2 and s["errors"] == []


def test_diff_get_rm_mv_route_into_components(cli: CLI, tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    server, _game = served
    one = tmp_path / "one"
    cli("clone", f"{server.url}/game", str(one), cwd=tmp_path)
    write_files(one, {"code/main.c": b"one\ntwo\nthree\nfour\nfive\nsix\n", "README": b"g2\n"})
    out = cli("diff", cwd=one)
    assert "+++ b/code/main.c" in out and "+six" in out and "+++ b/README" in out
    assert "README" not in cli("diff", "code/main.c", cwd=one)
    cli("commit", "-m", "six", cwd=one)
    old = cli("get", "-p", "-r", "+~1", "code/main.c", cwd=one)
    assert old == "one\ntwo\nthree\nfour\nfive\n"
    cli("mv", "code/main.c", "code/game.c", cwd=one)
    r = cli.run("mv", "code/game.c", "art/game.c", cwd=one, ok=False)
    assert "different components" in r.stderr
    cli("rm", "art/hero.bin", cwd=one)
    status = cli("status", cwd=one)
    assert "R  code/main.c -> code/game.c" in status and "D  art/hero.bin" in status
    cli("commit", "-m", "reorganise", cwd=one)
    assert cli("status", cwd=one) == ""
    assert not (one / "art" / "hero.bin").exists() and (one / "code" / "game.c").exists()
