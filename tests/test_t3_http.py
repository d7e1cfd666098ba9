"""The HTTP object API of ``bkr serve``: Range, ETag, caching headers, verified PUT, access
control, and malformed requests — against the real server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

import httpx
import pytest
from backends import both_backends
from bamhelp import binary, oid, pool, pool_path
from conftest import CLI, proc_environ, write_files


@pytest.fixture
def served(cli: CLI, server_root: Path, serve):  # type: ignore[no-untyped-def]
    repo = server_root / "game"
    cli("init", str(repo), cwd=server_root)
    data = binary(3 << 20, seed=1)
    write_files(repo, {"tex.bin": data, "readme.txt": b"hello\n"})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "assets", cwd=repo)
    server = serve("--anonymous", "write")
    return server, repo, data


@both_backends
def test_get_range_etag_and_caching_headers(served) -> None:  # type: ignore[no-untyped-def]
    server, _repo, data = served
    url = f"{server.url}/game/bam/{oid(data)}"
    with httpx.Client() as c:
        r = c.get(url)
        assert r.status_code == 200 and r.content == data
        assert r.headers["etag"] == f'"{oid(data)}"'
        cc = r.headers["cache-control"]
        assert "immutable" in cc and "public" in cc and "max-age=" in cc
        assert r.headers["accept-ranges"] == "bytes"
        r = c.get(url, headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206 and r.content == data[1000:2000]
        assert r.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        r = c.get(url, headers={"Range": "bytes=-10"})
        assert r.status_code == 206 and r.content == data[-10:]
        r = c.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
        assert r.content == data[-5:]
        assert c.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        h = c.head(url)
        assert (
            h.status_code == 200 and int(h.headers["content-length"]) == len(data) and not h.content
        )
        assert c.get(url, headers={"If-None-Match": f'"{oid(data)}"'}).status_code == 304


def test_files_kept_open_never_serve_a_removed_or_replaced_object(served) -> None:  # type: ignore[no-untyped-def]
    """The filesystem back end keeps recently served pool files open between requests; an
    object removed from the pool is gone at once, and one replaced (a damaged copy repaired
    with a new file) is served from the new file."""
    server, repo, data = served
    url = f"{server.url}/game/bam/{oid(data)}"
    path = pool_path(repo, oid(data))
    with httpx.Client() as c:
        assert c.get(url, headers={"Range": "bytes=0-99"}).content == data[:100]
        keep = path.read_bytes()
        path.unlink()
        assert c.get(url, headers={"Range": "bytes=0-99"}).status_code == 404
        replacement = path.with_name("replacement")
        replacement.write_bytes(b"X" * 100 + keep[100:])
        replacement.rename(path)
        r = c.get(url, headers={"Range": "bytes=0-199"})
        assert r.status_code == 206 and r.content == b"X" * 100 + data[100:200]


@both_backends
@pytest.mark.parametrize("size", [200_000, (17 << 20) + 3])  # one PUT; a multipart upload (S3)
def test_put_is_verified_before_it_becomes_visible(served, backend, size: int) -> None:  # type: ignore[no-untyped-def]
    server, repo, _data = served
    good = binary(size, seed=7)
    url = f"{server.url}/game/bam/{oid(good)}"
    with httpx.Client(timeout=60) as c:
        bad = c.put(url, content=good[:-1] + b"x")
        assert bad.status_code == 422 and oid(good) in bad.json()["error"]
        assert oid(good) not in backend.objects(repo)
        assert c.head(url).status_code == 404
        assert backend.leftovers(repo) == []  # no temp file, no unfinished multipart upload
        ok = c.put(url, content=good)
        assert ok.status_code == 201
        assert backend.read(repo, oid(good)) == good
        assert c.get(url).content == good
        again = c.put(url, content=good)
        assert again.status_code == 200
        missing = c.post(f"{server.url}/game/bam/missing", json={"oids": [oid(good), "0" * 64]})
        assert missing.json() == {"missing": ["0" * 64]}


def test_a_partial_put_never_becomes_visible(served) -> None:  # type: ignore[no-untyped-def]
    """The client goes away after sending half the body it announced: nothing is installed
    and the temp file goes; the server keeps serving."""
    import socket
    import time

    server, repo, _data = served
    body = binary(3 << 20, seed=8)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            f"PUT /game/bam/{oid(body)} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        deadline = time.monotonic() + 10
        while not list((repo / ".bk" / "bam" / "tmp").glob("*")):  # the upload has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while list((repo / ".bk" / "bam" / "tmp").glob("*")):
        assert time.monotonic() < deadline, "the partial upload's temp file stayed"
        time.sleep(0.01)
    assert oid(body) not in pool(repo)
    assert httpx.head(f"{server.url}/game/bam/{oid(body)}").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/game/bam/XYZ", 400),
        ("GET", "/game/bam/" + "A" * 64, 400),
        ("GET", "/game/bam/" + "0" * 64, 404),
        ("GET", "/game/../game/info", 400),
        ("GET", "/nosuchrepo/info", 404),
        ("GET", "/game/.bk/db/data.mdb", 400),
        ("GET", "/game/nothing", 404),
        ("DELETE", "/game/bam/" + "0" * 64, 405),
    ],
)
def test_bad_requests_get_4xx(served, method: str, path: str, status: int) -> None:  # type: ignore[no-untyped-def]
    server, _repo, _data = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # sends paths as-is
    try:
        conn.request(method, path)
        r = conn.getresponse()
        body = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == status
    assert "error" in body


def test_malformed_bodies_and_limits(served) -> None:  # type: ignore[no-untyped-def]
    server, _repo, _data = served
    with httpx.Client() as c:
        assert c.post(f"{server.url}/game/sync/known", content=b"{not json").status_code == 400
        assert c.post(f"{server.url}/game/sync/known", json={"keys": ["zz"]}).status_code == 400
        assert c.post(f"{server.url}/game/sync/resolve", json={"rev": "nope"}).status_code == 404
        big = c.post(f"{server.url}/game/sync/known", content=b" " * (65 << 20))
        assert big.status_code == 413
        # the server is still fine
        assert c.get(f"{server.url}/game/info").status_code == 200


OID0 = "0" * 64
WRONG_SHAPES = [
    ("bam/missing", {"oids": [1]}, 400),
    ("bam/missing", {"oids": [None]}, 400),
    ("bam/missing", {"oids": [["a"]]}, 400),
    ("bam/missing", {"oids": "abc"}, 400),
    ("bam/missing", [OID0], 400),
    ("bam/batch", {"oids": [7], "max_size": 10}, 400),
    ("sync/fetch", {"want": 5}, 400),
    ("sync/fetch", {"want": OID0}, 404),
    ("sync/fetch", {"have_tags": [1]}, 400),
    ("sync/known", {"keys": "x"}, 400),
    ("sync/resolve", {"rev": ["+"]}, 400),
    ("info/lfs/objects/batch", {"operation": "download", "objects": 5}, 422),
    ("info/lfs/objects/batch", {"operation": "upload", "transfers": 5}, 422),
    ("info/lfs/objects/batch", {"operation": "download", "transfers": ["tus"]}, 422),
    ("info/lfs/objects/batch", {"operation": "delete"}, 422),
]


def test_json_of_the_wrong_shape_gets_4xx(served) -> None:  # type: ignore[no-untyped-def]
    """Valid JSON holding the wrong types (numbers for ids, a dict for a list, ...) is the
    client's mistake: a 4xx with a reason, never a 500, and nothing in the server log."""
    server, _repo, _data = served
    with httpx.Client() as c:
        for path, body, status in WRONG_SHAPES:
            r = c.post(f"{server.url}/game/{path}", json=body)
            assert (r.status_code, path, body) == (status, path, body), r.text
            assert r.json()["error"]
    assert "Traceback" not in server.log.read_text()


