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
from bamhelp import binary, oid
from conftest import CLI, write_files


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


def test_paths_never_escape_root(cli: CLI, tmp_path: Path, server_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    cli("init", str(outside), cwd=tmp_path)
    (server_root / "link").symlink_to(outside)
    server = serve()
    with httpx.Client() as c:
        assert c.get(f"{server.url}/link/info").status_code == 404
        assert c.get(f"{server.url}/%2e%2e/outside/info").status_code in (400, 404)


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
