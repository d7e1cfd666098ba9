"""BAM objects in an S3-compatible object store (AWS S3, Ceph RGW, MinIO, Swift's s3api).

One bucket (and optional key prefix) holds the objects of every repository the server
serves, content-addressed: ``<prefix><oid[:2]>/<oid>``.  Any number of ``bkr serve``
processes configured with the same bucket see the same objects, so object servers scale
sideways and keep no state of their own.  Objects are immutable and named by their SHA-256,
so two uploads of one object (through two servers at once) store the same bytes: whichever
completes last wins, and both are right.

Uploads are verified before they become visible, never leaving a partial object:

- up to :data:`PART_SIZE` bytes: received into memory while hashed, then one ``PutObject``
  only if the SHA-256 matches;
- larger: a multipart upload to the final key, parts sent while the rest arrives (a few at a
  time), completed only after the last byte hashed to the oid, aborted otherwise.  Until it
  completes, no reader sees anything under that key.

Downloads pass ``Range`` through to the store and stream the answer in 1 MiB blocks with
one block read ahead, so each response holds at most two blocks.  Memory for uploads is
bounded by a shared pool of :data:`PART_SLOTS` part buffers, whatever the number of clients.

boto3 (the standard S3 client: signing, retries, connection pooling) is blocking: every call
runs in a worker thread (``trio.to_thread``) under a capacity limiter.  Settings that
S3-compatible stores need and AWS accepts: path-style addressing by default, and checksums
only where the API requires them (Swift's s3api rejects the newer aws-chunked trailers).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions
import trio
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from bkrepo.bundle import BamRecord
from bkrepo.errors import BkError, ObjectMissing
from bkrepo.ids import Oid
from bkrepo.pool import Pool
from bkrepo.server.asgi import Send
from bkrepo.server.settings import S3Settings
from bkrepo.server.storage import (
    SEND_BLOCK,
    ObjectStore,
    StoreUnavailable,
    UploadMismatch,
    single_error,
)

if TYPE_CHECKING:
    from bkrepo.repo import Repo

log = logging.getLogger("bkr.serve")

T = TypeVar("T")

PART_SIZE = 8 << 20  # multipart part size (S3's minimum is 5 MiB); a larger object grows it
MAX_PARTS = 10_000  # S3's limit on parts per upload
PARTS_IN_FLIGHT = 6  # per upload: parts being sent while the next one fills
PART_SLOTS = 16  # part buffers for all uploads at once (bounds upload memory at 128 MiB)
STREAMS = 48  # object downloads from the store at once (each holds one connection)
THREADS = 32  # boto3 calls at once
SIZE_CACHE = 50_000  # object sizes remembered (objects are immutable)
STALE_UPLOAD = 86_400  # unfinished multipart uploads older than this are aborted at start
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class S3Store:
    """The S3 back end: one store for every repository (see the module docstring)."""

    shared = True

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.describe = settings.describe()
        self.store_id = hashlib.sha256(
            f"bkr-s3-store\0{settings.bucket}\0{settings.prefix}".encode()
        ).hexdigest()[:32]
        self.client = _client(settings, settings.endpoint)
        self.presigner = (
            _client(settings, settings.presign_endpoint)
            if settings.presign_endpoint
            else self.client
        )
        self.limiter = trio.CapacityLimiter(THREADS)
        self.streams = trio.Semaphore(STREAMS)
        self.part_slots = trio.Semaphore(PART_SLOTS)
        self.sizes_known: OrderedDict[Oid, int] = OrderedDict()
        self.transfer = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4
        )

    # -- Storage -----------------------------------------------------------------------------
    def for_repo(self, repo: Repo | None) -> ObjectStore:
        return self

    def close(self) -> None:
        self.client.close()
        if self.presigner is not self.client:
            self.presigner.close()

    def key(self, oid: Oid) -> str:
        h = oid.hex()
        return f"{self.prefix}{h[:2]}/{h}"

    def start(self) -> None:
        """Check the store answers, create the bucket if it is missing, and abort multipart
        uploads that a crashed server left unfinished a day ago or more.  Blocking; raises
        BkError with one line on failure."""
        try:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as e:
                if _code(e) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                self._create_bucket()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise BkError(f"serve: object store {self.describe}: {_why(e)}") from None
        try:
            self._abort_stale_uploads()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            log.warning("could not list unfinished uploads in %s: %s", self.describe, _why(e))

    def _create_bucket(self) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            self.client.create_bucket(**args)
        except botocore.exceptions.ClientError as e:
            if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            # another server created it at the same moment; it must be ours to use
            self.client.head_bucket(Bucket=self.bucket)

    def _abort_stale_uploads(self) -> None:
        now = time.time()
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        while True:
            page = self.client.list_multipart_uploads(**args)
            for up in page.get("Uploads", []):
                started = up.get("Initiated")
                if started is not None and now - started.timestamp() > STALE_UPLOAD:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
            if not page.get("IsTruncated"):
                return
            args["KeyMarker"] = page.get("NextKeyMarker", "")
            args["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    # -- blocking primitives (worker threads) ------------------------------------------------
    def _call(self, fn: Callable[..., T], **kw: Any) -> T:
        """One boto3 call; store failures become 503 (clients retry those)."""
        try:
            return fn(Bucket=self.bucket, **kw)
        except botocore.exceptions.ClientError as e:
            raise StoreUnavailable(f"object store {self.describe}: {_why(e)}") from None
        except botocore.exceptions.BotoCoreError as e:
            raise StoreUnavailable(f"object store {self.describe}: {_why(e)}") from None

    def size_blocking(self, oid: Oid) -> int | None:
        known = self.sizes_known.get(oid)
        if known is not None:
            return known
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(oid))
        except botocore.exceptions.ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StoreUnavailable(f"object store {self.describe}: {_why(e)}") from None
        except botocore.exceptions.BotoCoreError as e:
            raise StoreUnavailable(f"object store {self.describe}: {_why(e)}") from None
        size = int(head["ContentLength"])
        self._remember(oid, size)
        return size

    def _remember(self, oid: Oid, size: int) -> None:
        self.sizes_known[oid] = size
        self.sizes_known.move_to_end(oid)
        while len(self.sizes_known) > SIZE_CACHE:
            self.sizes_known.popitem(last=False)

    def _forget(self, oid: Oid) -> None:
        self.sizes_known.pop(oid, None)

    def sizes_blocking(self, oids: Iterable[Oid]) -> dict[Oid, int | None]:
        """Sizes of many objects: HEAD requests eight at a time."""
        todo = list(dict.fromkeys(oids))
        if len(todo) <= 1:
            return {o: self.size_blocking(o) for o in todo}
        with ThreadPoolExecutor(min(8, len(todo)), thread_name_prefix="s3-head") as ex:
            return dict(zip(todo, ex.map(self.size_blocking, todo), strict=True))

    def missing_blocking(self, oids: Iterable[Oid]) -> set[Oid]:
        return {o for o, size in self.sizes_blocking(oids).items() if size is None}

    def upload_file(self, oid: Oid, path: Path) -> None:
        """Store a verified pool file (a push's BAM records).  The transfer manager sends
        large files as a multipart upload, invisible until it completes."""
        try:
            self.client.upload_file(str(path), self.bucket, self.key(oid), Config=self.transfer)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise StoreUnavailable(f"object store {self.describe}: {_why(e)}") from None
        except boto3.exceptions.S3UploadFailedError as e:
            raise StoreUnavailable(f"object store {self.describe}: {e}") from None

    def fetch_into(self, oid: Oid, pool: Pool) -> None:
        """Copy an object into a local pool (verified by the pool)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(oid))
        except botocore.exceptions.ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                raise ObjectMissing(f"BAM object {oid.hex()} is not in {self.describe}") from None
            raise StoreUnavailable(f"object store {self.describe}: {_why(e)}") from None
        body = resp["Body"]
        try:
            pool.receive(oid, body, where=self.describe)
        finally:
            body.close()

    # -- ObjectStore -------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def sizes(self, oids: list[Oid]) -> dict[Oid, int | None]:
        return await self._run(self.sizes_blocking, oids)

    async def open(self, oid: Oid) -> _S3Reader | None:
        size = await self._run(self.size_blocking, oid)
        if size is None:
            return None
        return _S3Reader(self, oid, size)

    async def put(self, oid: Oid, body: AsyncIterator[bytes], length: int | None) -> bool:
        if await self._run(self.size_blocking, oid) is not None:
            async for _ in body:
                pass
            return False
        part_size = PART_SIZE
        if length is not None and length > PART_SIZE * MAX_PARTS:
            part_size = -(-length // MAX_PARTS)
        upload = _Upload(self, oid, part_size)
        try:
            try:
                await upload.receive(body)
            except BaseExceptionGroup as group:
                raise single_error(group) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()
            raise
        return True

    def records(self, oids: list[Oid], limit: int) -> Iterator[BamRecord]:
        if limit <= 0:
            return
        for oid in oids:
            try:
                resp = self.client.get_object(
                    Bucket=self.bucket, Key=self.key(oid), Range=f"bytes=0-{limit - 1}"
                )
            except botocore.exceptions.ClientError as e:
                code = _code(e)
                if code in ("404", "NoSuchKey", "NotFound"):
                    continue
                if code in ("416", "InvalidRange") and self.size_blocking(oid) == 0:
                    yield BamRecord(oid, 0, io.BytesIO(b""))  # Range cannot ask for 0 bytes
                    continue
                raise StoreUnavailable(f"object store {self.describe}: {_why(e)}") from None
            stream = resp["Body"]
            with stream:
                total = _total_size(resp)
                if total > limit:
                    continue
                self._remember(oid, total)
                yield BamRecord(oid, total, stream)

    def download_url(self, oid: Oid) -> str | None:
        expires = self.settings.presign_downloads
        if not expires:
            return None
        return str(
            self.presigner.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self.key(oid)},
                ExpiresIn=expires,
            )
        )


