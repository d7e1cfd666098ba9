"""The ASGI app of ``bkr serve``: every repository under ROOT, by URL path.

``/<repo path>/`` followed by:

==========================  =====  ==========================================================
``info``                    GET    project id, repo id, tip, BAM settings and server (JSON)
``sync/known``              POST   which of these cset keys the repo has
``sync/resolve``            POST   a revision name -> cset key
``sync/tags``               GET    tag object ids
``sync/fetch``              POST   a record stream (see bundle.py) with what the caller lacks
``sync/push``               POST   apply a record stream (fast-forward only)        [write]
``bam/missing``             POST   which of these BAM oids the pool lacks
``bam/batch``               POST   many small objects in one answer (B records, bundle.py)
``bam/<oid>``               GET    object bytes; ``Range``, ``ETag``, immutable caching
``bam/<oid>``               HEAD   the same headers
``bam/<oid>``               PUT    upload: streamed to a temp file, verified, renamed  [write]
``info/lfs/objects/batch``  POST   the Git LFS Batch API (basic transfer)
==========================  =====  ==========================================================

BAM objects live in an :class:`~bkrepo.server.storage.ObjectStore`: each repository's pool
(the filesystem back end) or one S3-compatible bucket for all of them
(:mod:`bkrepo.server.s3store`), chosen by ``--config`` (:mod:`bkrepo.server.settings`).
With ``objects_only`` the server is an object server: it answers the BAM endpoints of any
repository path from the shared store, needs no repositories under ROOT, and answers
``info`` as the store (a BAM server whose repo id is the store's id).

Blocking work (LMDB, hashing, file reads, S3 calls) runs in worker threads; a transaction
never spans an await.  Writes to one repository are serialised here and by the repo lock on
disk.  Every response holds at most a block or two of object data (storage.py).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import trio

from bkrepo import bamflow, nested
from bkrepo.bundle import encode_records, read_stream
from bkrepo.errors import BkError, NotARepository, UnknownRevision, UsageError
from bkrepo.ids import ObjectId, Oid, parse_oid
from bkrepo.repo import Repo, is_repo
from bkrepo.server.asgi import (
    HTTPError,
    Receive,
    Request,
    Scope,
    Send,
    parse_range,
    send_empty,
    send_error,
    send_json,
)
from bkrepo.server.auth import Access
from bkrepo.server.settings import Settings
from bkrepo.server.storage import SEND_BLOCK, FilesystemStorage, ObjectStore, Storage
from bkrepo.sync import Outcome, Staged, discard, fetch_records, integrate, prepare_send, stage

if TYPE_CHECKING:
    from bkrepo.server.s3store import S3Store

log = logging.getLogger("bkr.serve")

BATCH_MAX_OIDS = 10_000  # objects one bam/batch request may ask for
BATCH_MAX_SIZE = 16 << 20  # the largest object bam/batch sends (the client's max_size, capped)
KEYWORDS = ("info", "sync", "bam")
CACHE_CONTROL = b"public, max-age=31536000, immutable"
LFS_JSON = b"application/vnd.git-lfs+json"


class Repos:
    """The repositories under ROOT, opened once each and kept open."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.open: dict[Path, Repo] = {}
        self.write_locks: dict[Path, trio.Lock] = {}
        # URL path of a repository -> its real root, once found: resolving it again (a stat
        # per component, realpath) was a quarter of a BAM read's time in the app after the
        # server had been idle a moment (docs/performance.md).  Only paths that named a
        # repository are kept (a new one is found on its first request): bounded by the
        # repositories under ROOT and the paths (symlinks) that reach them.
        self._found: dict[tuple[str, ...], Path] = {}
        self._urls: dict[Path, str] = {}  # and back: a repository's root -> its URL path

    def split(self, path: str) -> tuple[Path, list[str]]:
        """URL path -> (repo root, the rest).  Paths never escape ROOT.  The deepest repository
        wins, so the component ``game/bam`` of a product ``game`` is reachable."""
        parts = [p for p in path.split("/") if p]
        for p in parts:
            if p in (".", "..") or "\0" in p or p.startswith(".bk"):
                raise HTTPError(400, "bad path")
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in KEYWORDS:
                where = tuple(parts[:i])
                known = self._found.get(where)
                if known is not None:
                    return known, parts[i:]
                candidate = self.root.joinpath(*where)
                if is_repo(candidate):
                    real = candidate.resolve()
                    if real != self.root and self.root not in real.parents:
                        raise HTTPError(404, "no such repository")
                    self._found[where] = real
                    return real, parts[i:]
        raise HTTPError(404, "no such repository")

    def split_objects(self, path: str) -> tuple[str, list[str]]:
        """For an object server, which has no repositories: URL path -> (the repository's
        URL path, the endpoint), by the endpoint's shape alone."""
        parts = [p for p in path.split("/") if p]
        for p in parts:
            if p in (".", "..") or "\0" in p or p.startswith(".bk"):
                raise HTTPError(400, "bad path")
        if parts[-4:] == ["info", "lfs", "objects", "batch"]:
            n = 4
        elif len(parts) >= 2 and parts[-2] == "bam":
            n = 2
        elif parts[-1:] == ["info"]:
            n = 1
        else:
            raise HTTPError(
                404,
                "this is an object server (BAM objects only); clone, pull and push through "
                "the sync server",
            )
        rest = parts[-n:]
        return "/" + "/".join(parts[: len(parts) - len(rest)]), rest

    def get(self, root: Path) -> Repo:
        repo = self.open.get(root)
        if repo is None:
            try:
                repo = Repo.open(root)
            except NotARepository:
                raise HTTPError(404, "no such repository") from None
            self.open[root] = repo
            self.write_locks[root] = trio.Lock()
        return repo

    def url_path(self, root: Path) -> str:
        url = self._urls.get(root)
        if url is None:
            url = "/" + root.relative_to(self.root).as_posix() if root != self.root else ""
            self._urls[root] = url
        return url

    def close(self) -> None:
        for repo in self.open.values():
            repo.close()
        self.open.clear()


