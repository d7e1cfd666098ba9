"""What history needs of BAM data, and where it is (``bkr bam`` reports)."""

from __future__ import annotations

from dataclasses import dataclass

from bkrepo.repo import Repo


@dataclass
class Usage:
    local_objects: int = 0
    local_bytes: int = 0
    missing_objects: int = 0
    missing_bytes: int = 0
    unreferenced_objects: int = 0
    unreferenced_bytes: int = 0


def du(repo: Repo) -> Usage:
    """Sizes of the BAM data history uses: held locally, and not held locally (which a BAM
    server must hold); plus pool objects no delta uses (left by undo or uncommitted work)."""
    with repo.store.read() as txn:
        refs = repo.bam_referenced(txn)
    u = Usage()
    for oid, size in refs.items():
        have = repo.pool.size_of(oid)
        if have is not None:
            u.local_objects += 1
            u.local_bytes += have
        else:
            u.missing_objects += 1
            u.missing_bytes += max(size, 0)
    for oid in repo.pool.oids():
        if oid not in refs:
            u.unreferenced_objects += 1
            u.unreferenced_bytes += repo.pool.size_of(oid) or 0
    return u