class _S3Reader:
    """An object in the store, sent with a ranged GET passed through to it."""

    def __init__(self, store: S3Store, oid: Oid, size: int) -> None:
        self.store = store
        self.oid = oid
        self.size = size

    async def send(self, send: Send, start: int, end: int) -> None:
        store = self.store
        async with store.streams:
            args: dict[str, Any] = {"Key": store.key(self.oid)}
            if (start, end) != (0, self.size):
                args["Range"] = f"bytes={start}-{end - 1}"
            resp = await store._run(lambda: store._call(store.client.get_object, **args))
            body = resp["Body"]
            try:
                if int(resp["ContentLength"]) != end - start:
                    store._forget(self.oid)
                    raise StoreUnavailable(
                        f"object store {store.describe} answered {resp['ContentLength']} bytes "
                        f"of {self.oid.hex()} where {end - start} were asked for"
                    )
                await self._pump(send, body, end - start)
            finally:
                body.close()

    async def _pump(self, send: Send, body: Any, total: int) -> None:
        """Read blocks in worker threads, one ahead of the one being sent."""
        tx, rx = trio.open_memory_channel[bytes](1)
        store = self.store

        async def read_all() -> None:
            async with tx:
                left = total
                while left:
                    chunk = await store._run(_read_block, body, min(SEND_BLOCK, left), store)
                    if not chunk:
                        raise trio.BrokenResourceError("object store answer ended early")
                    left -= len(chunk)
                    await tx.send(chunk)

        sent = 0
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                async with rx:
                    async for chunk in rx:
                        sent += len(chunk)
                        more = sent < total
                        await send({"type": "http.response.body", "body": chunk, "more_body": more})
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        if sent < total:
            raise trio.BrokenResourceError("object store answer ended early")

    async def aclose(self) -> None:
        return None


