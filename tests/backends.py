"""The two storage back ends of ``bkr serve``, as the tests see them.

A test that concerns object storage takes the ``backend`` fixture through ``serve`` and is
marked :data:`both_backends`: it then runs once with the filesystem back end (each repo's
pool under ROOT) and once with the S3 back end against the real Swift store (a fresh
bucket per test).  Assertions about what the server holds go through the backend
(``backend.objects(repo)``), never straight to a pool, so one test checks both.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from bamhelp import pool, pool_path
from swiftstore import ACCESS_KEY, REGION, SECRET_KEY, Swift

both_backends = pytest.mark.parametrize("backend", ["fs", "s3"], indirect=True)


def served_repos(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(".bk") if p.is_dir())


class FsBackend:
    name = "fs"

    def serve_args(self) -> list[str]:
        return []

    def seed(self, root: Path) -> None:
        """Nothing to do: the server reads each repo's own pool."""

    def objects(self, repo: Path) -> set[str]:
        return pool(repo)

    def read(self, repo: Path, oid: str) -> bytes:
        return pool_path(repo, oid).read_bytes()

    def corrupt(self, repo: Path, oid: str, data: bytes) -> None:
        p = pool_path(repo, oid)
        p.chmod(0o644)
        p.write_bytes(data)

    def leftovers(self, repo: Path) -> list[str]:
        tmp = repo / ".bk" / "bam" / "tmp"
        return [p.name for p in tmp.iterdir()] if tmp.is_dir() else []


class S3Backend:
    name = "s3"

    def __init__(self, swift: Swift, work: Path, prefix: str = "bam/") -> None:
        self.swift = swift
        self.s3 = swift.client()
        self.bucket = f"bkr-{uuid.uuid4().hex[:12]}"
        self.prefix = prefix
        self.config = work / f"serve-{self.bucket}.toml"
        self.config.write_text(self.toml())

    def toml(self, **extra: object) -> str:
        lines = [
            "[storage]",
            'backend = "s3"',
            f'endpoint = "{self.swift.endpoint}"',
            f'bucket = "{self.bucket}"',
            f'region = "{REGION}"',
            f'prefix = "{self.prefix}"',
            f'access_key_id = "{ACCESS_KEY}"',
            f'secret_access_key = "{SECRET_KEY}"',
        ]
        for k, v in extra.items():
            lines.append(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"')
        return "\n".join(lines) + "\n"

    def serve_args(self) -> list[str]:
        return ["--config", str(self.config)]

    def key(self, oid: str) -> str:
        return f"{self.prefix}{oid[:2]}/{oid}"

    def seed(self, root: Path) -> None:
        """Move the BAM objects that repos under ROOT hold in their pools into the bucket, as
        an operator moving a filesystem server to S3 would (docs/scaleout.md): the server
        then reads only the bucket."""
        self._bucket()
        for repo in served_repos(root):
            for oid in sorted(pool(repo)):
                path = pool_path(repo, oid)
                self.s3.upload_file(str(path), self.bucket, self.key(oid))
                os.unlink(path)

    def _bucket(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except self.s3.exceptions.ClientError:
            self.s3.create_bucket(Bucket=self.bucket)

    def objects(self, repo: Path | None = None) -> set[str]:
        out: set[str] = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                if len(name) == 64:
                    out.add(name)
        return out

    def read(self, repo: Path | None, oid: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=self.key(oid))["Body"].read()

    def corrupt(self, repo: Path | None, oid: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self.key(oid), Body=data)

    def leftovers(self, repo: Path | None = None) -> list[str]:
        """Unfinished multipart uploads (none may stay behind a failed upload)."""
        page = self.s3.list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in page.get("Uploads", [])]
