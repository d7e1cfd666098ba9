"""``bkr partition``: a standalone repository split into a product and components, with the
real CLI.  Layout, per-component history, moves, pruning, determinism, incremental partition
and every error that must stop it before anything is written."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest
from bamhelp import binary, oid, pool, pool_path
from conftest import CLI, commit_files, keys


def tree_files(root: Path) -> dict[str, bytes]:
    """Every working file below root, nested repositories included, metadata excluded."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".bk"]
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture
def source(cli: CLI, tmp_path: Path) -> Path:
    """A standalone repo with history across src, src/gnu (nested boundary), doc and the
    product's own files; a file that moved into src; a file deleted before the end; a tag."""
    a = tmp_path / "a"
    cli("init", str(a), cwd=tmp_path)
    commit_files(
        cli,
        a,
        {
            "README": b"top\n",
            "src/main.c": b"int main;\n",
            "src/gnu/g.c": b"gnu\n",
            "doc/guide.txt": b"guide\n",
            "doc/pic.bin": binary(200_000, seed=3),
            "lib/x.c": b"x\n",
        },
        "first",
    )
    commit_files(cli, a, {"src/main.c": b"int main;\nint two;\n"}, "second")
    cli("mv", "lib/x.c", "src/x.c", cwd=a)
    cli("commit", "-m", "x moves into src", cwd=a)
    commit_files(cli, a, {"doc/old.txt": b"old\n"}, "an old doc")
    cli("rm", "doc/old.txt", cwd=a)
    cli("commit", "-m", "drop the old doc", cwd=a)
    commit_files(cli, a, {"src/gnu/g.c": b"gnu 2\n", "README": b"top 2\n"}, "gnu and readme")
    cli("tag", "v1", cwd=a)
    return a


@pytest.fixture
def comps_file(tmp_path: Path) -> Path:
    f = tmp_path / "COMPONENTS"
    f.write_text("# the parts\nsrc\n\n./src/gnu/\ndoc   # docs\n")
    return f


def test_layout_history_moves_and_pruning(
    cli: CLI, tmp_path: Path, source: Path, comps_file: Path
) -> None:
    out = tmp_path / "p"
    cli("partition", "-C", str(comps_file), str(source), str(out), cwd=tmp_path)
    assert cli("comps", cwd=out).split() == ["doc", "src", "src/gnu"]
    # the tree is the input's tree, file for file
    assert tree_files(out) == tree_files(source)
    for comp in ("src", "src/gnu", "doc"):
        assert (out / comp / ".bk").is_dir()
    assert cli("status", cwd=out) == ""
    # each component has the history of its own files, with paths inside it
    src_log = cli("log", "-v", cwd=out / "src")
    assert "x moves into src" not in src_log  # x.c looks as if it always lived in src
    assert "A  x.c" in src_log and "A  main.c" in src_log and "gnu" not in src_log
    assert [c.split()[0] for c in cli("log", cwd=out / "src").split("\n\n") if c] == [
        "cset",
        "cset",
    ]
    gnu = cli("log", "-v", cwd=out / "src" / "gnu")
    assert "A  g.c" in gnu and "M  g.c" in gnu and "main.c" not in gnu
    doc = cli("log", "-v", cwd=out / "doc")
    assert "old.txt" not in doc  # deleted before the partition point: pruned
    # the product: its own files, every component cset recorded, the tag
    prod = cli("log", "-v", cwd=out)
    assert "A  README" in prod and "A  src/gnu/g.c" in prod and "A  src/x.c" in prod
    assert "old doc" not in prod
    assert "v1" in cli("tag", cwd=out)
    assert len(keys(cli, out)) == 3  # first, second, gnu and readme
    # the product and its components are distinct projects; nothing syncs with the source
    ids = {cli("id", cwd=p).strip() for p in (out, out / "src", out / "doc", source)}
    assert len(ids) == 4
    r = cli.run("pull", str(source), cwd=out, ok=False)
    assert "different project" in r.stderr


