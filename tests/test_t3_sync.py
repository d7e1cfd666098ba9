"""Clone, pull and push over HTTP, and the BAM invariants (SPEC §2) with real servers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from backends import both_backends
from bamhelp import binary, oid, pool, pool_path
from conftest import CLI, keys, write_files

TEX1 = binary(2 << 20, seed=11)
TEX2 = binary(2 << 20, seed=12)
MESH = binary(1 << 20, seed=13)


def make_central(cli: CLI, root: Path, name: str = "game") -> Path:
    """A repo that is its own BAM server, with two csets of BAM history."""
    repo = root / name
    cli("init", str(repo), cwd=root)
    write_files(repo, {"tex.bin": TEX1, "mesh.bin": MESH, "src/main.c": b"int main;\n"})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "first", cwd=repo)
    (repo / "tex.bin").write_bytes(TEX2)
    cli("commit", "-m", "second", cwd=repo)
    cli("bam", "server", ".", cwd=repo)
    return repo


@both_backends
def test_lazy_clone_moves_no_bam_data(cli: CLI, tmp_path: Path, server_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    server = serve()
    url = f"{server.url}/game"
    cli("clone", "--checkout", "none", url, "lazy", cwd=tmp_path)
    lazy = tmp_path / "lazy"
    assert pool(lazy) == set()
    assert sorted(p.name for p in lazy.iterdir()) == [".bk"]
    assert keys(cli, lazy) == keys(cli, central)
    assert cli("bam", "server", "-l", cwd=lazy).strip() == url
    # recorded as URL + the server's repo id (BitKeeper's BAM_SERVER)
    server_id = cli("id", "--repo", cwd=central).strip()
    assert cli("bam", "server", cwd=lazy).strip() == f"BAM server: {url} (repo id {server_id})"
    assert cli("status", cwd=lazy) == ""
    assert "passed" in cli("bam", "check", "--fast", cwd=lazy)
    cli("get", "tex.bin", cwd=lazy)
    assert (lazy / "tex.bin").read_bytes() == TEX2
    assert pool(lazy) == {oid(TEX2)}


def test_get_of_data_the_server_lost_names_the_file(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    server = serve()
    cli("clone", "--checkout", "none", f"{server.url}/game", "lazy", cwd=tmp_path)
    lazy = tmp_path / "lazy"
    pool_path(central, oid(MESH)).unlink()
    for args in (["get", "mesh.bin"], ["get", "-p", "mesh.bin"]):
        p = cli.run(*args, cwd=lazy, ok=False)
        assert p.stderr.startswith("bkr: get: mesh.bin: ") and p.stderr.count("\n") == 1
        assert oid(MESH) in p.stderr and "not on" in p.stderr
    assert not (lazy / "mesh.bin").exists() and pool(lazy) == set()
    p = cli.run("bam", "check", cwd=lazy, ok=False)
    assert "missing: mesh.bin" in p.stdout


def test_checkout_get_fetches_only_the_tip(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    make_central(cli, server_root)
    server = serve()
    cli("clone", f"{server.url}/game", "full", cwd=tmp_path)
    full = tmp_path / "full"
    assert (full / "tex.bin").read_bytes() == TEX2
    assert (full / "src" / "main.c").read_text() == "int main;\n"
    assert pool(full) == {oid(TEX2), oid(MESH)}  # the old tex.bin stays on the server
    cli("get", "-r", "+~1", "tex.bin", cwd=full)
    assert (full / "tex.bin").read_bytes() == TEX1


def test_clone_of_a_serverless_repo_copies_all_its_data(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    cli("bam", "server", "-f", "none", cwd=central)
    server = serve()
    cli("clone", "--checkout", "none", f"{server.url}/game", "c", cwd=tmp_path)
    assert pool(tmp_path / "c") == {oid(TEX1), oid(TEX2), oid(MESH)}
    assert cli("bam", "server", "-l", cwd=tmp_path / "c") == ""


@both_backends
def test_clone_B_none_dot_and_url(
    cli: CLI, tmp_path: Path, server_root: Path, serve, backend
) -> None:  # type: ignore[no-untyped-def]
    make_central(cli, server_root)
    store = server_root / "store"
    cli("init", str(store), cwd=server_root)
    cli("bam", "server", ".", cwd=store)
    server = serve("--anonymous", "write")
    url = f"{server.url}/game"
    everything = {oid(TEX1), oid(TEX2), oid(MESH)}

    cli("clone", "-B", "none", "--checkout", "none", url, "standalone", cwd=tmp_path)
    assert pool(tmp_path / "standalone") == everything
    assert cli("bam", "server", "-l", cwd=tmp_path / "standalone") == ""

    cli("clone", "-B", ".", "--checkout", "none", url, "mirror", cwd=tmp_path)
    assert pool(tmp_path / "mirror") == everything
    assert "is the BAM server" in cli("bam", "server", cwd=tmp_path / "mirror")

    cli("clone", "-B", f"{server.url}/store", "--checkout", "none", url, "other", cwd=tmp_path)
    assert everything <= backend.objects(store)  # the new server got what it lacked
    assert cli("bam", "server", "-l", cwd=tmp_path / "other").strip() == f"{server.url}/store"

    p = cli.run("clone", "-B", "http://127.0.0.1:9/nothing", url, "bad", cwd=tmp_path, ok=False)
    assert "BAM server" in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad.bkclone-*"))


def test_inherited_server_that_cannot_be_reached_is_cleared(cli: CLI, tmp_path: Path) -> None:
    srv = tmp_path / "oldserver"
    cli("init", str(srv), cwd=tmp_path)
    src = tmp_path / "src"
    cli("init", str(src), cwd=tmp_path)
    cli("bam", "server", "-s", str(srv), cwd=src)
    write_files(src, {"notes.txt": b"text only\n"})
    cli("add", ".", cwd=src)
    cli("commit", "-m", "text", cwd=src)
    shutil.rmtree(srv)
    p = cli.run("clone", str(src), "dst", cwd=tmp_path)
    assert "warning" in p.stderr and "bam server" in p.stderr.lower()
    assert cli("bam", "server", "-l", cwd=tmp_path / "dst") == ""
    assert (tmp_path / "dst" / "notes.txt").read_text() == "text only\n"


def test_inherited_server_with_another_repo_id_is_cleared(cli: CLI, tmp_path: Path) -> None:
    """The source names a server by path + id; the path now holds another repository (same
    place, new repo id): the clone must not trust it."""
    srv = tmp_path / "server"
    cli("init", str(srv), cwd=tmp_path)
    src = tmp_path / "src"
    cli("init", str(src), cwd=tmp_path)
    cli("bam", "server", "-s", str(srv), cwd=src)
    write_files(src, {"notes.txt": b"text\n"})
    cli("add", ".", cwd=src)
    cli("commit", "-m", "text", cwd=src)
    shutil.rmtree(srv)
    cli("init", str(srv), cwd=tmp_path)
    p = cli.run("clone", str(src), "dst", cwd=tmp_path)
    assert p.stderr.count("\n") == 1 and "different repository" in p.stderr
    assert "bkr bam server URL" in p.stderr
    assert cli("bam", "server", "-l", cwd=tmp_path / "dst") == ""


def test_clone_of_unpushed_work_fills_the_source_server_first(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    """Invariant 3 for clone: csets leaving a repo take their BAM data to that repo's server
    first, so a clone sharing the server needs none of it in its own pool."""
    central = make_central(cli, server_root)
    server = serve("--anonymous", "write")
    cli("clone", "--checkout", "none", f"{server.url}/game", "a", cwd=tmp_path)
    a = tmp_path / "a"
    new = binary(400_000, seed=22)
    write_files(a, {"new.bin": new})
    cli("add", "new.bin", cwd=a)
    cli("commit", "-m", "not pushed", cwd=a)
    assert oid(new) not in pool(central)
    cli("clone", "--checkout", "none", str(a), "b", cwd=tmp_path)
    assert oid(new) in pool(central)
    assert pool(tmp_path / "b") == set()
    assert "passed" in cli("bam", "check", cwd=tmp_path / "b")


def test_push_to_a_repo_with_another_server_fills_both_servers(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    server = serve("--anonymous", "write")
    mirror = server_root / "mirror"
    cli("clone", "-B", ".", "--checkout", "none", f"{server.url}/game", str(mirror), cwd=tmp_path)
    cli("clone", "--checkout", "none", f"{server.url}/game", "x", cwd=tmp_path)
    cli("clone", "--checkout", "none", f"{server.url}/mirror", "y", cwd=tmp_path)
    x, y = tmp_path / "x", tmp_path / "y"
    new = binary(300_000, seed=23)
    write_files(x, {"n.bin": new})
    cli("add", "n.bin", cwd=x)
    cli("commit", "-m", "n", cwd=x)
    cli("push", str(y), cwd=x)
    assert oid(new) in pool(central)  # the sender's server, before the csets left
    assert oid(new) in pool(mirror)  # the target's server
    assert oid(new) not in pool(y)  # the target itself keeps its data at its server
    assert "passed" in cli("bam", "check", cwd=y)


def test_anonymous_users_read_but_cannot_push_by_default(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    server = serve()  # no --anonymous: read
    cli("clone", f"{server.url}/game", "c", cwd=tmp_path)
    c = tmp_path / "c"
    (c / "src" / "main.c").write_text("changed\n")
    cli("commit", "-m", "x", cwd=c)
    p = cli.run("push", cwd=c, ok=False)
    assert p.stderr.count("\n") == 1 and "write access" in p.stderr and "BKR_TOKEN" in p.stderr
    assert keys(cli, central) != keys(cli, c)


@both_backends
def test_same_server_two_urls_moves_no_data(
    cli: CLI, tmp_path: Path, server_root: Path, serve, backend
) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    server = serve("--anonymous", "write")
    cli("clone", "--checkout", "none", f"{server.url}/game", "a", cwd=tmp_path)
    cli("clone", "--checkout", "none", f"http://localhost:{server.port}/game", "b", cwd=tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    new = binary(1 << 20, seed=21)
    write_files(a, {"new.bin": new})
    cli("add", "new.bin", cwd=a)
    cli("commit", "-m", "new", cwd=a)
    cli("push", cwd=a)
    assert oid(new) in backend.objects(central)  # the server got it on the way out
    cli("pull", str(a), cwd=b)  # same server, other URL: no BAM data moves
    assert pool(b) == set()
    assert "passed" in cli("bam", "check", cwd=b)
    cli("get", "new.bin", cwd=b)
    assert (b / "new.bin").read_bytes() == new


@both_backends
def test_push_sends_only_committed_data(
    cli: CLI, tmp_path: Path, server_root: Path, serve, backend
) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    server = serve("--anonymous", "write")
    cli("clone", "--checkout", "none", f"{server.url}/game", "a", cwd=tmp_path)
    a = tmp_path / "a"
    undone, kept = binary(300_000, seed=31), binary(300_000, seed=32)
    write_files(a, {"x.bin": undone})
    cli("add", "x.bin", cwd=a)
    cli("commit", "-m", "x", cwd=a)
    cli("undo", "-r", "+", cwd=a)
    assert oid(undone) in pool(a)
    write_files(a, {"y.bin": kept})
    cli("add", "y.bin", cwd=a)
    cli("commit", "-m", "y", cwd=a)
    write_files(a, {"z.bin": binary(300_000, seed=33)})
    cli("add", "z.bin", cwd=a)  # added, not committed
    cli("push", cwd=a)
    assert oid(kept) in backend.objects(central)
    assert oid(undone) not in backend.objects(central)
    assert keys(cli, a) == keys(cli, central)


@both_backends
def test_pull_between_different_servers_fills_the_receiving_server(
    cli: CLI, tmp_path: Path, server_root: Path, serve, backend
) -> None:  # type: ignore[no-untyped-def]
    make_central(cli, server_root)
    server = serve("--anonymous", "write")
    cli(
        "clone",
        "-B",
        ".",
        "--checkout",
        "none",
        f"{server.url}/game",
        str(server_root / "mirror"),
        cwd=tmp_path,
    )
    mirror = server_root / "mirror"
    cli("clone", "--checkout", "none", f"{server.url}/game", "x", cwd=tmp_path)
    cli("clone", "--checkout", "none", f"{server.url}/mirror", "y", cwd=tmp_path)
    x, y = tmp_path / "x", tmp_path / "y"
    new = binary(500_000, seed=41)
    write_files(x, {"n.bin": new})
    cli("add", "n.bin", cwd=x)
    cli("commit", "-m", "n", cwd=x)
    cli("pull", str(x), cwd=y)
    assert oid(new) in backend.objects(mirror)  # y's server holds what y's history needs
    assert oid(new) in backend.objects(server_root / "game")  # x's got it before it left x
    assert "passed" in cli("bam", "check", cwd=y)


def test_http_pull_merge_conflict_and_push_rules(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = make_central(cli, server_root)
    server = serve("--anonymous", "write")
    url = f"{server.url}/game"
    cli("clone", url, "a", cwd=tmp_path)
    cli("clone", url, "b", cwd=tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "src" / "main.c").write_text("int main(void);\n")
    cli("commit", "-m", "a", cwd=a)
    cli("push", cwd=a)
    assert (central / "src" / "main.c").read_text() == "int main(void);\n"  # target tree updated
    (b / "src" / "main.c").write_text("int main(int argc);\n")
    cli("commit", "-m", "b", cwd=b)
    p = cli.run("push", cwd=b, ok=False)
    assert "pull first" in p.stderr
    before = keys(cli, b)
    p = cli.run("pull", cwd=b, ok=False)
    assert "conflict" in p.stderr and "src/main.c" in p.stderr
    assert keys(cli, b) == before and (b / "src" / "main.c").read_text() == "int main(int argc);\n"
    cli("pull", "--theirs", cwd=b)
    assert (b / "src" / "main.c").read_text() == "int main(void);\n"
    # a target with uncommitted changes to a file the push touches refuses, changing nothing
    (central / "src" / "main.c").write_text("local edit\n")
    (b / "src" / "main.c").write_text("int main(char);\n")
    cli("commit", "-m", "b2", cwd=b)
    p = cli.run("push", cwd=b, ok=False)
    assert "uncommitted" in p.stderr and "src/main.c" in p.stderr
    assert (central / "src" / "main.c").read_text() == "local edit\n"


def test_different_projects_refused_over_http(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    make_central(cli, server_root)
    server = serve("--anonymous", "write")
    other = tmp_path / "other"
    cli("init", str(other), cwd=tmp_path)
    write_files(other, {"f.txt": b"x\n"})
    cli("add", ".", cwd=other)
    cli("commit", "-m", "x", cwd=other)
    for args in (("pull", f"{server.url}/game"), ("push", f"{server.url}/game")):
        p = cli.run(*args, cwd=other, ok=False)
        assert "different project" in p.stderr and p.stderr.count("\n") == 1


@pytest.mark.parametrize("cmd", ["clone", "pull"])
def test_server_down_gives_a_clear_error_and_changes_nothing(
    cli: CLI, tmp_path: Path, server_root: Path, serve, cmd: str
) -> None:  # type: ignore[no-untyped-def]
    make_central(cli, server_root)
    server = serve()
    url = f"{server.url}/game"
    cli("clone", url, "a", cwd=tmp_path)
    before = keys(cli, tmp_path / "a")
    server.stop()
    if cmd == "clone":
        p = cli.run("clone", url, "c", cwd=tmp_path, ok=False)
        assert not (tmp_path / "c").exists()
    else:
        p = cli.run("pull", cwd=tmp_path / "a", ok=False)
        assert keys(cli, tmp_path / "a") == before
    assert "cannot reach" in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_https_clone_push_and_bam_objects(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    """bkr serve with --tls-cert/--tls-key: history (httpx) and BAM objects (the threaded
    client) both over TLS, trusting a CA named by SSL_CERT_FILE; an untrusted certificate is
    a one-line error."""
    import trustme

    central = make_central(cli, server_root)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_file = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(ca_file))
    server = serve("--anonymous", "write", "--tls-cert", str(chain), "--tls-key", str(key))
    assert server.url.startswith("https://127.0.0.1:")
    url = f"{server.url}/game"
    p = cli.run("clone", url, "untrusted", cwd=tmp_path, ok=False)
    assert "certificate" in p.stderr.lower() and p.stderr.count("\n") == 1
    assert not (tmp_path / "untrusted").exists()
    trust = {"SSL_CERT_FILE": str(ca_file)}
    cli("clone", url, "c", cwd=tmp_path, env=trust)
    c = tmp_path / "c"
    assert (c / "tex.bin").read_bytes() == TEX2 and oid(TEX2) in pool(c)
    assert cli("bam", "server", "-l", cwd=c).strip() == url
    new = binary(600_000, seed=24)
    write_files(c, {"new.bin": new})
    cli("add", "new.bin", cwd=c)
    cli("commit", "-m", "over tls", cwd=c)
    cli("push", cwd=c, env=trust)
    assert pool_path(central, oid(new)).read_bytes() == new
    store = server_root / "store"
    cli("init", str(store), cwd=server_root)
    cli("bam", "push", f"{server.url}/store", cwd=c, env=trust)  # PUTs over TLS
    assert pool_path(store, oid(new)).read_bytes() == new


def test_a_repo_name_with_a_space_over_http(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    """History (httpx) and BAM objects (http.client, which refuses a raw space in a request
    line) both reach 'my game', whether the URL has the space or %20."""
    central = make_central(cli, server_root, "my game")
    server = serve("--anonymous", "write")
    for n, url in enumerate((f"{server.url}/my game", f"{server.url}/my%20game")):
        cli("clone", url, f"c{n}", cwd=tmp_path)
        assert (tmp_path / f"c{n}" / "tex.bin").read_bytes() == TEX2
    c = tmp_path / "c0"
    new = binary(200_000, seed=25)
    write_files(c, {"new.bin": new})
    cli("add", "new.bin", cwd=c)
    cli("commit", "-m", "new", cwd=c)
    cli("push", cwd=c)
    assert pool_path(central, oid(new)).read_bytes() == new
