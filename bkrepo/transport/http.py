"""A peer served by ``bkr serve``, over HTTP(S).

History moves as one streamed record stream per request (httpx's synchronous client: one
stream at a time is all sync needs, and it is the faster client here); BAM objects move in
parallel through :mod:`bkrepo.transport.bamclient`.  Network failures become one-line
errors naming the URL; refusals name the missing right.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx

from bkrepo.bamflow import ServerRef
from bkrepo.bundle import Record, encode_records, read_stream
from bkrepo.errors import (
    AccessDenied,
    BkError,
    NotARepository,
    ServerUnavailable,
    SyncError,
    UnknownRevision,
)
from bkrepo.ids import ObjectId, Oid
from bkrepo.pool import Pool
from bkrepo.sync import Outcome
from bkrepo.transport import PeerInfo, bamclient, io_timeout
from bkrepo.transport.credentials import auth_headers

READ_TIMEOUT = 120.0  # a fetch may wait while the server first fills its own BAM server
CONNECT_TIMEOUT = 10.0


class _ResponseFile(io.RawIOBase):
    """A blocking file over a streamed response body."""

    def __init__(self, response: httpx.Response) -> None:
        self.it = response.iter_raw(1 << 20)
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf:
            try:
                self.buf = next(self.it)
            except StopIteration:
                return 0
            except httpx.TransportError as e:
                raise ServerUnavailable(
                    f"connection lost while receiving: {e or type(e).__name__}"
                ) from None
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


class HttpPeer:
    def __init__(self, url: str, *, what: str) -> None:
        self.url = url.rstrip("/")
        self.what = what
        t = io_timeout(READ_TIMEOUT)
        self.client = httpx.Client(
            headers=auth_headers(self.url),
            timeout=httpx.Timeout(connect=min(CONNECT_TIMEOUT, t), read=t, write=t, pool=t),
            follow_redirects=True,
        )

    # -- plumbing ----------------------------------------------------------------------------
    def _fail(self, r: httpx.Response, path: str) -> BkError:
        try:
            reason = str(r.json().get("error"))
        except ValueError:
            reason = r.text.strip()[:200] or r.reason_phrase
        url = f"{self.url}/{path}"
        if r.status_code in (401, 403):
            return AccessDenied(
                f"{self.url} refused: {reason} ({r.status_code}); set BKR_TOKEN, or add "
                f"'{self.url} TOKEN' to ~/.config/bkr/credentials"
            )
        if r.status_code == 404 and path == "info":
            return NotARepository(f"{self.url}: no such repository on that server")
        if r.status_code == 409:  # the remote engine refused: its message says why
            return SyncError(reason)
        return SyncError(f"{url}: {reason} ({r.status_code})")

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.client.request(method, f"{self.url}/{path}", **kw)
        except httpx.TransportError as e:
            raise ServerUnavailable(f"cannot reach {self.url}: {e or type(e).__name__}") from None
        if r.status_code >= 400:
            raise self._fail(r, path)
        return r

    # -- the Peer interface ------------------------------------------------------------------
    def info(self) -> PeerInfo:
        d = self._request("GET", "info").json()
        server = d.get("bam_server")
        tip = d.get("tip")
        return PeerInfo(
            url=self.url,
            project_id=d["project_id"],
            repo_id=d["repo_id"],
            tip=ObjectId(bytes.fromhex(tip)) if tip else None,
            config=dict(d.get("config") or {}),
            bam_server=ServerRef(server["url"], server["id"]) if server else None,
            product=bool(d.get("product")),
            partition=d.get("partition") if isinstance(d.get("partition"), dict) else None,
        )

    def resolve(self, rev: str) -> ObjectId:
        try:
            r = self._request("POST", "sync/resolve", json={"rev": rev})
        except SyncError as e:
            raise UnknownRevision(f"{self.url}: unknown revision {rev!r}") from e
        return ObjectId(bytes.fromhex(r.json()["key"]))

    def known(self, keys: list[ObjectId]) -> set[ObjectId]:
        r = self._request("POST", "sync/known", json={"keys": [k.hex() for k in keys]})
        return {ObjectId(bytes.fromhex(k)) for k in r.json()["known"]}

    def tag_ids(self) -> list[ObjectId]:
        return [
            ObjectId(bytes.fromhex(t)) for t in self._request("GET", "sync/tags").json()["tags"]
        ]

    def fetch(
        self,
        want: ObjectId | None,
        have: list[ObjectId],
        have_tags: list[ObjectId],
        receiver: str | None = None,
    ) -> Iterator[Record]:
        body = {
            "want": want.hex() if want else None,
            "have": [h.hex() for h in have],
            "have_tags": [t.hex() for t in have_tags],
            "receiver": receiver,
        }
        try:
            with self.client.stream("POST", f"{self.url}/sync/fetch", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self._fail(r, "sync/fetch")
                yield from read_stream(io.BufferedReader(_ResponseFile(r), 1 << 20))  # type: ignore[arg-type]
        except httpx.TransportError as e:
            raise ServerUnavailable(f"cannot reach {self.url}: {e or type(e).__name__}") from None

    def bam_missing(self, oids: set[Oid]) -> set[Oid]:
        if not oids:
            return set()
        r = self._request("POST", "bam/missing", json={"oids": sorted(o.hex() for o in oids)})
        return {Oid(bytes.fromhex(o)) for o in r.json()["missing"]}

    def bam_fetch(self, oids: set[Oid], into: Pool, *, hardlink: bool = True) -> None:
        bamclient.download(self.url, oids, into, what=self.what)

    def bam_push(self, oids: set[Oid], pool: Pool) -> None:
        bamclient.upload(self.url, oids, pool, what=self.what)

    def push(self, records: Iterator[Record]) -> Outcome:
        r = self._request(
            "POST",
            "sync/push",
            content=encode_records(records),
            headers={"Content-Type": "application/x-bkr-bundle"},
        )
        d = r.json()
        tip = d.get("tip")
        return Outcome(
            d["kind"],
            d["new_csets"],
            ObjectId(bytes.fromhex(tip)) if tip else None,
            new_tags=d.get("new_tags", 0),
        )

    def create_component(self, path: str, project_id: str) -> None:
        self._request("POST", "sync/component", json={"path": path, "project_id": project_id})

    def close(self) -> None:
        self.client.close()
