"""``bkr serve --config FILE``: the server's TOML settings, checked before anything starts.

::

    [storage]                   # where BAM objects live
    backend = "s3"              # "filesystem" (the default: each repo's pool under ROOT) or "s3"
    endpoint = "http://127.0.0.1:18080"   # omitted: AWS S3 itself
    bucket = "bam"              # created if it is missing
    region = "us-east-1"
    prefix = "studio/"          # optional: keys are <prefix><oid[:2]>/<oid>
    access_key_id = "..."       # optional: else $AWS_ACCESS_KEY_ID
    secret_access_key = "..."   # optional: else $AWS_SECRET_ACCESS_KEY
    addressing_style = "path"   # "path" (default; Swift, MinIO, Ceph) or "virtual"
    presign_downloads = 3600    # optional: the Git LFS Batch API hands out presigned URLs
    presign_endpoint = "https://s3.example.com"   # optional: the endpoint as clients see it

    [server]
    objects_only = true         # an object server: BAM endpoints only, no repositories needed
    objects_url = "https://bam.example.com"   # on the sync server: the object tier's URL

Unknown keys are errors (a typo must not silently fall back to a default).  Repo metadata
always stays under ROOT; only BAM objects move to the store.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bkrepo.errors import UsageError

BACKENDS = ("filesystem", "s3")


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    endpoint: str | None = None
    region: str = "us-east-1"
    prefix: str = ""
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str | None = field(default=None, repr=False)
    addressing_style: str = "path"
    presign_downloads: int = 0  # seconds; 0 = the Batch API hands out this server's URLs
    presign_endpoint: str | None = None

    def describe(self) -> str:
        return f"s3 {self.endpoint or 'aws'}/{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class Settings:
    s3: S3Settings | None = None  # None: the filesystem back end
    objects_only: bool = False
    objects_url: str | None = None


_STORAGE_KEYS = {
    "backend": str,
    "endpoint": str,
    "bucket": str,
    "region": str,
    "prefix": str,
    "access_key_id": str,
    "secret_access_key": str,
    "addressing_style": str,
    "presign_downloads": int,
    "presign_endpoint": str,
}
_SERVER_KEYS = {"objects_only": bool, "objects_url": str}


def load(path: Path | None, env: dict[str, str] | None = None) -> Settings:
    """The settings in ``path`` (None: the defaults).  Raises UsageError naming the file."""
    if path is None:
        return Settings()
    env = dict(os.environ) if env is None else env
    where = f"serve: {path}"
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{where}: cannot read it: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: not valid TOML: {e}") from None
    for section in data:
        if section not in ("storage", "server"):
            raise UsageError(f"{where}: unknown section [{section}]")
    storage = _table(data, "storage", _STORAGE_KEYS, where)
    server = _table(data, "server", _SERVER_KEYS, where)

    backend = storage.get("backend", "filesystem")
    if backend not in BACKENDS:
        raise UsageError(f"{where}: storage.backend must be 'filesystem' or 's3', not {backend!r}")
    s3 = None
    if backend == "s3":
        s3 = _s3(storage, env, where)
    elif len(storage) > (1 if "backend" in storage else 0):
        extra = sorted(k for k in storage if k != "backend")[0]
        raise UsageError(f"{where}: storage.{extra} is only for backend = 's3'")

    objects_only = bool(server.get("objects_only", False))
    objects_url = server.get("objects_url") or None
    if objects_url is not None:
        if not objects_url.startswith(("http://", "https://")):
            raise UsageError(f"{where}: server.objects_url must be an http(s):// URL")
        objects_url = objects_url.rstrip("/")
    if (objects_only or objects_url) and s3 is None:
        key = "objects_only" if objects_only else "objects_url"
        raise UsageError(
            f"{where}: server.{key} needs [storage] backend = 's3' (object servers share a bucket)"
        )
    if objects_only and objects_url:
        raise UsageError(
            f"{where}: server.objects_url is for the sync server, not an object server"
        )
    return Settings(s3=s3, objects_only=objects_only, objects_url=objects_url)


def _table(data: dict[str, Any], name: str, keys: dict[str, type], where: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise UsageError(f"{where}: {name} must be a table ([{name}])")
    for k, v in table.items():
        if k not in keys:
            raise UsageError(f"{where}: unknown key {name}.{k}")
        want = keys[k]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise UsageError(f"{where}: {name}.{k} must be a {want.__name__}")
    return table


def _s3(t: dict[str, Any], env: dict[str, str], where: str) -> S3Settings:
    bucket = t.get("bucket", "")
    if not bucket:
        raise UsageError(f"{where}: storage.bucket is required for backend = 's3'")
    if not 3 <= len(bucket) <= 63 or not all(
        c.islower() or c.isdigit() or c in ".-" for c in bucket
    ):
        raise UsageError(
            f"{where}: storage.bucket {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens)"
        )
    endpoint = t.get("endpoint") or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise UsageError(f"{where}: storage.endpoint must be an http(s):// URL")
    prefix = t.get("prefix", "").strip("/")
    prefix = prefix + "/" if prefix else ""
    style = t.get("addressing_style", "path")
    if style not in ("path", "virtual"):
        raise UsageError(f"{where}: storage.addressing_style must be 'path' or 'virtual'")
    key_id = t.get("access_key_id") or env.get("AWS_ACCESS_KEY_ID", "")
    secret = t.get("secret_access_key") or env.get("AWS_SECRET_ACCESS_KEY", "")
    if not key_id or not secret:
        raise UsageError(
            f"{where}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or storage.access_key_id and storage.secret_access_key"
        )
    token = None if "access_key_id" in t else env.get("AWS_SESSION_TOKEN") or None
    presign = t.get("presign_downloads", 0)
    if presign < 0 or presign > 7 * 86400:
        raise UsageError(f"{where}: storage.presign_downloads must be 0..604800 seconds")
    presign_endpoint = t.get("presign_endpoint") or None
    if presign_endpoint is not None and not presign_endpoint.startswith(("http://", "https://")):
        raise UsageError(f"{where}: storage.presign_endpoint must be an http(s):// URL")
    return S3Settings(
        bucket=bucket,
        endpoint=endpoint.rstrip("/") if endpoint else None,
        region=t.get("region") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        prefix=prefix,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token,
        addressing_style=style,
        presign_downloads=presign,
        presign_endpoint=presign_endpoint.rstrip("/") if presign_endpoint else None,
    )