def _read_block(body: Any, n: int, store: S3Store) -> bytes:
    try:
        return bytes(body.read(n))
    except (botocore.exceptions.BotoCoreError, OSError) as e:
        raise StoreUnavailable(f"object store {store.describe}: {_why(e)}") from None


class _Upload:
    """One upload: hashed as it arrives; a single PUT or a multipart upload, made visible
    only when the SHA-256 matches."""

    def __init__(self, store: S3Store, oid: Oid, part_size: int) -> None:
        self.store = store
        self.oid = oid
        self.key = store.key(oid)
        self.part_size = part_size
        self.sha = hashlib.sha256()
        self.upload_id: str | None = None
        self.parts: dict[int, str] = {}
        self.total = 0
        self.in_flight = trio.Semaphore(PARTS_IN_FLIGHT)

    async def receive(self, body: AsyncIterator[bytes]) -> None:
        store = self.store
        chunks: list[bytes] = []
        size = 0
        number = 0
        async with trio.open_nursery() as nursery:
            await store.part_slots.acquire()
            slot = True
            try:
                async for chunk in body:
                    chunks.append(chunk)
                    size += len(chunk)
                    self.total += len(chunk)
                    if size < self.part_size:
                        continue
                    # parts need not be equal: this one is what arrived (one copy, joined)
                    data = b"".join(chunks)
                    chunks, size = [], 0
                    await store._run(self.sha.update, data)
                    if self.upload_id is None:
                        resp = await store._run(
                            lambda: store._call(store.client.create_multipart_upload, Key=self.key)
                        )
                        self.upload_id = resp["UploadId"]
                    number += 1
                    if number > MAX_PARTS:
                        raise UploadTooLarge(self.part_size)
                    await self.in_flight.acquire()
                    slot = False  # the part's upload releases it
                    nursery.start_soon(self._send_part, number, data)
                    await store.part_slots.acquire()
                    slot = True
                data = b"".join(chunks)
                chunks = []
                await store._run(self.sha.update, data)
                if self.sha.digest() != self.oid:
                    raise UploadMismatch(self.oid, self.sha.hexdigest())
                if self.upload_id is None:
                    await store._run(
                        lambda: store._call(
                            store.client.put_object,
                            Key=self.key,
                            Body=data,
                            ContentLength=len(data),
                            ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
                        )
                    )
                    store._remember(self.oid, len(data))
                    return
                if data:
                    number += 1
                    await self.in_flight.acquire()
                    slot = False
                    nursery.start_soon(self._send_part, number, data)
            finally:
                if slot:
                    store.part_slots.release()
        # every part is in: complete (unless another upload of the same object won)
        assert self.upload_id is not None
        if await store._run(store.size_blocking, self.oid) is not None:
            await self.abort()
            return
        parts = [{"PartNumber": n, "ETag": self.parts[n]} for n in sorted(self.parts)]
        await store._run(
            lambda: store._call(
                store.client.complete_multipart_upload,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
        )
        self.upload_id = None
        store._remember(self.oid, self.total)

    async def _send_part(self, number: int, data: bytes) -> None:
        store = self.store
        try:
            resp = await store._run(
                lambda: store._call(
                    store.client.upload_part,
                    Key=self.key,
                    UploadId=self.upload_id,
                    PartNumber=number,
                    Body=data,
                    ContentLength=len(data),
                )
            )
            self.parts[number] = resp["ETag"]
        finally:
            store.part_slots.release()
            self.in_flight.release()

    async def abort(self) -> None:
        if self.upload_id is None:
            return
        upload_id, self.upload_id = self.upload_id, None
        store = self.store
        try:
            await store._run(
                lambda: store.client.abort_multipart_upload(
                    Bucket=store.bucket, Key=self.key, UploadId=upload_id
                )
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            log.warning("could not abort upload %s of %s: %s", upload_id, self.key, _why(e))


class UploadTooLarge(StoreUnavailable):
    def __init__(self, part_size: int) -> None:
        super().__init__(f"upload larger than {MAX_PARTS} parts of {part_size} bytes")
        self.status = 413


# -- helpers -----------------------------------------------------------------------------------
def _client(settings: S3Settings, endpoint: str | None) -> Any:
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
    )
    config = Config(
        s3={"addressing_style": settings.addressing_style},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=STREAMS + THREADS,
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 4, "mode": "standard"},
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _why(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        code = err.get("Code", "")
        msg = err.get("Message") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied ({code}); check the credentials and the bucket's policy"
        return f"{code}: {msg}" if msg else str(code)
    if isinstance(e, botocore.exceptions.EndpointConnectionError):
        return f"cannot reach {e.kwargs.get('endpoint_url', 'the endpoint')}"
    return str(e) or type(e).__name__


def _total_size(resp: dict[str, Any]) -> int:
    """The whole object's size from a (ranged) GET answer."""
    m = _CONTENT_RANGE.fullmatch(str(resp.get("ContentRange") or ""))
    return int(m.group(3)) if m else int(resp["ContentLength"])
