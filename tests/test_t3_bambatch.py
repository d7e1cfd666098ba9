"""Batched BAM downloads: the ``bam/batch`` endpoint of ``bkr serve``, and the client that
uses it (bamclient) — against the real server, and against a small stub server that cuts
answers short or lacks the endpoint."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from backends import both_backends
from bamhelp import binary, oid
from conftest import CLI, write_files

from bkrepo.bundle import BamRecord, read_stream
from bkrepo.errors import ObjectCorrupt, ObjectMissing
from bkrepo.ids import Oid
from bkrepo.pool import Pool
from bkrepo.transport import bamclient

SMALL = [binary(100_000 + i, seed=100 + i) for i in range(40)]
BIG = binary((3 << 20) + 12_345, seed=99)  # not a whole number of blocks


@pytest.fixture
def served(cli: CLI, server_root: Path, serve):  # type: ignore[no-untyped-def]
    repo = server_root / "game"
    cli("init", str(repo), cwd=server_root)
    files = {f"s/{i:02d}.bin": d for i, d in enumerate(SMALL)}
    write_files(repo, {**files, "big.bin": BIG})
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "assets", cwd=repo)
    return serve(), repo


def batch(url: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}/game/bam/batch", json=body)


def records(raw: bytes) -> list[tuple[str, bytes]]:
    out = []
    for rec in read_stream(io.BytesIO(raw)):
        assert isinstance(rec, BamRecord)
        out.append((rec.oid.hex(), rec.stream.read()))
    return out


@both_backends
def test_batch_sends_small_objects_in_the_order_asked(served) -> None:  # type: ignore[no-untyped-def]
    server, _repo = served
    missing = "ab" * 32
    asked = [oid(SMALL[3]), missing, oid(BIG), oid(SMALL[0])]
    r = batch(server.url, {"oids": asked, "max_size": 1 << 20})
    assert r.status_code == 200
    # present and small enough, in the order asked; the missing and the large one left out
    assert records(r.content) == [(oid(SMALL[3]), SMALL[3]), (oid(SMALL[0]), SMALL[0])]
    r = batch(server.url, {"oids": asked, "max_size": 4 << 20})
    assert [o for o, _ in records(r.content)] == [oid(SMALL[3]), oid(BIG), oid(SMALL[0])]
    assert records(batch(server.url, {"oids": asked, "max_size": 0}).content) == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"oids": ["nothex"]}, 400),
        ({"oids": "x"}, 400),
        ([1, 2], 400),
        ({"oids": [], "max_size": -1}, 400),
        ({"oids": ["ab" * 32] * 10_001}, 413),
    ],
)
def test_bad_batches_get_4xx(served, body: object, status: int) -> None:  # type: ignore[no-untyped-def]
    server, _repo = served
    assert batch(server.url, body).status_code == status


@both_backends
def test_client_batches_small_objects_and_fetches_large_ones_alone(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    server, _repo = served
    calls: list[tuple[str, str]] = []
    real = bamclient.Connection.request

    def counting(self, method: str, url: str, **kw):  # type: ignore[no-untyped-def]
        calls.append((method, url.rsplit("/", 1)[-1]))
        return real(self, method, url, **kw)

    monkeypatch.setattr(bamclient.Connection, "request", counting)
    dest = Pool(tmp_path / "pool")
    wanted = {Oid(bytes.fromhex(oid(d))) for d in [*SMALL, BIG]}
    bamclient.download(f"{server.url}/game", wanted, dest, what="test")
    assert set(dest.oids()) == wanted
    for o in wanted:
        assert dest.verify(o)
    posts = [c for c in calls if c[0] == "POST"]
    gets = [c for c in calls if c[0] == "GET"]
    per = -(-len(wanted) // bamclient.PARALLEL)
    assert len(posts) == -(-len(wanted) // per) and all(c[1] == "batch" for c in posts)
    assert gets == [("GET", oid(BIG))]  # only the large one alone
    assert not list((tmp_path / "pool" / "tmp").iterdir())


@both_backends
def test_a_corrupt_object_in_a_batch_is_never_installed(served, backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, repo = served
    bad = SMALL[5]
    backend.corrupt(repo, oid(bad), bad[:-1] + b"\1")
    dest = Pool(tmp_path / "pool")
    wanted = {Oid(bytes.fromhex(oid(d))) for d in SMALL}
    with pytest.raises(ObjectCorrupt, match=oid(bad)):
        bamclient.download(f"{server.url}/game", wanted, dest, what="test")
    assert Oid(bytes.fromhex(oid(bad))) not in set(dest.oids())
    assert not list((tmp_path / "pool" / "tmp").iterdir())


# -- a stub server: no batch endpoint, or answers cut short ----------------------------------
class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, objects: dict[str, bytes], *, batch: bool, cut: dict[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.objects = objects
        self.batch = batch
        self.cut = cut  # method -> how many answers to cut short (after half their body)
        self.log: list[tuple[str, str, str]] = []  # method, path, range
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/repo"

    def take_cut(self, method: str) -> bool:
        with self.lock:
            if self.cut.get(method, 0) > 0:
                self.cut[method] -= 1
                return True
            return False


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Stub

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        cut = status in (200, 206) and len(body) > 1000 and self.server.take_cut(self.command)
        self.send_response(status)
        for k, v in {**(headers or {}), "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_GET(self) -> None:
        rng = self.headers.get("Range") or ""
        self.server.log.append(("GET", self.path, rng))
        data = self.server.objects.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            self._send(404, b'{"error": "no such object"}')
        elif rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            cr = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, data[start:], {"Content-Range": cr})
        else:
            self._send(200, data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.log.append(("POST", self.path, ""))
        if not self.server.batch:
            self._send(404, b'{"error": "unknown endpoint"}')
            return
        out = bytearray(b"BKBUNDLE 1\n")
        for h in body["oids"]:
            data = self.server.objects.get(h)
            if data is not None and len(data) <= body["max_size"]:
                out += b"B" + bytes.fromhex(h) + len(data).to_bytes(8, "little") + data
        self._send(200, bytes(out + b"E"))


@pytest.fixture
def stub() -> Iterator[type[Stub]]:
    started: list[Stub] = []

    def start(**kw) -> Stub:  # type: ignore[no-untyped-def]
        s = Stub({hashlib.sha256(d).hexdigest(): d for d in [*SMALL[:10], BIG]}, **kw)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        started.append(s)
        return s

    yield start  # type: ignore[misc]
    for s in started:
        s.shutdown()
        s.server_close()


WANTED = {Oid(bytes.fromhex(oid(d))) for d in [*SMALL[:10], BIG]}


def test_a_server_without_batches_gets_objects_one_by_one(stub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = stub(batch=False, cut={})
    dest = Pool(tmp_path / "pool")
    bamclient.download(s.url, WANTED, dest, what="test")
    assert set(dest.oids()) == WANTED
    assert sum(1 for m, _p, _r in s.log if m == "GET") == len(WANTED)


def test_answers_cut_short_are_resumed(stub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = stub(batch=True, cut={"POST": 2, "GET": 2})
    dest = Pool(tmp_path / "pool")
    bamclient.download(s.url, WANTED, dest, what="test")
    assert set(dest.oids()) == WANTED
    for o in WANTED:
        assert dest.verify(o)
    big = [r for m, p, r in s.log if m == "GET" and p.endswith(oid(BIG))]
    assert big[0] == "" and len(big) == 3 and big[1] == f"bytes={len(BIG) // 2}-"
    batches = -(-len(WANTED) // -(-len(WANTED) // bamclient.PARALLEL))
    assert sum(1 for m, _p, _r in s.log if m == "POST") == batches + 2  # 2 asked again
    assert not list((tmp_path / "pool" / "tmp").iterdir())


def test_an_object_nowhere_fails_with_its_name(stub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = stub(batch=True, cut={})
    gone = Oid(bytes.fromhex("cd" * 32))
    dest = Pool(tmp_path / "pool")
    with pytest.raises(ObjectMissing, match="cd" * 32):
        bamclient.download(s.url, {*WANTED, gone}, dest, what="test")
    assert gone not in set(dest.oids())
    assert not list((tmp_path / "pool" / "tmp").iterdir())


def test_without_direct_io_objects_are_written_through_the_page_cache(
    stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(bamclient, "_set_direct", lambda fd, on: False)
    s = stub(batch=True, cut={"GET": 1})
    dest = Pool(tmp_path / "pool")
    bamclient.download(s.url, WANTED, dest, what="test")
    assert set(dest.oids()) == WANTED
    for o in WANTED:
        assert dest.verify(o)
