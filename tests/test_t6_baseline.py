"""Clone with a local baseline, and BAM pools shared on local disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from bamhelp import binary, oid, pool, pool_path
from conftest import CLI, commit_files, keys
from netproxy import CountingProxy


@pytest.fixture
def proxy(serve):  # type: ignore[no-untyped-def]
    """The real server behind a proxy that counts bytes on the wire."""
    server = serve()
    p = CountingProxy(server.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def history(cli: CLI, server_root: Path) -> Path:
    """A serverless source with 6 csets, each adding a 1 MiB BAM file and a text file."""
    src = server_root / "game"
    cli("init", str(src), cwd=server_root)
    for i in range(6):
        commit_files(
            cli,
            src,
            {f"art/{i}.bin": binary(1 << 20, seed=100 + i), f"notes/{i}.txt": b"n\n"},
            f"c{i}",
        )
    return src


def test_baseline_clone_is_identical_and_moves_only_the_difference(
    cli: CLI, tmp_path: Path, history: Path, proxy: CountingProxy
) -> None:
    url = f"{proxy.url}/game"
    base = tmp_path / "base"
    cli("clone", "-r", "+~2", str(history), str(base), cwd=tmp_path)  # 2 csets behind
    commit_files(cli, base, {"local.txt": b"mine\n"}, "local only")  # local cset and tag
    cli("tag", "mine", cwd=base)
    cli("tag", "release", cwd=history)

    proxy.reset()
    cli("clone", url, "plain", cwd=tmp_path)
    plain_bytes = proxy.down
    proxy.reset()
    cli("clone", "-@", str(base), url, "fast", cwd=tmp_path)
    fast_bytes = proxy.down

    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert keys(cli, fast) == keys(cli, plain) == keys(cli, history)
    assert cli("tag", cwd=fast) == cli("tag", cwd=plain)  # "release", not "mine"
    assert "mine" not in cli("tag", cwd=fast)
    assert not (fast / "local.txt").exists()
    assert sorted(p.relative_to(fast) for p in fast.rglob("*") if ".bk" not in p.parts) == sorted(
        p.relative_to(plain) for p in plain.rglob("*") if ".bk" not in p.parts
    )
    assert pool(fast) == pool(plain)
    assert cli("bam", "server", "-l", cwd=fast) == cli("bam", "server", "-l", cwd=plain)
    assert cli("parent", cwd=fast) == cli("parent", cwd=plain)
    # only the two new csets' data crossed the network (2 of 6 MiB, plus small overhead)
    assert fast_bytes < plain_bytes * 0.45, (fast_bytes, plain_bytes)
    assert fast_bytes < (2 << 20) * 1.1 + 200_000


def test_baseline_with_other_options(cli: CLI, tmp_path: Path, history: Path) -> None:
    base = tmp_path / "base"
    cli("clone", "--checkout", "none", str(history), str(base), cwd=tmp_path)
    cli(
        "clone",
        "-@",
        str(base),
        "-r",
        "+~3",
        "--checkout",
        "none",
        str(history),
        "old",
        cwd=tmp_path,
    )
    cli("clone", "-r", "+~3", "--checkout", "none", str(history), "old-plain", cwd=tmp_path)
    assert keys(cli, tmp_path / "old") == keys(cli, tmp_path / "old-plain")
    assert not list((tmp_path / "old").glob("art"))
    other = tmp_path / "other"
    cli("init", str(other), cwd=tmp_path)
    p = cli.run("clone", "-@", str(other), str(history), "x", cwd=tmp_path, ok=False)
    assert "different project" in p.stderr
    assert not (tmp_path / "x").exists()


def test_clones_hardlink_on_one_filesystem_and_copy_across(
    cli: CLI, tmp_path: Path, history: Path
) -> None:
    cli("clone", "--checkout", "none", str(history), "same", cwd=tmp_path)
    o = oid(binary(1 << 20, seed=100))
    assert pool_path(tmp_path / "same", o).stat().st_ino == pool_path(history, o).stat().st_ino
    cli("clone", "--checkout", "none", "--no-hardlinks", str(history), "copied", cwd=tmp_path)
    assert pool_path(tmp_path / "copied", o).stat().st_ino != pool_path(history, o).stat().st_ino
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        dest = shm / f"bkr-test-{os.getpid()}"
        try:
            cli("clone", "--checkout", "none", str(history), str(dest), cwd=tmp_path)
            assert pool_path(dest, o).read_bytes() == pool_path(history, o).read_bytes()
            assert pool_path(dest, o).stat().st_nlink == 1
        finally:
            shutil.rmtree(dest, ignore_errors=True)


def test_pool_search_order_and_corrupt_pool_copies(
    cli: CLI, tmp_path: Path, history: Path, proxy: CountingProxy
) -> None:
    cli("bam", "server", ".", cwd=history)
    bad = tmp_path / "bad"
    good = tmp_path / "good"
    cli(
        "clone",
        "-B",
        "none",
        "--no-hardlinks",
        "--checkout",
        "none",
        str(history),
        str(bad),
        cwd=tmp_path,
    )
    cli("clone", "-B", "none", "--checkout", "none", str(history), str(good), cwd=tmp_path)
    data = binary(1 << 20, seed=103)
    p = pool_path(bad, oid(data))
    os.chmod(p, 0o644)
    p.write_bytes(data[:-1] + b"\xff")  # same size, wrong content
    lazy = tmp_path / "lazy"
    cli("clone", "--checkout", "none", f"{proxy.url}/game", str(lazy), cwd=tmp_path)
    cli("config", "bam.pools", f"{bad}:{good}", cwd=lazy)
    proxy.reset()
    cli("get", "art/3.bin", cwd=lazy)
    assert proxy.down < 100_000  # served from the good pool, not the server
    assert (lazy / "art" / "3.bin").read_bytes() == data
    assert pool_path(lazy, oid(data)).stat().st_ino == pool_path(good, oid(data)).stat().st_ino
    # pools that lack the object: on to the server
    shutil.rmtree(good / ".bk" / "bam")
    shutil.rmtree(bad / ".bk" / "bam")
    proxy.reset()
    cli("get", "art/4.bin", cwd=lazy)
    assert proxy.down > 1 << 20


def test_clean_with_hardlinked_pools_keeps_the_last_copy(
    cli: CLI, tmp_path: Path, history: Path
) -> None:
    cli("clone", "--checkout", "none", str(history), "c", cwd=tmp_path)
    c = tmp_path / "c"
    cli("bam", "clean", "-a", cwd=c)  # no server: every object is needed here
    assert pool(c) == pool(history)
    du = cli("bam", "du", cwd=c)
    assert "shared" in du  # hardlinked with the source's pool


def test_nested_baseline_takes_components_from_the_baseline(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    """A product cloned with -@ BASE: components BASE has come from it, the others (and what
    BASE lacks) from the source; the result equals a plain clone."""
    a = tmp_path / "standalone"
    cli("init", str(a), cwd=tmp_path)
    commit_files(
        cli,
        a,
        {
            "art/a.bin": binary(1 << 20, seed=1),
            "code/m.c": b"m\n",
            "sound/s.bin": binary(1 << 20, seed=2),
        },
        "start",
    )
    (tmp_path / "COMPS").write_text("art\ncode\nsound\n")
    game = server_root / "game"
    cli("partition", "-C", str(tmp_path / "COMPS"), str(a), str(game), cwd=tmp_path)
    server = serve()
    proxy = CountingProxy(server.port)
    try:
        url = f"{proxy.url}/game"
        base = tmp_path / "base"
        cli("clone", "-s", "art", "-s", "code", url, str(base), cwd=tmp_path)  # no sound here
        commit_files(cli, game, {"art/b.bin": binary(1 << 20, seed=3)}, "more art")
        proxy.reset()
        cli("clone", "-@", str(base), url, "fast", cwd=tmp_path)
        fast_bytes = proxy.down
        proxy.reset()
        cli("clone", url, "plain", cwd=tmp_path)
        plain_bytes = proxy.down
    finally:
        proxy.close()
    fast, plain = tmp_path / "fast", tmp_path / "plain"
    for rel in ("", "art", "code", "sound"):
        assert keys(cli, fast / rel) == keys(cli, plain / rel)
    assert (fast / "art" / "b.bin").read_bytes() == binary(1 << 20, seed=3)
    assert (fast / "sound" / "s.bin").read_bytes() == binary(1 << 20, seed=2)
    o = oid(binary(1 << 20, seed=1))
    assert pool_path(fast / "art", o).stat().st_ino == pool_path(base / "art", o).stat().st_ino
    # art/a.bin came from the baseline: about 2 of the 3 MiB crossed the network
    assert fast_bytes < plain_bytes - (1 << 20) * 0.9, (fast_bytes, plain_bytes)
    # with -s and -B as well: the same as without the baseline
    cli("clone", "-@", str(base), "-s", "art", "-B", "none", str(game), "sub", cwd=tmp_path)
    cli("clone", "-s", "art", "-B", "none", str(game), "sub-plain", cwd=tmp_path)
    sub, sub_plain = tmp_path / "sub", tmp_path / "sub-plain"
    assert cli("comps", "--here", cwd=sub).split() == ["art"]
    assert keys(cli, sub / "art") == keys(cli, sub_plain / "art")
    assert cli("bam", "server", "-l", cwd=sub / "art") == ""
    assert pool_path(sub / "art", o).stat().st_ino == pool_path(base / "art", o).stat().st_ino


@pytest.mark.fuse
def test_the_shared_cache_serves_bkr_get_and_clone(
    cli: CLI, tmp_path: Path, lazy, bkfs, mounts
) -> None:  # type: ignore[no-untyped-def]
    """Chunks a bkfs mount fetched serve `bkr clone --checkout get` and `bkr get` of the same
    user: no BAM byte of them crosses the network again, even with the server down."""
    from fusehelp import MiB

    mnt = mounts.foreground(lazy.lazy, "mnt").mountpoint
    bkfs.run("prefetch", str(mnt), "tex/*")
    mounts.cleanup()  # unmounted: the daemon has written everything to the cache
    proxy = CountingProxy(lazy.server.port)
    try:
        cli("clone", f"{proxy.url}/game", "full", cwd=tmp_path)
        down = proxy.down
    finally:
        proxy.close()
    for rel in ("tex/a.bin", "tex/b.bin", "other/c.bin"):
        assert (tmp_path / "full" / rel).read_bytes() == lazy.files[rel]
    assert down < len(lazy.files["other/c.bin"]) + 1 * MiB  # tex/ came from the cache
    other = tmp_path / "other"
    cli("clone", "--checkout", "none", lazy.url, str(other), cwd=tmp_path)
    lazy.server.stop()
    cli("get", "tex/a.bin", cwd=other)
    assert (other / "tex" / "a.bin").read_bytes() == lazy.files["tex/a.bin"]
    r = cli.run("get", "other/c.bin", cwd=other, ok=False)  # never in the cache
    assert "cannot reach" in r.stderr
