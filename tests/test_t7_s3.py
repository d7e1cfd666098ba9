"""The S3 back end of ``bkr serve`` against the real Swift store: settings and their errors,
the bucket created on demand, pushes that leave no BAM data under ROOT, one sync server
with two stateless object servers on one bucket, concurrent uploads of one object, and
presigned downloads in the Git LFS Batch API."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from backends import S3Backend
from bamhelp import binary, oid, pool
from conftest import CLI, write_files
from servers import Server
from swiftstore import Swift


@pytest.fixture
def s3(swift: Swift, tmp_path: Path) -> S3Backend:
    return S3Backend(swift, tmp_path)


@pytest.fixture
def servers():  # type: ignore[no-untyped-def]
    started: list[Server] = []

    def start(root: Path, *args: str) -> Server:
        s = Server(root, *args).start()
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[storage\n", "not valid TOML"),
        ('[storage]\nbackend = "ftp"\n', "must be 'filesystem' or 's3'"),
        ('[storage]\nbackend = "s3"\n', "storage.bucket is required"),
        ('[storage]\nbackend = "s3"\nbucket = "B_!"\n', "not a valid bucket name"),
        ('[storage]\nbackend = "s3"\nbucket = "bam"\nbukcet = "x"\n', "unknown key storage.bukcet"),
        ('[storage]\nbackend = "s3"\nbucket = "bam"\n', "no S3 credentials"),
        ('[storage]\nprefix = "x"\n', "only for backend = 's3'"),
        ("[server]\nobjects_only = true\n", "needs [storage] backend = 's3'"),
        ("[cluster]\n", "unknown section [cluster]"),
    ],
)
def test_bad_settings_are_one_line_errors(cli: CLI, tmp_path: Path, text: str, why: str) -> None:
    conf = tmp_path / "serve.toml"
    conf.write_text(text)
    (tmp_path / "root").mkdir()
    p = cli.run("serve", str(tmp_path / "root"), "--config", str(conf), cwd=tmp_path, ok=False)
    assert p.returncode == 2
    assert p.stderr.startswith(f"bkr: serve: {conf}: ") and why in p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_an_unreachable_store_or_bad_credentials_stop_the_start(
    cli: CLI, tmp_path: Path, s3: S3Backend
) -> None:
    (tmp_path / "root").mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text(s3.toml().replace('secret_access_key = "testing"', 'secret_access_key = "no"'))
    p = cli.run("serve", str(tmp_path / "root"), "--config", str(bad), cwd=tmp_path, ok=False)
    assert p.returncode == 1 and "access denied" in p.stderr and p.stderr.count("\n") == 1
    port = s3.swift.port
    down = tmp_path / "down.toml"
    down.write_text(s3.toml().replace(f"127.0.0.1:{port}", "127.0.0.1:9"))
    p = cli.run("serve", str(tmp_path / "root"), "--config", str(down), cwd=tmp_path, ok=False)
    assert p.returncode == 1 and "cannot reach" in p.stderr and p.stderr.count("\n") == 1


def test_credentials_from_the_environment_and_the_bucket_is_created(
    cli: CLI, tmp_path: Path, server_root: Path, s3: S3Backend, servers
) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "env.toml"
    conf.write_text(
        "\n".join(
            line for line in s3.toml().splitlines() if not line.startswith(("access", "secret"))
        )
    )
    env = {"AWS_ACCESS_KEY_ID": "test:tester", "AWS_SECRET_ACCESS_KEY": "testing"}
    cli("init", str(server_root / "game"), cwd=server_root)
    assert s3.bucket not in {b["Name"] for b in s3.s3.list_buckets()["Buckets"]}
    server = Server(server_root, "--config", str(conf), "--anonymous", "write", env=env).start()
    try:
        assert s3.bucket in {b["Name"] for b in s3.s3.list_buckets()["Buckets"]}
        data = binary(70_000, seed=5)
        assert httpx.put(f"{server.url}/game/bam/{oid(data)}", content=data).status_code == 201
        assert s3.objects() == {oid(data)}
        r = httpx.put(f"{server.url}/nothing/bam/{oid(data)}", content=data)
        assert r.status_code == 404  # a sync server answers for its repositories only
    finally:
        server.stop()


def test_a_push_leaves_bam_data_only_in_the_bucket(
    cli: CLI, tmp_path: Path, server_root: Path, s3: S3Backend, servers
) -> None:  # type: ignore[no-untyped-def]
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    cli("clone", "--checkout", "none", str(central), str(server_root / "bare"), cwd=tmp_path)
    server = servers(server_root, "--anonymous", "write", *s3.serve_args())
    # a client without a BAM server sends the data in the push stream itself
    cli("clone", "-B", "none", f"{server.url}/game", "work", cwd=tmp_path)
    work = tmp_path / "work"
    art, tex = binary(300_000, seed=61), binary((9 << 20) + 5, seed=62)  # one PUT; multipart
    write_files(work, {"art.bin": art, "tex.bin": tex})
    cli("add", ".", cwd=work)
    cli("commit", "-m", "art", cwd=work)
    cli("push", cwd=work)
    assert {oid(art), oid(tex)} <= s3.objects()
    assert pool(central) == set()  # the working tree got its files; the pool keeps nothing
    assert (central / "tex.bin").read_bytes() == tex
    assert s3.leftovers() == []
    # a repo that is its own BAM server
    cli("bam", "server", ".", cwd=server_root / "bare")
    cli("clone", "--checkout", "none", f"{server.url}/bare", "c2", cwd=tmp_path)
    c2 = tmp_path / "c2"
    mesh = binary(200_000, seed=63)
    write_files(c2, {"mesh.bin": mesh})
    cli("add", ".", cwd=c2)
    cli("commit", "-m", "mesh", cwd=c2)
    cli("push", cwd=c2)
    assert oid(mesh) in s3.objects()
    assert pool(server_root / "bare") == set()
    cli("clone", f"{server.url}/bare", "c3", cwd=tmp_path)
    assert (tmp_path / "c3" / "mesh.bin").read_bytes() == mesh


def test_one_sync_server_and_two_object_servers_on_one_bucket(
    cli: CLI, tmp_path: Path, server_root: Path, s3: S3Backend, servers
) -> None:  # type: ignore[no-untyped-def]
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    cli("bam", "server", ".", cwd=central)
    (tmp_path / "empty").mkdir()
    objects_conf = tmp_path / "objects.toml"
    objects_conf.write_text(s3.toml() + "\n[server]\nobjects_only = true\n")
    a = servers(tmp_path / "empty", "--anonymous", "write", "--config", str(objects_conf))
    b = servers(tmp_path / "empty", "--anonymous", "write", "--config", str(objects_conf))
    sync_conf = tmp_path / "sync.toml"
    sync_conf.write_text(s3.toml() + f'\n[server]\nobjects_url = "{a.url}"\n')
    sync = servers(server_root, "--anonymous", "write", "--config", str(sync_conf))

    # clones name the object tier as their BAM server: the data goes there, history to sync
    cli("clone", "--checkout", "none", f"{sync.url}/game", "w1", cwd=tmp_path)
    w1 = tmp_path / "w1"
    assert cli("bam", "server", "-l", cwd=w1).strip() == f"{a.url}/game"
    big, small = binary((9 << 20) + 1, seed=71), binary(100_000, seed=72)
    write_files(w1, {"big.bin": big, "small.bin": small})
    cli("add", ".", cwd=w1)
    cli("commit", "-m", "assets", cwd=w1)
    cli("push", cwd=w1)
    assert {oid(big), oid(small)} <= s3.objects()
    assert pool(central) == set()

    # what went in through A is read through B, whole and by range
    with httpx.Client(timeout=60) as c:
        r = c.get(f"{b.url}/game/bam/{oid(big)}")
        assert r.status_code == 200 and r.content == big
        r = c.get(f"{b.url}/game/bam/{oid(big)}", headers={"Range": "bytes=8388600-8388700"})
        assert r.status_code == 206 and r.content == big[8388600:8388701]
        info = c.get(f"{b.url}/game/info").json()
        assert info["repo_id"] == c.get(f"{a.url}/game/info").json()["repo_id"]
        assert info["objects_only"] is True
        r = c.post(f"{b.url}/game/sync/fetch", json={})
        assert r.status_code == 404 and "sync server" in r.json()["error"]

    # a second clone reads through B (the same store, so no data moves on pull)
    cli("clone", "--checkout", "none", f"{sync.url}/game", "w2", cwd=tmp_path)
    w2 = tmp_path / "w2"
    cli("bam", "server", f"{b.url}/game", cwd=w2)
    cli("get", "big.bin", "small.bin", cwd=w2)
    assert (w2 / "big.bin").read_bytes() == big and (w2 / "small.bin").read_bytes() == small
    (w1 / "notes.txt").write_text("text\n")
    cli("add", "notes.txt", cwd=w1)
    cli("commit", "-m", "notes", cwd=w1)
    cli("push", cwd=w1)
    cli("pull", cwd=w2)
    assert pool(w2) == {oid(big), oid(small)}  # what `get` brought; the pull moved no data

    # concurrent uploads of one object through both servers are safe
    same = binary((17 << 20) + 9, seed=73)
    results: list[int] = []

    def upload(url: str) -> None:
        r = httpx.put(f"{url}/game/bam/{oid(same)}", content=same, timeout=120)
        results.append(r.status_code)

    threads = [threading.Thread(target=upload, args=(u,)) for u in (a.url, b.url) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[-1] == 201 and set(results) <= {200, 201}
    for url in (a.url, b.url):
        assert httpx.get(f"{url}/game/bam/{oid(same)}", timeout=60).content == same
    assert s3.leftovers() == []


def test_lfs_batch_hands_out_presigned_store_urls(
    cli: CLI, tmp_path: Path, server_root: Path, s3: S3Backend, servers
) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "presign.toml"
    conf.write_text(s3.toml(presign_downloads=600))
    repo = server_root / "game"
    cli("init", str(repo), cwd=server_root)
    server = servers(server_root, "--anonymous", "write", "--config", str(conf))
    data = binary(150_000, seed=81)
    assert httpx.put(f"{server.url}/game/bam/{oid(data)}", content=data).status_code == 201
    body = {
        "operation": "download",
        "objects": [{"oid": oid(data), "size": len(data)}, {"oid": "0" * 64, "size": 1}],
    }
    r = httpx.post(f"{server.url}/game/info/lfs/objects/batch", json=body)
    found, missing = r.json()["objects"]
    href = found["actions"]["download"]["href"]
    assert href.startswith(s3.swift.endpoint) and "Signature" in href
    assert httpx.get(href).content == data  # straight from the store, no token
    assert missing["error"]["code"] == 404
    up = {"operation": "upload", "objects": [{"oid": "1" * 64, "size": 5}]}
    r = httpx.post(f"{server.url}/game/info/lfs/objects/batch", json=up)
    assert r.json()["objects"][0]["actions"]["upload"]["href"].startswith(server.url)


def test_a_server_killed_mid_upload_leaves_no_object_visible(
    cli: CLI, tmp_path: Path, server_root: Path, s3: S3Backend
) -> None:
    cli("init", str(server_root / "game"), cwd=server_root)
    data = binary((20 << 20) + 11, seed=95)
    server = Server(server_root, "--anonymous", "write", *s3.serve_args()).start()
    sent = threading.Event()

    def slow_body():  # type: ignore[no-untyped-def]
        for i in range(0, len(data), 1 << 20):
            if i >= (12 << 20):
                sent.set()  # a part or more is in the store by now
                time.sleep(0.2)
            yield data[i : i + (1 << 20)]

    def upload() -> None:
        try:
            httpx.put(f"{server.url}/game/bam/{oid(data)}", content=slow_body(), timeout=60)
        except httpx.HTTPError:
            pass  # the server died under it

    t = threading.Thread(target=upload)
    t.start()
    try:
        assert sent.wait(30)
        time.sleep(0.5)
        server.kill()
    finally:
        t.join(60)
        server.stop()
    assert oid(data) not in s3.objects()  # an unfinished multipart upload is invisible
    again = Server(server_root, "--anonymous", "write", *s3.serve_args()).start()
    try:
        url = f"{again.url}/game/bam/{oid(data)}"
        assert httpx.head(url).status_code == 404
        assert httpx.put(url, content=data, timeout=60).status_code == 201
        assert httpx.get(url, timeout=60).content == data
    finally:
        again.stop()