def test_lfs_batch_flags_bad_objects_one_by_one(served) -> None:  # type: ignore[no-untyped-def]
    server, _repo, data = served
    objects = [
        {"oid": 5, "size": 1},
        {"oid": oid(data), "size": "big"},
        "not an object",
        {"oid": oid(data), "size": len(data)},
    ]
    r = httpx.post(
        f"{server.url}/game/info/lfs/objects/batch",
        json={"operation": "download", "objects": objects},
    )
    assert r.status_code == 200
    got = r.json()["objects"]
    assert [o.get("error", {}).get("code") for o in got] == [422, 422, 422, None]
    assert got[3]["actions"]["download"]["href"].endswith(oid(data))


def test_paths_never_escape_root(cli: CLI, tmp_path: Path, server_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    cli("init", str(outside), cwd=tmp_path)
    (server_root / "link").symlink_to(outside)
    server = serve()
    with httpx.Client() as c:
        assert c.get(f"{server.url}/link/info").status_code == 404
        assert c.get(f"{server.url}/%2e%2e/outside/info").status_code in (400, 404)


def test_repositories_are_found_as_they_appear(cli: CLI, server_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """The server remembers where each repository it found lives (a BAM read no longer
    resolves the path again), but not that a path had none: one made later is served."""
    server = serve()
    with httpx.Client() as c:
        assert c.get(f"{server.url}/later/info").status_code == 404
        cli("init", str(server_root / "later"), cwd=server_root)
        for _ in range(2):
            r = c.get(f"{server.url}/later/info")
            assert r.status_code == 200 and r.json()["tip"] is None
        assert c.get(f"{server.url}/later/deeper/info").status_code == 404


def _tokens(tmp_path: Path) -> Path:
    f = tmp_path / "tokens"
    f.write_text("# team tokens\nreader-token read\nwriter-token write\n")
    return f


def test_access_rights(tmp_path: Path, served_private) -> None:  # type: ignore[no-untyped-def]
    server, data = served_private
    url = f"{server.url}/game/bam/{oid(data)}"
    with httpx.Client() as c:
        r = c.get(url)
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert c.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert c.get(url, headers={"Authorization": "Bearer reader-token"}).status_code == 200
        up = binary(1000, seed=3)
        r = c.put(
            f"{server.url}/game/bam/{oid(up)}",
            content=up,
            headers={"Authorization": "Bearer reader-token"},
        )
        assert r.status_code == 403 and "write" in r.json()["error"]
        r = c.put(
            f"{server.url}/game/bam/{oid(up)}",
            content=up,
            headers={"Authorization": "Bearer writer-token"},
        )
        assert r.status_code == 201


@pytest.fixture
def served_private(cli: CLI, tmp_path: Path, server_root: Path, serve):  # type: ignore[no-untyped-def]
    repo = server_root / "game"
    cli("init", str(repo), cwd=server_root)
    data = binary(100_000, seed=2)
    write_files(repo, {"a.bin": data})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "a", cwd=repo)
    server = serve("--token-file", str(_tokens(tmp_path)), "--anonymous", "none")
    return server, data


def test_cli_sends_tokens_and_names_the_missing_right(
    cli: CLI, tmp_path: Path, served_private
) -> None:  # type: ignore[no-untyped-def]
    server, _data = served_private
    p = cli.run("clone", f"{server.url}/game", "c0", cwd=tmp_path, ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "refused" in p.stderr and "BKR_TOKEN" in p.stderr and "Traceback" not in p.stderr
    cli("clone", f"{server.url}/game", "c1", cwd=tmp_path, env={"BKR_TOKEN": "reader-token"})
    c1 = tmp_path / "c1"
    (c1 / "new.txt").write_text("x\n")
    cli("add", "new.txt", cwd=c1)
    cli("commit", "-m", "x", cwd=c1)
    p = cli.run("push", cwd=c1, env={"BKR_TOKEN": "reader-token"}, ok=False)
    assert "write access" in p.stderr and p.stderr.count("\n") == 1
    # a per-URL credentials file works too
    creds = tmp_path / "home" / ".config" / "bkr" / "credentials"
    creds.parent.mkdir(parents=True)
    creds.write_text(f"http://nowhere.invalid other\n{server.url}/ writer-token\n")
    cli("push", cwd=c1)
    assert hashlib.sha256(b"x\n").hexdigest()  # sanity
    assert "new.txt" in cli("log", "-v", cwd=c1)


def peak_rss(pid: int) -> int:
    """A running process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# Measures one command: a fresh small process forks it and reports wait4's ru_maxrss. Done
# from the test process itself, the number would include the test process's own memory (a
# forked child is charged its parent's peak until it execs).
MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))
"""


def run_measured(cli: CLI, *args: str, cwd: Path) -> int:
    """Run bkr to the end; its peak resident set in bytes."""
    import subprocess
    import sys

    from conftest import BKR

    p = subprocess.run(
        [sys.executable, "-c", MEASURE, *BKR, *args],
        cwd=cwd,
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    peak, code = p.stdout.split()[-2:]
    assert code == "0", p.stderr
    return int(peak)


@pytest.mark.slow
def test_memory_stays_flat_whatever_the_object_size(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    """A 128 MiB object downloaded (GET), uploaded (PUT) and pushed inside a sync stream:
    neither the server nor the client grows by anything near the object's size."""
    size = 128 << 20
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    cli("bam", "server", ".", cwd=central)
    cli("init", str(server_root / "store"), cwd=server_root)
    cli("bam", "server", ".", cwd=server_root / "store")
    with open(central / "huge.bin", "wb") as f:
        f.write(b"\0head")
        f.truncate(size)
    cli("add", "huge.bin", cwd=central)
    cli("commit", "-m", "huge", cwd=central)
    server = serve("--anonymous", "write")
    url = f"{server.url}/game"
    cli("clone", "--checkout", "none", url, "c", cwd=tmp_path)
    c = tmp_path / "c"
    assert httpx.get(f"{url}/info").status_code == 200  # warm: every code path loaded
    before = peak_rss(server.proc.pid)
    client = run_measured(cli, "get", "huge.bin", cwd=c)  # GET
    assert (c / "huge.bin").stat().st_size == size
    client = max(client, run_measured(cli, "bam", "push", f"{server.url}/store", cwd=c))  # PUT
    stored = server_root / "store" / ".bk" / "bam"
    assert [f.stat().st_size for f in stored.glob("??/*")] == [size]
    with open(c / "other.bin", "wb") as f:
        f.write(b"\0other")
        f.truncate(size)
    cli("add", "other.bin", cwd=c)
    cli("commit", "-m", "other", cwd=c)
    client = max(client, run_measured(cli, "push", cwd=c))  # BAM data in the sync stream
    assert (central / "other.bin").stat().st_size == size  # the push updated its tree too
    grew = peak_rss(server.proc.pid) - before
    assert grew < 48 << 20, f"the server grew by {grew >> 20} MiB"
    assert client < 120 << 20, f"a client peaked at {client >> 20} MiB"


def test_serve_errors_are_one_line(cli: CLI, tmp_path: Path, server_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    p = cli.run("serve", str(server_root), "--port", str(server.port), cwd=tmp_path, ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "cannot listen on" in p.stderr and "in use" in p.stderr
    bad = tmp_path / "tokens"
    bad.write_text("only-a-token\n")
    for args in (["--token-file", str(bad)], ["--tls-cert", str(bad)], ["--anonymous", "all"]):
        p = cli.run("serve", str(server_root), "--port", "0", *args, cwd=tmp_path, ok=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    p = cli.run("serve", str(tmp_path / "nowhere"), "--port", "0", cwd=tmp_path, ok=False)
    assert p.returncode == 2 and "no such directory" in p.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_serve_stops_gracefully_on_signals(server_root: Path, serve, sig: str) -> None:  # type: ignore[no-untyped-def]
    import signal

    server = serve()
    assert httpx.get(f"{server.url}/nothing/info").status_code == 404  # it answers
    server.proc.send_signal(getattr(signal, sig))
    assert server.proc.wait(20) == 0
    assert "Traceback" not in server.log.read_text()


def test_serve_keeps_its_heap_on_huge_pages(server_root: Path) -> None:
    """bkr serve restarts itself (same pid) with glibc asking for transparent huge pages,
    unless the kernel has them off or GLIBC_TUNABLES already says (=0 opts out); other
    tunables are kept."""
    from servers import Server

    from bkrepo.malloc import THP_ENABLED, huge_page_env

    huge = "[never]" not in THP_ENABLED.read_text()
    with Server(server_root) as s:
        s.start()
        assert s.proc is not None
        env = proc_environ(s.proc.pid)  # the restarted process's (glibc cuts GLIBC_TUNABLES at ':')
        assert httpx.get(f"{s.url}/nothing/info").status_code == 404  # it answers
    assert (env.get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1") is huge
    with Server(server_root, env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) as s:
        s.start()
        assert s.proc is not None
        env = proc_environ(s.proc.pid)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    if huge:
        got = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=8", "HOME": "/x"})
        assert got == {
            "GLIBC_TUNABLES": "glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1",
            "HOME": "/x",
        }


def test_a_restart_that_cannot_be_made_is_skipped(tmp_path: Path) -> None:
    """If the interpreter cannot be executed again, the command goes on as it is."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from bkrepo import malloc; sys.executable = '/nonexistent/python'; "
        "malloc.restart_on_huge_pages(); print('went on')"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout == "went on\n", p.stderr
