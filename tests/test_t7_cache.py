"""The HTTP cache tier: nginx with the shipped cache rules (deploy/) between clients and
``bkr serve``.  A second client's reads come from nginx, and reads keep working from the
cache while ``bkr serve`` is down."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from bamhelp import binary, oid
from conftest import CLI, write_files
from nginxhelp import Nginx

BIG = binary((9 << 20) + 77, seed=91)  # more than two 4 MiB slices; fetched alone (GET)
SMALL = binary(200_000, seed=92)  # small: asked for in bam/batch


@pytest.fixture
def cached(cli: CLI, tmp_path: Path, server_root: Path, serve):  # type: ignore[no-untyped-def]
    repo = server_root / "game"
    cli("init", str(repo), cwd=server_root)
    write_files(repo, {"big.bin": BIG, "small.bin": SMALL})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "assets", cwd=repo)
    cli("bam", "server", ".", cwd=repo)
    server = serve()
    nginx = Nginx(tmp_path / "nginx", server.port)
    try:
        yield server, nginx
    finally:
        nginx.stop()


def client(cli: CLI, tmp_path: Path, server_url: str, cache_url: str, name: str) -> Path:
    """A clone whose history comes from the server and whose BAM data comes via the cache."""
    cli("clone", "--checkout", "none", f"{server_url}/game", name, cwd=tmp_path)
    cli("bam", "server", f"{cache_url}/game", cwd=tmp_path / name)
    return tmp_path / name


def object_requests(nginx: Nginx, start: int) -> list[tuple[str, str, str, str]]:
    return [r for r in nginx.log_lines()[start:] if "/bam/" in r[1] and r[0] == "GET"]


def test_second_client_reads_from_the_cache_and_reads_survive_the_server(
    cli: CLI, tmp_path: Path, cached
) -> None:  # type: ignore[no-untyped-def]
    server, nginx = cached
    url = f"{nginx.url}/game/bam/{oid(BIG)}"
    a = client(cli, tmp_path, server.url, nginx.url, "a")
    cli("get", "big.bin", "small.bin", cwd=a)
    assert (a / "big.bin").read_bytes() == BIG and (a / "small.bin").read_bytes() == SMALL
    first = object_requests(nginx, 0)
    assert first and all(r[3] == "MISS" for r in first)

    mark = len(nginx.log_lines())
    b = client(cli, tmp_path, server.url, nginx.url, "b")
    c = client(cli, tmp_path, server.url, nginx.url, "c")  # cloned now, reads later
    cli("get", "big.bin", cwd=b)
    assert (b / "big.bin").read_bytes() == BIG
    second = object_requests(nginx, mark)
    assert second and all(r[2] == "200" and r[3] == "HIT" for r in second)
    with httpx.Client(timeout=30) as h:
        r = h.get(url, headers={"Range": "bytes=4194300-4194400"})  # across two slices
        assert r.status_code == 206 and r.content == BIG[4194300:4194401]
        assert r.headers["x-cache-status"] == "HIT" and r.headers["etag"] == f'"{oid(BIG)}"'
        assert "immutable" in r.headers["cache-control"]
        h.get(f"{nginx.url}/game/bam/{oid(SMALL)}").raise_for_status()  # now cached too

    server.stop()
    with httpx.Client(timeout=30) as h:
        with pytest.raises(httpx.ConnectError):
            h.get(f"{server.url}/game/info")  # bkr serve is down
        r = h.get(url)
        assert r.status_code == 200 and r.content == BIG and r.headers["x-cache-status"] == "HIT"
        r = h.get(url, headers={"Range": f"bytes={len(BIG) - 10}-"})
        assert r.status_code == 206 and r.content == BIG[-10:]
        missing = h.get(f"{nginx.url}/game/bam/{'0' * 64}")
        assert missing.status_code >= 500  # what the cache never saw needs the server
    # a client reads from the cache alone: info served stale, the batch turned into GETs
    cli("get", "big.bin", "small.bin", cwd=c)
    assert (c / "big.bin").read_bytes() == BIG and (c / "small.bin").read_bytes() == SMALL
