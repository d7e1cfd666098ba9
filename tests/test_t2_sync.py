"""Sync over local paths through the real CLI: clone, pull, push, send and receive."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CLI, keys, write_files
from t2help import binary, fails, files, pool_files, snapshot

MakeRepo = Callable[..., Path]
K = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit(cli: CLI, repo: Path, changes: dict[str, bytes], msg: str) -> str:
    write_files(repo, changes)
    cli("add", *changes, cwd=repo)
    cli("commit", "-m", msg, cwd=repo)
    return keys(cli, repo)[0]


def parents_of_tip(repo: Path) -> list[str]:
    from bkrepo.repo import Repo

    with Repo.open(repo) as r, r.store.read() as txn:
        return [p.hex() for p in txn.cset(r.require_tip(txn, "test")).parents]


@pytest.fixture
def pair(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> tuple[Path, Path]:
    """``a`` with some history and ``b`` cloned from it."""
    a = make_repo(
        "a",
        {
            "text.txt": b"".join(b"line %d\n" % i for i in range(1, 11)),
            "other.txt": b"other\n",
            "art/pic.bin": binary(100 * K, 1),
        },
    )
    cli("clone", "a", "b", cwd=tmp_path)
    return a, tmp_path / "b"


# -- clone -----------------------------------------------------------------------------------------
def test_clone_whole_history_and_rev(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    a = make_repo("a", {"f.txt": b"1\n"})
    k2 = commit(cli, a, {"f.txt": b"2\n", "g.bin": binary(70 * K, 1)}, "two")
    k3 = commit(cli, a, {"f.txt": b"3\n", "h.bin": binary(70 * K, 2)}, "three")
    cli("tag", "two", "-r", k2, cwd=a)
    cli("clone", "a", "full", cwd=tmp_path)
    full = tmp_path / "full"
    assert keys(cli, full) == keys(cli, a)
    assert files(full) == files(a)
    assert cli("status", cwd=full) == ""
    assert cli("tag", cwd=full) == cli("tag", cwd=a)
    assert cli("log", "-v", cwd=full) == cli("log", "-v", cwd=a)
    cli("clone", "-r", "two", "a", "old", cwd=tmp_path)
    old = tmp_path / "old"
    assert keys(cli, old) == keys(cli, a)[1:]
    assert (old / "f.txt").read_text() == "2\n" and not (old / "h.bin").exists()
    assert pool_files(old) == [sha(binary(70 * K, 1))]
    assert k3 not in keys(cli, old)
    # default destination name
    sub = tmp_path / "sub"
    sub.mkdir()
    cli("clone", str(a), cwd=sub)
    assert keys(cli, sub / "a") == keys(cli, a)
    # into an existing empty directory
    (tmp_path / "empty").mkdir()
    cli("clone", "a", "empty", cwd=tmp_path)
    assert keys(cli, tmp_path / "empty") == keys(cli, a)
    # no temp directories left next to the clones
    assert not [p for p in os.listdir(tmp_path) if "bkclone" in p]


def test_clone_empty_repo(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    make_repo("a")
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    assert keys(cli, b) == [] and cli("status", cwd=b) == ""
    commit(cli, b, {"f": b"f"}, "first")
    cli("push", cwd=b)
    assert keys(cli, tmp_path / "a") == keys(cli, b)
    assert (tmp_path / "a" / "f").read_bytes() == b"f"


def test_clone_checkout_none_then_get(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    big = binary(100 * K, 5)
    make_repo("a", {"d/x.txt": b"x\n", "big.bin": big})
    cli("clone", "--checkout", "none", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    assert os.listdir(b) == [".bk"]
    assert cli("status", cwd=b) == ""
    assert cli("config", "checkout", cwd=b) == "none\n"
    # history and BAM data are all there (a repo without a server holds its data)
    assert pool_files(b) == [sha(big)]
    cli("get", "d/x.txt", cwd=b)
    assert files(b) == {"d/x.txt": b"x\n"}
    assert cli("status", cwd=b) == ""
    cli("get", ".", cwd=b)
    assert files(b) == {"d/x.txt": b"x\n", "big.bin": big}
    assert cli("status", cwd=b) == ""
    # an edit is seen, a file deleted again is missing
    (b / "d" / "x.txt").write_text("x2\n")
    assert cli("status", cwd=b) == "M  d/x.txt\n"


def test_clone_checkout_none_commit_and_pull(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    a = make_repo("a", {"x.txt": b"x\n", "y.txt": b"y\n"})
    cli("clone", "--checkout", "none", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    commit(cli, b, {"new.txt": b"new\n"}, "in b")
    assert files(b) == {"new.txt": b"new\n"}
    assert cli("status", cwd=b) == ""
    commit(cli, a, {"x.txt": b"x2\n", "z.txt": b"z\n"}, "in a")
    cli("pull", cwd=b)
    # files not materialised stay so; the merge is recorded
    assert files(b) == {"new.txt": b"new\n"}
    assert cli("status", cwd=b) == ""
    assert cli("get", "-p", "x.txt", cwd=b) == "x2\n"


def test_clone_bam_hardlinks_and_copies(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    big = binary(150 * K, 3)
    a = make_repo("a", {"big.bin": big})
    src = a / ".bk" / "bam" / sha(big)[:2] / sha(big)
    cli("clone", "a", "linked", cwd=tmp_path)
    linked = tmp_path / "linked" / ".bk" / "bam" / sha(big)[:2] / sha(big)
    assert linked.stat().st_ino == src.stat().st_ino
    assert (tmp_path / "linked" / "big.bin").read_bytes() == big
    # the working copy is never the pool's inode
    assert (tmp_path / "linked" / "big.bin").stat().st_ino != src.stat().st_ino
    cli("clone", "--no-hardlinks", "a", "copied", cwd=tmp_path)
    copied = tmp_path / "copied" / ".bk" / "bam" / sha(big)[:2] / sha(big)
    assert copied.stat().st_ino != src.stat().st_ino
    assert copied.read_bytes() == big
    assert (copied.stat().st_mode & 0o777) == 0o444


def test_local_clone_of_a_bam_server_repo(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    """A repo that is its own BAM server, cloned by path: the clone names it as its server
    (path + repo id) and fetches from it. The source is opened twice in one process (as the
    peer and as the server); that once failed, so a full clone could not check out and a
    --checkout none clone silently lost its server."""
    big = binary(100 * K, 7)
    a = make_repo("a", {"big.bin": big, "t.txt": b"t\n"})
    cli("bam", "server", ".", cwd=a)
    server_line = f"BAM server: {a} (repo id {cli('id', '--repo', cwd=a).strip()})"
    p = cli.run("clone", "a", "full", cwd=tmp_path)
    assert p.stderr == ""
    full = tmp_path / "full"
    assert (full / "big.bin").read_bytes() == big
    assert cli("bam", "server", cwd=full).strip() == server_line
    p = cli.run("clone", "--checkout", "none", "a", "lazy", cwd=tmp_path)
    assert p.stderr == ""
    lazy = tmp_path / "lazy"
    assert cli("bam", "server", cwd=lazy).strip() == server_line
    assert pool_files(lazy) == []  # the server has it: nothing copied
    assert "1 at the BAM server" in cli("bam", "check", cwd=lazy)
    cli("get", "big.bin", cwd=lazy)
    assert (lazy / "big.bin").read_bytes() == big


def test_repositories_at_paths_that_are_not_utf8(
    tmp_path: Path, make_repo: MakeRepo, cli: CLI
) -> None:
    """A repository's own path may be any bytes: its database opens, and paths recorded in
    it (parent, BAM server, bam.pools) round-trip."""
    import subprocess

    from conftest import BKR

    def bkr(*args: bytes, cwd: bytes) -> bytes:
        p = subprocess.run([*BKR, *args], cwd=cwd, env=cli.env, capture_output=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    big = binary(80 * K, 9)
    make_repo("a", {"big.bin": big})
    base = os.fsencode(tmp_path)
    one, two = base + b"/caf\xe9 one", base + b"/d\xff two"
    bkr(b"clone", b"a", one, cwd=base)
    bkr(b"clone", one, two, cwd=base)
    assert bkr(b"parent", cwd=two) == one + b"\n"
    assert bkr(b"status", cwd=two) == b""
    bkr(b"bam", b"server", one, cwd=two)
    assert bkr(b"bam", b"server", b"-l", cwd=two) == one + b"\n"
    with open(one + b"/new.txt", "wb") as f:
        f.write(b"new\n")
    bkr(b"add", b"new.txt", cwd=one)
    bkr(b"commit", b"-m", b"new", cwd=one)
    assert b"fast-forward" in bkr(b"pull", cwd=two)
    with open(two + b"/new.txt", "rb") as f:
        assert f.read() == b"new\n"


# -- pull ------------------------------------------------------------------------------------------
def test_pull_fast_forward(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    big2 = binary(80 * K, 2)
    k = commit(cli, a, {"other.txt": b"other 2\n", "art/pic2.bin": big2}, "more")
    cli("tag", "t1", cwd=a)
    out = cli("pull", cwd=b)
    assert "fast-forward" in out
    assert keys(cli, b) == keys(cli, a) and keys(cli, b)[0] == k
    assert files(b) == files(a)
    assert sha(big2) in pool_files(b)
    assert cli("status", cwd=b) == ""
    assert "t1" in cli("tag", cwd=b)
    assert "up to date" in cli("pull", cwd=b)


def test_pull_rev(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    k1 = commit(cli, a, {"other.txt": b"o1\n"}, "one")
    commit(cli, a, {"other.txt": b"o2\n"}, "two")
    cli("pull", "-r", k1, cwd=b)
    assert keys(cli, b)[0] == k1
    assert (b / "other.txt").read_text() == "o1\n"


def test_pull_merges_different_files(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    ka = commit(cli, a, {"other.txt": b"changed in a\n"}, "a side")
    kb = commit(cli, b, {"new-in-b.txt": b"b\n"}, "b side")
    out = cli("pull", cwd=b)
    assert "merge" in out
    assert sorted(parents_of_tip(b)) == sorted([ka, kb])
    assert (b / "other.txt").read_text() == "changed in a\n"
    assert (b / "new-in-b.txt").read_text() == "b\n"
    assert cli("status", cwd=b) == ""
    assert set(keys(cli, a)) < set(keys(cli, b))
    # push the merge back: a fast-forward for a
    cli("push", cwd=b)
    assert keys(cli, a) == keys(cli, b)
    assert files(a) == files(b)
    assert cli("status", cwd=a) == ""


def test_pull_merges_hunks_in_one_text_file(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    lines = [b"line %d\n" % i for i in range(1, 11)]
    top = lines.copy()
    top[0] = b"line 1 changed in a\n"
    bottom = lines.copy()
    bottom[9] = b"line 10 changed in b\n"
    commit(cli, a, {"text.txt": b"".join(top)}, "top")
    commit(cli, b, {"text.txt": b"".join(bottom)}, "bottom")
    out = cli("pull", cwd=b)
    assert "merged text in text.txt" in out
    both = lines.copy()
    both[0], both[9] = top[0], bottom[9]
    assert (b / "text.txt").read_bytes() == b"".join(both)
    assert len(parents_of_tip(b)) == 2
    assert cli("status", cwd=b) == ""
    assert cli("get", "-p", "text.txt", cwd=b).encode() == b"".join(both)


def test_pull_conflict_leaves_repo_as_before(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    commit(cli, a, {"text.txt": b"a's version\n", "art/pic.bin": binary(100 * K, 10)}, "a")
    commit(cli, b, {"text.txt": b"b's version\n", "art/pic.bin": binary(100 * K, 11)}, "b")
    (b / "other.txt").write_text("uncommitted, untouched by the pull\n")
    (b / "untracked.txt").write_text("u\n")
    before = snapshot(cli, b)
    line = fails(cli, "pull", cwd=b)
    assert "text.txt" in line and "art/pic.bin" in line and "conflict" in line
    after = snapshot(cli, b)
    assert {k: v for k, v in after.items() if k != "pool"} == {
        k: v for k, v in before.items() if k != "pool"
    }
    # --ours keeps ours, --theirs takes theirs
    (b / "other.txt").write_text("other\n")
    cli("pull", "--ours", cwd=b)
    assert (b / "text.txt").read_text() == "b's version\n"
    assert (b / "art" / "pic.bin").read_bytes() == binary(100 * K, 11)
    assert len(parents_of_tip(b)) == 2
    assert cli("status", cwd=b) == "?  untracked.txt\n"
    cli("undo", "-r", "+", cwd=b)
    cli("pull", "--theirs", cwd=b)
    assert (b / "text.txt").read_text() == "a's version\n"
    assert (b / "art" / "pic.bin").read_bytes() == binary(100 * K, 10)
    assert cli("status", cwd=b) == "?  untracked.txt\n"
    fails(cli, "pull", "--ours", "--theirs", cwd=b, code=2)


def test_pull_edit_vs_delete_conflict(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    cli("rm", "other.txt", cwd=a)
    cli("commit", "-m", "rm other", cwd=a)
    commit(cli, b, {"other.txt": b"edited\n"}, "edit other")
    line = fails(cli, "pull", cwd=b)
    assert "other.txt" in line
    cli("pull", "--theirs", cwd=b)
    assert not (b / "other.txt").exists()
    assert cli("status", cwd=b) == ""


def test_pull_both_add_same_path_conflict(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    commit(cli, a, {"same.txt": b"from a\n"}, "a adds")
    commit(cli, b, {"same.txt": b"from b\n"}, "b adds")
    line = fails(cli, "pull", cwd=b)
    assert "same.txt" in line
    cli("pull", "--theirs", cwd=b)
    assert (b / "same.txt").read_text() == "from a\n"
    assert cli("status", cwd=b) == ""


def test_pull_rename_one_side_edit_other(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    cli("mv", "text.txt", "docs/renamed.txt", cwd=a)
    cli("mv", "art", "assets", cwd=a)
    cli("commit", "-m", "renames", cwd=a)
    edited = b"edited in b\n" + (b / "text.txt").read_bytes()
    pic = binary(100 * K, 20)
    commit(cli, b, {"text.txt": edited, "art/pic.bin": pic}, "edits")
    cli("pull", cwd=b)
    assert not (b / "text.txt").exists() and not (b / "art").exists()
    assert (b / "docs" / "renamed.txt").read_bytes() == edited
    assert (b / "assets" / "pic.bin").read_bytes() == pic
    assert cli("status", cwd=b) == ""
    # history follows the file across the merge: added, renamed (a), edited (b), merged
    assert len(cli("log", "--keys", "docs/renamed.txt", cwd=b).split()) == 4
    # and the other direction
    cli("pull", str(b), cwd=a)
    assert files(a) == files(b)


def test_pull_keeps_uncommitted_work_or_refuses(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    commit(cli, a, {"other.txt": b"new other\n"}, "a")
    # an edit to a file the pull does not touch is kept
    (b / "text.txt").write_text("mine\n")
    cli("pull", cwd=b)
    assert (b / "text.txt").read_text() == "mine\n"
    assert (b / "other.txt").read_text() == "new other\n"
    assert cli("status", cwd=b) == "M  text.txt\n"
    # an edit to a file the pull changes: refused, nothing changed
    commit(cli, a, {"text.txt": b"theirs\n"}, "a2")
    before = snapshot(cli, b)
    line = fails(cli, "pull", cwd=b)
    assert "text.txt" in line and "uncommitted" in line
    assert snapshot(cli, b) == before


def test_pull_from_other_project_refused(
    pair: tuple[Path, Path], make_repo: MakeRepo, cli: CLI
) -> None:
    _a, b = pair
    other = make_repo("other", {"x": b"x\n"})
    before = snapshot(cli, b)
    line = fails(cli, "pull", str(other), cwd=b)
    assert "different project" in line
    fails(cli, "push", str(other), cwd=b)
    assert snapshot(cli, b) == before
    assert len(keys(cli, other)) == 1


# -- push ------------------------------------------------------------------------------------------
def test_push_fast_forward_updates_target_tree(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    big = binary(90 * K, 30)
    k = commit(cli, b, {"other.txt": b"pushed\n", "art/new.bin": big}, "from b")
    cli("tag", "pushed-tag", cwd=b)
    out = cli("push", cwd=b)
    assert "fast-forward" in out
    assert keys(cli, a)[0] == k
    assert (a / "other.txt").read_text() == "pushed\n"
    assert (a / "art" / "new.bin").read_bytes() == big
    assert sha(big) in pool_files(a)
    assert cli("status", cwd=a) == ""
    assert "pushed-tag" in cli("tag", cwd=a)
    assert "up to date" in cli("push", cwd=b)


def test_push_needs_pull_first(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    commit(cli, a, {"other.txt": b"a\n"}, "a")
    commit(cli, b, {"text.txt": b"b\n"}, "b")
    before = snapshot(cli, a)
    line = fails(cli, "push", cwd=b)
    assert "pull first" in line
    assert snapshot(cli, a) == before
    cli("pull", cwd=b)
    cli("push", cwd=b)
    assert keys(cli, a) == keys(cli, b)


def test_push_refused_with_uncommitted_changes_in_target(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    commit(cli, b, {"other.txt": b"from b\n", "art/pic.bin": binary(100 * K, 40)}, "b")
    (a / "other.txt").write_text("uncommitted in a\n")
    before_a, before_b = snapshot(cli, a), snapshot(cli, b)
    line = fails(cli, "push", cwd=b)
    assert "other.txt" in line and "uncommitted" in line
    assert snapshot(cli, a) == before_a  # nothing changed: history, files, pool
    assert snapshot(cli, b) == before_b
    # changes to files the push does not touch do not stop it
    (a / "other.txt").write_text("other\n")
    (a / "text.txt").write_text("edited in a\n")
    cli("push", cwd=b)
    assert (a / "text.txt").read_text() == "edited in a\n"
    assert (a / "other.txt").read_text() == "from b\n"
    assert cli("status", cwd=a) == "M  text.txt\n"


def test_push_into_checkout_none_target(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    make_repo("a", {"f.txt": b"f\n"})
    cli("clone", "--checkout", "none", "a", "hub", cwd=tmp_path)
    cli("clone", "hub", "w", cwd=tmp_path)
    w = tmp_path / "w"
    commit(cli, w, {"g.txt": b"g\n"}, "g")
    cli("push", cwd=w)
    hub = tmp_path / "hub"
    assert os.listdir(hub) == [".bk"]
    assert keys(cli, hub) == keys(cli, w)
    assert cli("status", cwd=hub) == ""


# -- send and receive ------------------------------------------------------------------------------
def test_send_receive_full_into_fresh_repo(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    big = binary(120 * K, 50)
    a = make_repo("a", {"f.txt": b"f\n", "big.bin": big})
    commit(cli, a, {"f.txt": b"f2\n"}, "two")
    cli("tag", "v1", cwd=a)
    out = cli("send", str(tmp_path / "all.bkb"), cwd=a)
    assert "2 cset" in out
    cli("init", "fresh", cwd=tmp_path)
    fresh = tmp_path / "fresh"
    out = cli("receive", str(tmp_path / "all.bkb"), cwd=fresh)
    assert keys(cli, fresh) == keys(cli, a)
    assert files(fresh) == files(a)
    assert pool_files(fresh) == [sha(big)]
    assert cli("id", cwd=fresh) == cli("id", cwd=a)
    assert cli("status", cwd=fresh) == ""
    assert "v1" in cli("tag", cwd=fresh)
    # the source's pool is not needed: the bundle carries the data
    assert cli("get", "-p", "f.txt", cwd=fresh) == "f2\n"
    # receiving it again changes nothing
    assert "up to date" in cli("receive", str(tmp_path / "all.bkb"), cwd=fresh)


def test_send_range_and_stdout(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    a = make_repo("a", {"f.txt": b"1\n"})
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    base = keys(cli, a)[0]
    big = binary(70 * K, 60)
    commit(cli, a, {"f.txt": b"2\n", "b.bin": big}, "two")
    commit(cli, a, {"f.txt": b"3\n"}, "three")
    out = cli("send", "-r", f"{base}..+", str(tmp_path / "inc.bkb"), cwd=a)
    assert "2 cset" in out
    cli("receive", str(tmp_path / "inc.bkb"), cwd=b)
    assert keys(cli, b) == keys(cli, a)
    assert (b / "f.txt").read_text() == "3\n" and (b / "b.bin").read_bytes() == big
    # an incremental bundle does not apply to a repo without its base
    cli("init", "fresh", cwd=tmp_path)
    fresh = tmp_path / "fresh"
    line = fails(cli, "receive", str(tmp_path / "inc.bkb"), cwd=fresh)
    assert "lacks" in line or "pull" in line
    assert keys(cli, fresh) == []
    # send to stdout, receive from stdin
    import subprocess

    from conftest import BKR

    data = subprocess.run(
        [*BKR, "send", "-"], cwd=a, env=cli.env, capture_output=True, check=True
    ).stdout
    assert data.startswith(b"BKBUNDLE 1\n")
    p = subprocess.run(
        [*BKR, "receive", "-"], cwd=fresh, env=cli.env, input=data, capture_output=True
    )
    assert p.returncode == 0, p.stderr
    assert keys(cli, fresh) == keys(cli, a)


def test_receive_merges_like_pull(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    a = make_repo("a", {"x.txt": b"x\n", "y.txt": b"y\n"})
    cli("clone", "a", "b", cwd=tmp_path)
    b = tmp_path / "b"
    commit(cli, a, {"x.txt": b"x from a\n"}, "a")
    commit(cli, b, {"y.txt": b"y from b\n"}, "b")
    cli("send", str(tmp_path / "a.bkb"), cwd=a)
    out = cli("receive", str(tmp_path / "a.bkb"), cwd=b)
    assert "merge" in out
    assert (b / "x.txt").read_text() == "x from a\n"
    assert (b / "y.txt").read_text() == "y from b\n"
    assert len(parents_of_tip(b)) == 2


def test_receive_damaged_bundle(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    big = binary(90 * K, 70)
    a = make_repo("a", {"f.txt": b"f\n"})
    cli("clone", "a", "b", cwd=tmp_path)
    cli("init", "fresh", cwd=tmp_path)
    targets = [tmp_path / "b", tmp_path / "fresh"]
    commit(cli, a, {"f.txt": b"f2\n", "big.bin": big, "more.txt": b"more text\n" * 50}, "two")
    bundle = tmp_path / "x.bkb"
    cli("send", str(bundle), cwd=a)
    good = bundle.read_bytes()
    damaged = {
        "truncated in BAM data": good[: good.index(big[1000:1100])],
        "truncated at the end": good[:-1],
        "history object flipped": good.replace(b"more text", b"MORE text", 1),
        "BAM byte flipped": good.replace(big[1000:1100], big[1000:1050] + b"X" + big[1051:1100]),
        "garbage": b"this is not a bundle at all\n",
        "empty": b"",
        "header only": good[: good.index(b"O")],
    }
    before = [snapshot(cli, t) for t in targets]
    for what, data in damaged.items():
        bundle.write_bytes(data)
        for target, snap in zip(targets, before, strict=True):
            line = fails(cli, "receive", str(bundle), cwd=target)
            assert "receive" in line, what
            assert snapshot(cli, target) == snap, (what, line)
    fails(cli, "receive", str(tmp_path / "no-such.bkb"), cwd=targets[0], code=2)
    # the good bundle still applies to both
    bundle.write_bytes(good)
    for t in targets:
        cli("receive", str(bundle), cwd=t)
        assert keys(cli, t) == keys(cli, a)
        assert (t / "big.bin").read_bytes() == big


def test_receive_other_project_refused(tmp_path: Path, make_repo: MakeRepo, cli: CLI) -> None:
    a = make_repo("a", {"f": b"f"})
    o = make_repo("o", {"g": b"g"})
    cli("send", str(tmp_path / "a.bkb"), cwd=a)
    before = snapshot(cli, o)
    line = fails(cli, "receive", str(tmp_path / "a.bkb"), cwd=o)
    assert "different project" in line
    assert snapshot(cli, o) == before


def test_pull_refuses_over_untracked_and_staged_work(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    commit(cli, a, {"incoming.txt": b"theirs\n", "other.txt": b"other 2\n"}, "a")
    # an untracked file where the pull would write one
    (b / "incoming.txt").write_text("mine, untracked\n")
    before = snapshot(cli, b)
    line = fails(cli, "pull", cwd=b)
    assert "incoming.txt" in line
    assert snapshot(cli, b) == before
    # a staged removal of a file the pull changes
    (b / "incoming.txt").unlink()
    cli("rm", "other.txt", cwd=b)
    line = fails(cli, "pull", cwd=b)
    assert "other.txt" in line
    assert (b / "incoming.txt").exists() is False and not (b / "other.txt").exists()
    assert cli("status", cwd=b) == "D  other.txt\n"
    cli("commit", "-m", "drop other", cwd=b)
    # now it is a real edit/delete conflict, settled for us
    cli("pull", "--ours", cwd=b)
    assert (b / "incoming.txt").read_text() == "theirs\n"
    assert not (b / "other.txt").exists()


def test_pull_merges_mode_and_content_and_both_renames(pair: tuple[Path, Path], cli: CLI) -> None:
    a, b = pair
    os.chmod(a / "other.txt", 0o755)
    cli("mv", "text.txt", "a-name.txt", cwd=a)
    cli("commit", "-m", "chmod + rename", cwd=a)
    commit(cli, b, {"other.txt": b"new content\n"}, "edit")
    cli("mv", "text.txt", "b-name.txt", cwd=b)
    cli("commit", "-m", "other rename", cwd=b)
    line = fails(cli, "pull", cwd=b)
    assert "text.txt" in line or "b-name.txt" in line
    cli("pull", "--theirs", cwd=b)
    assert (b / "other.txt").read_text() == "new content\n"
    assert os.stat(b / "other.txt").st_mode & 0o777 == 0o755
    assert (b / "a-name.txt").exists() and not (b / "b-name.txt").exists()
    assert cli("status", cwd=b) == ""