class App:
    def __init__(
        self,
        root: Path,
        access: Access,
        settings: Settings | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.repos = Repos(root)
        self.access = access
        self.settings = settings or Settings()
        self.limiter = trio.CapacityLimiter(16)
        self.storage: Storage = storage or FilesystemStorage(self.limiter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        req = Request(scope, receive)
        try:
            await self.route(req, send)
        except HTTPError as e:
            await send_error(send, e)
        except BkError as e:
            await send_error(send, HTTPError(409 if e.exit_code == 1 else 400, str(e)))
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("internal error on %s %s", req.method, req.path)
            await send_error(send, HTTPError(500, "internal server error"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.repos.close()
                self.storage.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- routing -----------------------------------------------------------------------------
    async def route(self, req: Request, send: Send) -> None:
        if self.settings.objects_only:
            await self.route_objects_only(req, send)
            return
        root, rest = self.repos.split(req.path)
        repo = self.repos.get(root)
        store = self.storage.for_repo(repo)
        m = req.method
        base = self.repos.url_path(root)
        if rest == ["info"] and m == "GET":
            self.access.require(req, "read")
            await send_json(send, 200, await self.run(self.info, repo, req))
        elif await self.objects(req, send, rest, store, base, repo):
            return
        elif rest == ["sync", "known"] and m == "POST":
            self.access.require(req, "read")
            body = await req.json()
            keys = _keys(body.get("keys") if isinstance(body, dict) else None)
            known = await self.run(_known, repo, keys)
            await send_json(send, 200, {"known": known})
        elif rest == ["sync", "resolve"] and m == "POST":
            self.access.require(req, "read")
            body = await req.json()
            rev = body.get("rev") if isinstance(body, dict) else None
            if not isinstance(rev, str):
                raise HTTPError(400, 'expected {"rev": NAME}')
            try:
                key = await self.run(_resolve, repo, rev)
            except UnknownRevision as e:
                raise HTTPError(404, str(e)) from None
            await send_json(send, 200, {"key": key})
        elif rest == ["sync", "tags"] and m == "GET":
            self.access.require(req, "read")
            await send_json(send, 200, {"tags": await self.run(_tags, repo)})
        elif rest == ["sync", "fetch"] and m == "POST":
            self.access.require(req, "read")
            await self.fetch(req, send, repo)
        elif rest == ["sync", "component"] and m == "POST":
            self.access.require(req, "write")
            body = await req.json()
            path = body.get("path") if isinstance(body, dict) else None
            pid = body.get("project_id") if isinstance(body, dict) else None
            if not isinstance(path, str) or not isinstance(pid, str):
                raise HTTPError(400, 'expected {"path": PATH, "project_id": ID}')
            if not await self.run(nested.is_product, repo):
                raise HTTPError(409, "not a product: components can only be made in a product")
            created = await self.run(self._create_component, repo, path, pid)
            await send_json(send, 201 if created else 200, {"created": created})
        elif rest == ["sync", "push"] and m == "POST":
            self.access.require(req, "write")
            await self.push(req, send, repo, root, store)
        else:
            raise HTTPError(404, "unknown endpoint")

    async def route_objects_only(self, req: Request, send: Send) -> None:
        """An object server: the BAM endpoints of any repository path, from the shared store;
        ``info`` answers as the store; history lives on the sync server."""
        base, rest = self.repos.split_objects(req.path)
        store = self.storage.for_repo(None)
        if rest == ["info"] and req.method == "GET":
            self.access.require(req, "read")
            sid = self.storage.store_id
            await send_json(
                send,
                200,
                {
                    "project_id": "",
                    "repo_id": sid,
                    "tip": None,
                    "config": {},
                    "bam_server": {"url": ".", "id": sid},
                    "objects_only": True,
                },
            )
        elif not await self.objects(req, send, rest, store, base, None):
            raise HTTPError(
                404,
                "this is an object server (BAM objects only); clone, pull and push through "
                "the sync server",
            )

    async def objects(
        self,
        req: Request,
        send: Send,
        rest: list[str],
        store: ObjectStore,
        base: str,
        repo: Repo | None,
    ) -> bool:
        """The BAM object endpoints; False when ``rest`` is not one of them."""
        m = req.method
        if rest[:2] == ["info", "lfs"]:
            if rest[2:] == ["objects", "batch"] and m == "POST":
                await self.lfs_batch(req, send, store, base)
                return True
            raise HTTPError(404, "unknown LFS endpoint")
        if rest == ["bam", "missing"] and m == "POST":
            self.access.require(req, "read")
            body = await req.json()
            oids = _oids(body.get("oids") if isinstance(body, dict) else None)
            sizes = await store.sizes(oids)
            await send_json(send, 200, {"missing": [o.hex() for o in oids if sizes[o] is None]})
        elif rest == ["bam", "batch"] and m == "POST":
            self.access.require(req, "read")
            await self.batch_objects(req, send, store)
        elif len(rest) == 2 and rest[0] == "bam":
            try:
                oid = parse_oid(rest[1])
            except BkError:
                raise HTTPError(400, "bad object id: expected 64 lowercase hex digits") from None
            if m in ("GET", "HEAD"):
                self.access.require(req, "read")
                await self.get_object(req, send, store, repo, oid, head=m == "HEAD")
            elif m == "PUT":
                self.access.require(req, "write")
                await self.put_object(req, send, store, oid)
            else:
                raise HTTPError(405, "method not allowed")
        else:
            return False
        return True

    # -- sync --------------------------------------------------------------------------------
    def info(self, repo: Repo, req: Request) -> dict[str, Any]:
        with repo.store.read() as txn:
            tip = repo.tip(txn)
            ref = bamflow.get_server(txn)
            config = {
                k: v
                for k, v in txn.all_config().items()
                if k.startswith("bam.") and k != "bam.pools"
            }
            product = nested.is_product_txn(txn)
            partition = nested.partition_record(txn)
        server = None
        if ref is not None and ref.is_self and self.settings.objects_url:
            # the object tier serves this repo's data: clients use it as their BAM server
            url = self.settings.objects_url + self.repos.url_path(repo.root.resolve())
            server = {"url": url, "id": self.storage.store_id}
        elif ref is not None:
            server = {"url": self._public_url(req, ref.url), "id": bamflow.effective_id(repo, ref)}
        return {
            "project_id": repo.project_id,
            "repo_id": repo.repo_id,
            "tip": tip.hex() if tip else None,
            "config": config,
            "bam_server": server,
            "product": product,
            "partition": partition,
        }

    def _create_component(self, repo: Repo, path: str, project_id: str) -> bool:
        try:
            with repo.locked("push"):
                return nested.create_component(repo, path, project_id)
        except UsageError as e:
            raise HTTPError(400, str(e)) from None

    def _public_url(self, req: Request, url: str) -> str:
        """A server URL as seen by clients: a local path under ROOT becomes this server's URL."""
        if url == ".":
            return "."
        p = Path(url)
        if p.is_absolute():
            real = p.resolve()
            if real == self.repos.root or self.repos.root in real.parents:
                host = req.header("host") or "localhost"
                scheme = req.scope.get("scheme", "http")
                return f"{scheme}://{host}{self.repos.url_path(real)}"
        return url

    async def fetch(self, req: Request, send: Send, repo: Repo) -> None:
        body = await req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "expected a JSON object")
        want_hex = body.get("want")
        want = _keys([want_hex])[0] if want_hex else None
        have = _keys(body.get("have", []))
        have_tags = _keys(body.get("have_tags", []))
        receiver = body.get("receiver")

        if want is not None and not await self.run(_known, repo, [want]):
            raise HTTPError(404, f"no cset {want.hex()} in this repository")
        rid = receiver if isinstance(receiver, str) else None
        await self.run(prepare_send, repo, want, have, rid)
        await self.stream(send, lambda: encode_records(fetch_records(repo, want, have, have_tags)))

    async def stream(self, send: Send, produce: Callable[[], Iterator[bytes]]) -> None:
        """Send chunks made by a blocking generator in a worker thread (which owns its LMDB
        transaction), coalesced into ~1 MiB body messages, with back-pressure."""
        tx, rx = trio.open_memory_channel[bytes](4)

        def work() -> None:
            buf = bytearray()
            try:
                for chunk in produce():
                    buf += chunk
                    if len(buf) >= 1 << 20:
                        trio.from_thread.run(tx.send, bytes(buf))
                        buf.clear()
                if buf:
                    trio.from_thread.run(tx.send, bytes(buf))
            finally:
                trio.from_thread.run(tx.aclose)

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-bkr-bundle")],
            }
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_quietly, work)
            async with rx:
                async for chunk in rx:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _run_quietly(self, work: Callable[[], None]) -> None:
        try:
            await self.run(work)
        except Exception:  # the stream just ends without its end record; the client says so
            log.exception("bundle stream failed")

    async def push(
        self, req: Request, send: Send, repo: Repo, root: Path, store: ObjectStore
    ) -> None:
        reader = io.BufferedReader(_ThreadBody(req), 1 << 20)
        shared = cast("S3Store", store) if store.shared else None

        def apply() -> dict[str, Any]:
            with repo.locked("push"):
                staged = stage(repo, read_stream(reader), source="push")
                if shared is None:
                    ensure = lambda oids: bamflow.ensure_at_home(repo, oids, "push")  # noqa: E731
                    outcome = integrate(
                        repo, staged, what="push", source="push", ff_only=True, ensure_bam=ensure
                    )
                else:
                    outcome = _integrate_shared(repo, staged, shared)
            return {
                "kind": outcome.kind,
                "new_csets": outcome.new_csets,
                "tip": outcome.tip.hex() if outcome.tip else None,
                "new_tags": outcome.new_tags,
            }

        async with self.repos.write_locks[root]:
            result = await self.run(apply)
        await send_json(send, 200, result)

    # -- BAM objects -------------------------------------------------------------------------
    async def get_object(
        self,
        req: Request,
        send: Send,
        store: ObjectStore,
        repo: Repo | None,
        oid: Oid,
        *,
        head: bool,
    ) -> None:
        etag = f'"{oid.hex()}"'
        obj = await store.open(oid)
        if obj is None:
            await self._object_elsewhere(req, send, store, repo, oid, head=head)
            return
        try:
            size = obj.size
            base = [
                (b"etag", etag.encode()),
                (b"cache-control", CACHE_CONTROL),
                (b"accept-ranges", b"bytes"),
                (b"content-type", b"application/octet-stream"),
            ]
            inm = req.header("if-none-match")
            if inm is not None and (inm.strip() == etag or inm.strip() == "*"):
                await send_empty(send, 304, base)
                return
            rng = parse_range(req.header("range"), size)
            start, end = rng if rng is not None else (0, size)
            headers = [*base, (b"content-length", str(end - start).encode())]
            status = 200
            if rng is not None:
                status = 206
                headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if head or start == end:
                await send({"type": "http.response.body", "body": b""})
                return
            await obj.send(send, start, end)
        finally:
            await obj.aclose()

    async def batch_objects(self, req: Request, send: Send, store: ObjectStore) -> None:
        """Many small objects in one answer (``{"oids": [...], "max_size": N}``): a record
        stream (bundle.py) with a B record for each one asked for that the store holds and
        that is at most ``max_size`` bytes, in the order asked, then E.  The others are left
        out: the client fetches those one by one (GET answers for the repo's own BAM server
        too, and tells a missing object from a large one)."""
        body = await req.json()
        values = body.get("oids") if isinstance(body, dict) else None
        max_size = body.get("max_size", SEND_BLOCK) if isinstance(body, dict) else None
        if not isinstance(values, list) or not isinstance(max_size, int) or max_size < 0:
            raise HTTPError(400, 'expected {"oids": [OID...], "max_size": BYTES}')
        if len(values) > BATCH_MAX_OIDS:
            raise HTTPError(413, f"at most {BATCH_MAX_OIDS} objects per batch")
        oids = _oids(values)
        limit = min(max_size, BATCH_MAX_SIZE)
        await self.stream(send, lambda: encode_records(store.records(oids, limit)))

    async def _object_elsewhere(
        self,
        req: Request,
        send: Send,
        store: ObjectStore,
        repo: Repo | None,
        oid: Oid,
        *,
        head: bool,
    ) -> None:
        """Not in the store: this repo's own BAM server may have it (recursion, as
        BitKeeper's servers answer for their clients)."""
        ref = bamflow.server_of(repo) if repo is not None else None
        if ref is not None and not ref.is_self:
            from bkrepo.transport import is_url

            if is_url(ref.url):
                location = f"{ref.url}/bam/{oid.hex()}".encode()
                await send_empty(send, 307, [(b"location", location)])
                return
            other = await self.run(self._local_server, Path(ref.url))
            if other is not None:
                other_store = self.storage.for_repo(other)
                if other_store is not store:
                    await self.get_object(req, send, other_store, other, oid, head=head)
                    return
        raise HTTPError(404, f"no BAM object {oid.hex()}")

    def _local_server(self, path: Path) -> Repo | None:
        return self.repos.get(path.resolve()) if is_repo(path) else None

    async def put_object(self, req: Request, send: Send, store: ObjectStore, oid: Oid) -> None:
        declared = req.header("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        stored = await store.put(oid, req.chunks(), length)
        await send_json(send, 201 if stored else 200, {"oid": oid.hex(), "stored": stored})

    # -- Git LFS -----------------------------------------------------------------------------
    async def lfs_batch(self, req: Request, send: Send, store: ObjectStore, path: str) -> None:
        body = await req.json()
        if not isinstance(body, dict) or body.get("operation") not in ("download", "upload"):
            raise HTTPError(422, "expected {operation: download|upload, objects: [...]}")
        op = body["operation"]
        self.access.require(req, "write" if op == "upload" else "read")
        transfers = body.get("transfers") or ["basic"]
        objects = body.get("objects") or []
        if not isinstance(transfers, list) or not isinstance(objects, list):
            raise HTTPError(422, "expected lists for transfers and objects")
        if "basic" not in transfers:
            raise HTTPError(422, "only the basic transfer is supported")
        host = req.header("host") or "localhost"
        base = f"{req.scope.get('scheme', 'http')}://{host}{path}/bam/"
        header = {}
        if req.header("authorization"):
            header["Authorization"] = req.header("authorization")
        items: list[dict[str, Any]] = []
        oids: list[Oid] = []
        for obj in objects:
            oid_text = obj.get("oid") if isinstance(obj, dict) else None
            size = obj.get("size") if isinstance(obj, dict) else None
            item: dict[str, Any] = {"oid": oid_text, "size": size}
            try:
                oid = parse_oid(oid_text)
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    item["error"] = {"code": 422, "message": "bad size: expected a byte count"}
                else:
                    oids.append(oid)
            except BkError:
                item["error"] = {"code": 422, "message": "bad oid"}
            items.append(item)
        sizes = await store.sizes(oids)
        valid = iter(oids)
        for item in items:
            if "error" in item:
                continue
            oid = next(valid)
            have = sizes[oid]
            if op == "download":
                if have is None:
                    item["error"] = {"code": 404, "message": "object not found"}
                    continue
                item["size"] = have
                direct = store.download_url(oid)
                if direct is not None:  # straight from the object store, presigned
                    expires = self.storage_presign_seconds()
                    item["actions"] = {"download": {"href": direct, "expires_in": expires}}
                else:
                    item["authenticated"] = True
                    item["actions"] = {
                        "download": {
                            "href": base + oid.hex(),
                            "header": header,
                            "expires_in": 86400,
                        }
                    }
            elif have is None:
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": base + oid.hex(), "header": header, "expires_in": 86400}
                }
        await send_json(
            send,
            200,
            {"transfer": "basic", "objects": items, "hash_algo": "sha256"},
            content_type=LFS_JSON,
        )

    def storage_presign_seconds(self) -> int:
        s3 = self.settings.s3
        return s3.presign_downloads if s3 is not None else 0


def _integrate_shared(repo: Repo, staged: Staged, store: S3Store) -> Outcome:
    """A push into a repository whose objects live in the shared store: the BAM records that
    came in the stream (staged in the repo's pool) go to the store before the csets become
    part of the repo, and every object the new csets use must then be there (invariant 3).
    A repository with a working tree (checkout get) also gets the data of the files the
    update writes.  Afterwards the pool keeps none of it: the store is its one home."""
    received = list(staged.bam_received)
    fetched: list[Oid] = []
    try:
        for oid in received:
            store.upload_file(oid, repo.pool.path(oid))
    except BaseException:
        discard(repo, staged)
        raise
    checkout = repo.config_value("checkout") == "get"

    def ensure(oids: set[Oid]) -> None:
        left = store.missing_blocking(oids)
        if left:  # a repository with another BAM server may have them there
            bamflow.ensure_at_home(repo, left, "push")
        if checkout:
            for oid in sorted(oids):
                store.fetch_into(oid, repo.pool)
                fetched.append(oid)

    try:
        return integrate(repo, staged, what="push", source="push", ff_only=True, ensure_bam=ensure)
    finally:
        for oid in (*received, *fetched):
            repo.pool.remove(oid)


# -- small blocking helpers run in threads -----------------------------------------------------
def _oids(values: Any) -> list[Oid]:
    """BAM object ids from a JSON body: a list of 64-digit lowercase hex strings."""
    if not isinstance(values, list):
        raise HTTPError(400, 'expected {"oids": [OID...]}')
    try:
        return [parse_oid(v) for v in values]
    except BkError:
        raise HTTPError(400, "bad object id: expected 64 lowercase hex digits") from None


def _keys(values: Any) -> list[ObjectId]:
    if not isinstance(values, list):
        raise HTTPError(400, "expected a list of keys")
    out = []
    for v in values:
        if not isinstance(v, str) or len(v) != 64:
            raise HTTPError(400, "bad key: expected 64 hex digits")
        try:
            out.append(ObjectId(bytes.fromhex(v)))
        except ValueError:
            raise HTTPError(400, "bad key: expected 64 hex digits") from None
    return out


def _known(repo: Repo, keys: list[ObjectId]) -> list[str]:
    with repo.store.read() as txn:
        return [k.hex() for k in keys if txn.has_cset(k)]


def _resolve(repo: Repo, rev: str) -> str:
    with repo.store.read() as txn:
        return repo.resolve(txn, rev).hex()


def _tags(repo: Repo) -> list[str]:
    with repo.store.read() as txn:
        return [t.hex() for t in txn.tag_ids()]


class _ThreadBody(io.RawIOBase):
    """A blocking file over the async request body, for code running in a worker thread."""

    def __init__(self, req: Request) -> None:
        self.it = req.chunks()
        self.buf = b""
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf and not self.eof:
            try:
                self.buf = trio.from_thread.run(self.it.__anext__)
            except StopAsyncIteration:
                self.eof = True
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n