def test_keep_deleted_and_prune_list(
    cli: CLI, tmp_path: Path, source: Path, comps_file: Path
) -> None:
    kept = tmp_path / "kept"
    cli("partition", "--keep-deleted", "-C", str(comps_file), str(source), str(kept), cwd=tmp_path)
    doc = cli("log", "-v", cwd=kept / "doc")
    assert "A  old.txt" in doc and "D  old.txt" in doc
    prune = tmp_path / "PRUNE"
    prune.write_text("# not wanted\ndoc/pic.bin\nsrc/gnu/\n")
    pruned = tmp_path / "pruned"
    cli(
        "partition", "-C", str(comps_file), "-P", str(prune), str(source), str(pruned), cwd=tmp_path
    )
    assert not (pruned / "doc" / "pic.bin").exists()
    # src/gnu lost every file, so that component is not created
    assert cli("comps", cwd=pruned).split() == ["doc", "src"]
    assert not (pruned / "src" / "gnu").exists()
    assert "pic.bin" not in cli("log", "-v", cwd=pruned / "doc")


def test_partition_is_deterministic_serial_or_parallel(
    cli: CLI, tmp_path: Path, source: Path, comps_file: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    cli("partition", "-C", str(comps_file), str(source), str(one), cwd=tmp_path)
    cli("partition", "-j", "2", "-C", str(comps_file), str(source), str(two), cwd=tmp_path)
    for rel in ("", "src", "src/gnu", "doc"):
        assert keys(cli, one / rel) == keys(cli, two / rel)
        assert cli("id", cwd=one / rel) == cli("id", cwd=two / rel)
    # ... so two partitions of one input sync with each other
    assert "already up to date" in cli("pull", str(two), cwd=one)


def test_incremental_partition_syncs_with_the_first(
    cli: CLI, tmp_path: Path, source: Path, comps_file: Path, serve, server_root: Path
) -> None:  # type: ignore[no-untyped-def]
    first = server_root / "game"
    cli("partition", "-C", str(comps_file), str(source), str(first), cwd=tmp_path)
    server = serve()
    work = tmp_path / "work"
    cli("clone", f"{server.url}/game", str(work), cwd=tmp_path)
    # the standalone repo goes on; partition the superset like the first result
    commit_files(cli, source, {"src/new.c": b"new\n", "doc/guide.txt": b"guide 2\n"}, "after")
    again = tmp_path / "again"
    cli("partition", "-@", f"{server.url}/game", str(source), str(again), cwd=tmp_path)
    assert keys(cli, again)[1:] == keys(cli, first)
    out = cli("pull", str(again), cwd=work)
    assert "fast-forward" in out
    assert (work / "src" / "new.c").read_bytes() == b"new\n"
    assert keys(cli, work / "src") == keys(cli, again / "src")
    assert cli("status", cwd=work) == ""
    # a clone of the first result carries the partition record: -@ works from it too
    third = tmp_path / "third"
    cli("partition", "-@", str(work), str(source), str(third), cwd=tmp_path)
    assert keys(cli, third) == keys(cli, again)


def nothing_written(tmp_path: Path, dest: Path) -> None:
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if ".bkpartition-" in p.name]


