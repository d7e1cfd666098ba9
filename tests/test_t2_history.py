"""History through the real CLI: log, revisions (keys, prefixes, tags, ``~N``), tag, undo,
parent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import CLI, keys, write_files
from t2help import binary, fails, files, pool_files

MakeRepo = Callable[..., Path]


def commit_file(cli: CLI, repo: Path, path: str, data: bytes, msg: str, **kw: object) -> str:
    write_files(repo, {path: data})
    cli("add", path, cwd=repo)
    cli("commit", "-m", msg, cwd=repo, **kw)
    return keys(cli, repo)[0]


def linear(make_repo: MakeRepo, cli: CLI, n: int = 4) -> tuple[Path, list[str]]:
    """A repo with csets c0..c{n-1} each writing f.txt = 'v<i>'; returns keys oldest first."""
    repo = make_repo("r")
    out = []
    for i in range(n):
        out.append(commit_file(cli, repo, "f.txt", f"v{i}\n".encode(), f"c{i}"))
    return repo, out


# -- log -------------------------------------------------------------------------------------------
def test_log_keys_verbose_ranges(make_repo: MakeRepo, cli: CLI) -> None:
    repo, ks = linear(make_repo, cli, 4)
    assert keys(cli, repo) == ks[::-1]
    assert all(len(k) == 64 for k in ks)
    log = cli("log", cwd=repo)
    assert [line.split()[1] for line in log.splitlines() if line.startswith("cset ")] == [
        k[:12] for k in ks[::-1]
    ]
    assert "    c3\n" in log and "tester@example.com" in log
    verbose = cli("log", "-v", cwd=repo)
    assert "A  f.txt" in verbose and "M  f.txt" in verbose
    assert cli("log", "--keys", "-r", f"{ks[0]}..{ks[2]}", cwd=repo).split() == [ks[2], ks[1]]
    assert cli("log", "--keys", "-r", f"{ks[1]}..", cwd=repo).split() == [ks[3], ks[2]]
    assert cli("log", "--keys", "-r", ks[1], cwd=repo).split() == [ks[1]]
    one = cli("log", "-r", ks[2][:8], cwd=repo)
    assert one.startswith(f"cset {ks[2][:12]}") and "    c2\n" in one
    assert cli("log", "--keys", "-q", cwd=repo).split() == ks[::-1]


def test_log_path(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n", "d/b.txt": b"b\n"})
    first = keys(cli, repo)[0]
    second = commit_file(cli, repo, "a.txt", b"a2\n", "edit a")
    third = commit_file(cli, repo, "d/b.txt", b"b2\n", "edit b")
    assert cli("log", "--keys", "a.txt", cwd=repo).split() == [second, first]
    assert cli("log", "--keys", "d", cwd=repo).split() == [third, first]
    assert cli("log", "--keys", "b.txt", cwd=repo / "d").split() == [third, first]
    out = cli("log", "a.txt", cwd=repo)
    assert "edit a" in out and "edit b" not in out
    fails(cli, "log", "nonexistent.txt", cwd=repo)


def test_log_of_renamed_directory_shows_old_csets(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"old/x.txt": b"x\n", "y.txt": b"y\n"})
    first = keys(cli, repo)[0]
    second = commit_file(cli, repo, "old/x.txt", b"x2\n", "edit")
    cli("mv", "old", "new", cwd=repo)
    cli("commit", "-m", "rename dir", cwd=repo)
    third = keys(cli, repo)[0]
    assert cli("log", "--keys", "new/x.txt", cwd=repo).split() == [third, second, first]
    assert cli("log", "--keys", "new", cwd=repo).split() == [third, second, first]
    # a file renamed but not yet committed: the pending name works too
    cli("mv", "new/x.txt", "z.txt", cwd=repo)
    assert cli("log", "--keys", "z.txt", cwd=repo).split() == [third, second, first]


# -- revisions -------------------------------------------------------------------------------------
def test_revision_names(make_repo: MakeRepo, cli: CLI) -> None:
    repo, ks = linear(make_repo, cli, 4)
    get = lambda rev: cli("get", "-p", "-r", rev, "f.txt", cwd=repo)  # noqa: E731
    assert get("+") == "v3\n"
    assert get("+~1") == "v2\n"
    assert get("+~3") == "v0\n"
    assert get(ks[1]) == "v1\n"
    assert get(ks[1][:6]) == "v1\n"
    assert get(ks[1][:6].upper()) == "v1\n"
    assert get(f"{ks[2]}~1") == "v1\n"
    line = fails(cli, "get", "-p", "-r", "+~4", "f.txt", cwd=repo)
    assert "+~4" in line
    line = fails(cli, "get", "-p", "-r", "deadbeef", "f.txt", cwd=repo)
    assert "deadbeef" in line and "unknown revision" in line
    fails(cli, "get", "-p", "-r", "+~x", "f.txt", cwd=repo)
    fails(cli, "log", "-r", "nosuchtag", cwd=repo)
    fails(cli, "log", "-r", "abc", cwd=repo)  # too short to be a prefix: unknown


def test_empty_repo_revisions(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r")
    assert keys(cli, repo) == []
    line = fails(cli, "log", "-r", "+", cwd=repo)
    assert "no csets" in line
    fails(cli, "tag", "v1", cwd=repo)
    fails(cli, "undo", "-r", "+", cwd=repo)


def test_ambiguous_key_prefix(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    """Two csets whose keys share their first 4 hex digits: the prefix is ambiguous."""
    from bkrepo import objects as ob
    from bkrepo.repo import Repo

    env = {"BKR_DATE": "1700000000"}
    a = make_repo("a", {"f.txt": b"base\n"})
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    (a / "f.txt").write_text("same edit\n")
    cli("commit", "-m", "seed", cwd=a, env=env)
    k1 = keys(cli, a)[0]
    with Repo.open(a) as r, r.store.read() as txn:
        c1 = txn.cset(bytes.fromhex(k1))
    # find a comment giving a key with the same 4-digit prefix (about 65536 tries)
    for i in range(2_000_000):
        comment = f"twin {i}"
        c2 = ob.Cset(c1.parents, c1.tree, c1.author, c1.time, comment)
        k2 = ob.obj_id(ob.CSET, c2.encode()).hex()
        if k2[:4] == k1[:4] and k2 != k1:
            break
    (b / "f.txt").write_text("same edit\n")
    cli("commit", "-m", comment, cwd=b, env=env)
    assert keys(cli, b)[0] == k2  # keys are a pure function of content
    cli("pull", str(b), cwd=a)
    all_keys = keys(cli, a)
    assert k1 in all_keys and k2 in all_keys
    line = fails(cli, "log", "-r", k1[:4], cwd=a)
    assert "ambiguous" in line
    # more digits resolve it
    n = next(i for i in range(4, 64) if k1[:i] != k2[:i]) + 1
    assert cli("log", "--keys", "-r", k1[:n], cwd=a).split() == [k1]
    assert cli("log", "--keys", "-r", k2[:n], cwd=a).split() == [k2]


# -- tags ------------------------------------------------------------------------------------------
def test_tags(make_repo: MakeRepo, cli: CLI) -> None:
    repo, ks = linear(make_repo, cli, 3)
    assert cli("tag", cwd=repo) == ""
    cli("tag", "v1.0", "-r", ks[0], cwd=repo)
    cli("tag", "latest", cwd=repo)
    assert cli("tag", cwd=repo).splitlines() == [f"latest\t{ks[2][:12]}", f"v1.0\t{ks[0][:12]}"]
    assert cli("get", "-p", "-r", "v1.0", "f.txt", cwd=repo) == "v0\n"
    assert cli("get", "-p", "-r", "latest~1", "f.txt", cwd=repo) == "v1\n"
    assert cli("log", "--keys", "-r", "v1.0..latest", cwd=repo).split() == [ks[2], ks[1]]
    assert "[v1.0]" in cli("log", "-r", "v1.0", cwd=repo)
    # moving a tag: the newest wins
    cli("tag", "latest", "-r", ks[1], cwd=repo, env={"BKR_DATE": "4000000000"})
    assert cli("get", "-p", "-r", "latest", "f.txt", cwd=repo) == "v1\n"
    for bad in ("has space", "+", "a~1", "a..b"):
        fails(cli, "tag", bad, cwd=repo, code=2)
    fails(cli, "tag", "x", "-r", "nosuch", cwd=repo)
    # tags travel with clones
    cli("clone", "r", "c", cwd=repo.parent)
    assert cli("get", "-p", "-r", "v1.0", "f.txt", cwd=repo.parent / "c") == "v0\n"


# -- undo ------------------------------------------------------------------------------------------
def test_undo_tip_and_older(make_repo: MakeRepo, cli: CLI) -> None:
    repo, ks = linear(make_repo, cli, 4)
    write_files(repo, {"g.txt": b"g\n"})
    cli("add", "g.txt", cwd=repo)
    cli("commit", "-m", "add g", cwd=repo)
    ks.append(keys(cli, repo)[0])
    cli("tag", "top", cwd=repo)
    cli("tag", "early", "-r", ks[0], cwd=repo)
    out = cli("undo", "-r", "+", cwd=repo)
    assert "removed 1" in out
    assert keys(cli, repo) == ks[3::-1]
    assert not (repo / "g.txt").exists()
    assert cli("status", cwd=repo) == ""
    assert cli("tag", cwd=repo) == f"early\t{ks[0][:12]}\n"  # the tag on the removed cset went
    fails(cli, "log", "-r", "top", cwd=repo)
    # undo an older cset: it and everything after it go; the tree follows
    cli("undo", "-r", ks[1], cwd=repo)
    assert keys(cli, repo) == [ks[0]]
    assert (repo / "f.txt").read_text() == "v0\n"
    assert cli("status", cwd=repo) == ""
    fails(cli, "log", "-r", ks[2], cwd=repo)
    # undo the first cset: an empty repository
    cli("undo", "-r", ks[0], cwd=repo)
    assert keys(cli, repo) == []
    assert files(repo) == {}
    assert cli("status", cwd=repo) == ""
    # and it can be used again
    commit_file(cli, repo, "f.txt", b"again\n", "again")
    assert len(keys(cli, repo)) == 1


def test_undo_keeps_unrelated_uncommitted_work(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n", "b.txt": b"b\n"})
    commit_file(cli, repo, "a.txt", b"a2\n", "edit a")
    (repo / "b.txt").write_text("local edit\n")
    (repo / "new.txt").write_text("new\n")
    cli("add", "new.txt", cwd=repo)
    cli("undo", "-r", "+", cwd=repo)
    assert (repo / "a.txt").read_text() == "a\n"
    assert (repo / "b.txt").read_text() == "local edit\n"
    assert sorted(cli("status", cwd=repo).splitlines()) == ["A  new.txt", "M  b.txt"]


def test_undo_refuses_to_lose_uncommitted_work(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"a.txt": b"a\n"})
    commit_file(cli, repo, "a.txt", b"a2\n", "edit a")
    commit_file(cli, repo, "n.txt", b"n\n", "add n")
    (repo / "a.txt").write_text("precious\n")
    before = keys(cli, repo)
    line = fails(cli, "undo", "-r", "+~1", cwd=repo)
    assert "a.txt" in line and "uncommitted" in line
    assert keys(cli, repo) == before
    assert (repo / "a.txt").read_text() == "precious\n"
    assert (repo / "n.txt").read_text() == "n\n"
    assert cli("status", cwd=repo) == "M  a.txt\n"
    # an untracked file where undo would have to write one is refused too
    cli("rm", "n.txt", cwd=repo)
    cli("commit", "-m", "rm n", cwd=repo)
    (repo / "n.txt").write_text("mine, untracked\n")
    fails(cli, "undo", "-r", "+", cwd=repo)
    assert (repo / "n.txt").read_text() == "mine, untracked\n"
    assert len(keys(cli, repo)) == 4


def test_undo_of_merge_removes_what_it_merged(
    tmp_path: Path, make_repo: MakeRepo, cli: CLI
) -> None:
    a = make_repo("a", {"base.txt": b"base\n"})
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    ours = commit_file(cli, a, "ours.txt", b"ours\n", "ours")
    t1 = commit_file(cli, b, "theirs.txt", b"t1\n", "theirs 1")
    t2 = commit_file(cli, b, "theirs.txt", b"t2\n", "theirs 2")
    cli("tag", "theirtag", cwd=b)
    cli("pull", str(b), cwd=a)
    merged = keys(cli, a)
    assert len(merged) == 5 and t1 in merged and t2 in merged
    assert "(merge)" in cli("log", "-r", "+", cwd=a)
    assert (a / "theirs.txt").read_text() == "t2\n"
    cli("undo", "-r", "+", cwd=a)
    after = keys(cli, a)
    assert after[0] == ours and t1 not in after and t2 not in after and len(after) == 2
    assert not (a / "theirs.txt").exists()
    assert cli("tag", cwd=a) == ""
    assert cli("status", cwd=a) == ""
    # the undone csets can come back with a pull
    cli("pull", str(b), cwd=a)
    assert t2 in keys(cli, a)


def test_undo_before_a_merge_keeps_what_was_merged_in(
    tmp_path: Path, make_repo: MakeRepo, cli: CLI
) -> None:
    """Undoing a local cset that a merge follows removes it and the merge, not the csets the
    merge brought in: they are not "after" it, and alone they form one line again."""
    a = make_repo("a", {"base.txt": b"base\n"})
    base = keys(cli, a)[0]
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    local = commit_file(cli, a, "local.txt", b"local\n", "local")
    theirs = commit_file(cli, b, "theirs.txt", b"theirs\n", "theirs")
    cli("pull", str(b), cwd=a)
    assert len(keys(cli, a)) == 4
    out = cli("undo", "-r", local, cwd=a)
    assert "removed 2" in out
    assert keys(cli, a) == [theirs, base]
    assert files(a) == {"base.txt": b"base\n", "theirs.txt": b"theirs\n"}
    assert cli("status", cwd=a) == ""


def test_undo_of_bam_file_keeps_pool_consistent(make_repo: MakeRepo, cli: CLI) -> None:
    repo = make_repo("r", {"t.txt": b"t\n"})
    commit_file(cli, repo, "big.bin", binary(80_000), "big")
    assert len(pool_files(repo)) == 1
    cli("undo", "-r", "+", cwd=repo)
    assert not (repo / "big.bin").exists()
    du = cli("bam", "du", cwd=repo)
    assert "unreferenced        1 objects" in du
    assert "local               0 objects" in du


# -- parent ----------------------------------------------------------------------------------------
def test_parent(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    a = make_repo("a", {"f": b"f\n"})
    assert cli("parent", cwd=a) == ""
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    assert Path(cli("parent", cwd=b).strip()) == a.resolve()
    other = make_repo("o", {"f": b"f\n"})
    cli("parent", "../o", cwd=b)
    assert Path(cli("parent", cwd=b).strip()) == other.resolve()
    cli("parent", "--unset", cwd=b)
    assert cli("parent", cwd=b) == ""
    line = fails(cli, "pull", cwd=b, code=2)
    assert "parent" in line
