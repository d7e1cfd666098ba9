"""Helpers for BAM tests: random binary files, pool contents, oids."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path


def binary(size: int, seed: int | None = None) -> bytes:
    """Incompressible bytes starting with a NUL (so the engine sees a binary file); the same
    bytes for the same seed."""
    body = os.urandom(size - 1) if seed is None else random.Random(seed).randbytes(size - 1)
    return b"\0" + body


def oid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pool(repo: Path) -> set[str]:
    """Object ids present in a repo's BAM pool."""
    root = repo / ".bk" / "bam"
    out = set()
    if root.is_dir():
        for sub in root.iterdir():
            if len(sub.name) == 2 and sub.is_dir():
                out.update(f.name for f in sub.iterdir() if len(f.name) == 64)
    return out


def pool_path(repo: Path, oid_hex: str) -> Path:
    return repo / ".bk" / "bam" / oid_hex[:2] / oid_hex