def test_errors_stop_partition_before_anything_is_written(
    cli: CLI, tmp_path: Path, source: Path, comps_file: Path
) -> None:
    dest = tmp_path / "out"
    # a components file naming a directory that is not there
    bad = tmp_path / "BAD"
    bad.write_text("src\nnosuch\n")
    r = cli.run("partition", "-C", str(bad), str(source), str(dest), cwd=tmp_path, ok=False)
    assert r.returncode == 1 and "nosuch" in r.stderr and "Traceback" not in r.stderr
    nothing_written(tmp_path, dest)
    # a file colliding with a component path: a file 'src' once sat where src/gnu's parent is
    c = tmp_path / "c"
    cli("init", str(c), cwd=tmp_path)
    commit_files(cli, c, {"tools": b"a file\n"}, "a file named tools")
    cli("mv", "tools", "tools.txt", cwd=c)
    cli("commit", "-m", "rename", cwd=c)
    commit_files(cli, c, {"tools/bin/run": b"run\n"}, "now a directory")
    (tmp_path / "C2").write_text("tools/bin\n")
    r = cli.run("partition", "-C", str(tmp_path / "C2"), str(c), str(dest), cwd=tmp_path, ok=False)
    assert "collides with a component" in r.stderr and "tools" in r.stderr
    nothing_written(tmp_path, dest)
    # a cross-component move after the partition point (incremental)
    first = tmp_path / "first"
    cli("partition", "-C", str(comps_file), str(source), str(first), cwd=tmp_path)
    cli("mv", "src/x.c", "doc/x.c", cwd=source)
    cli("commit", "-m", "cross move", cwd=source)
    r = cli.run("partition", "-@", str(first), str(source), str(dest), cwd=tmp_path, ok=False)
    assert "moved between components" in r.stderr and "src/x.c" in r.stderr
    nothing_written(tmp_path, dest)
    # an input that is not a superset of the earlier partition's input
    older = tmp_path / "older"
    cli("clone", "-r", "+~4", str(source), str(older), cwd=tmp_path)
    r = cli.run("partition", "-@", str(first), str(older), str(dest), cwd=tmp_path, ok=False)
    assert "not a superset" in r.stderr
    nothing_written(tmp_path, dest)
    # usage errors: exit 2
    for args in (
        [str(source), str(dest)],
        ["-C", str(comps_file), "-@", str(first), str(source), str(dest)],
        ["-C", str(tmp_path / "missing-file"), str(source), str(dest)],
    ):
        r = cli.run("partition", *args, cwd=tmp_path, ok=False)
        assert r.returncode == 2, r.stderr
    r = cli.run("partition", "-C", str(comps_file), str(first), str(dest), cwd=tmp_path, ok=False)
    assert "standalone" in r.stderr
    r = cli.run("partition", "-C", str(comps_file), str(source), str(first), cwd=tmp_path, ok=False)
    assert "exists" in r.stderr
    nothing_written(tmp_path, dest)


def test_bam_data_is_not_copied(cli: CLI, tmp_path: Path, source: Path, comps_file: Path) -> None:
    pic = oid(binary(200_000, seed=3))
    assert pic in pool(source)
    out = tmp_path / "p"
    cli("partition", "-C", str(comps_file), str(source), str(out), cwd=tmp_path)
    linked = pool_path(out / "doc", pic)
    assert os.stat(linked).st_ino == os.stat(pool_path(source, pic)).st_ino
    assert filecmp.cmp(out / "doc" / "pic.bin", source / "doc" / "pic.bin", shallow=False)
    cli("bam", "check", cwd=out / "doc")  # every BAM delta's data is there, verified


def test_components_file_attach_lines(cli: CLI, tmp_path: Path, source: Path, make_repo) -> None:  # type: ignore[no-untyped-def]
    """A ``PATH|URL`` line attaches a repository after the split, deterministically."""
    lib = make_repo("libz", {"z.c": b"z\n"})
    comps = tmp_path / "WITH_ATTACH"
    comps.write_text(f"src\ndoc\nthird_party/z|{lib}\n")
    one, two = tmp_path / "one", tmp_path / "two"
    for dest in (one, two):
        cli("partition", "-C", str(comps), str(source), str(dest), cwd=tmp_path)
    assert cli("comps", cwd=one).split() == ["doc", "src", "third_party/z"]
    assert (one / "third_party" / "z" / "z.c").read_bytes() == b"z\n"
    assert "attach third_party/z" in cli("log", "-r", "+", cwd=one)
    assert keys(cli, one) == keys(cli, two)
    assert cli("status", cwd=one) == ""
