"""A peer on local disk: the other repository opened in this process.

BAM objects come across by hardlink when both pools share a filesystem (pool files are
immutable and read-only), otherwise by a verified copy.  Objects the other repository does
not hold come from its own BAM server, without touching its pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from bkrepo import bamflow, nested
from bkrepo.bundle import Record
from bkrepo.errors import NotARepository, ObjectMissing
from bkrepo.ids import ObjectId, Oid
from bkrepo.pool import Pool
from bkrepo.repo import Repo, is_repo
from bkrepo.sync import Outcome, fetch_records, integrate, prepare_send, stage
from bkrepo.transport import PeerInfo


class LocalPeer:
    def __init__(self, path: str, *, what: str) -> None:
        p = Path(path).expanduser()
        if not is_repo(p):
            raise NotARepository(f"{what}: {path}: not a bkr repository")
        self.repo = Repo.open(p)
        self.url = str(self.repo.root)
        self.what = what

    def info(self) -> PeerInfo:
        with self.repo.store.read() as txn:
            return PeerInfo(
                url=self.url,
                project_id=self.repo.project_id,
                repo_id=self.repo.repo_id,
                tip=self.repo.tip(txn),
                config=txn.all_config(),
                bam_server=bamflow.get_server(txn),
                product=nested.is_product_txn(txn),
                partition=nested.partition_record(txn),
            )

    def resolve(self, rev: str) -> ObjectId:
        with self.repo.store.read() as txn:
            return self.repo.resolve(txn, rev)

    def known(self, keys: list[ObjectId]) -> set[ObjectId]:
        with self.repo.store.read() as txn:
            return {k for k in keys if txn.has_cset(k)}

    def tag_ids(self) -> list[ObjectId]:
        with self.repo.store.read() as txn:
            return txn.tag_ids()

    def fetch(
        self,
        want: ObjectId | None,
        have: list[ObjectId],
        have_tags: list[ObjectId],
        receiver: str | None = None,
    ) -> Iterator[Record]:
        prepare_send(self.repo, want, have, receiver)
        return fetch_records(self.repo, want, have, have_tags)

    def bam_missing(self, oids: set[Oid]) -> set[Oid]:
        return {o for o in oids if not self.repo.pool.has(o)}

    def bam_fetch(self, oids: set[Oid], into: Pool, *, hardlink: bool = True) -> None:
        elsewhere = set()
        for oid in sorted(oids):
            if self.repo.pool.has(oid):
                into.copy_from(self.repo.pool, oid, hardlink=hardlink)
            else:
                elsewhere.add(oid)
        if not elsewhere:
            return
        ref = bamflow.server_of(self.repo)
        if ref is None or ref.is_self:
            raise ObjectMissing(
                f"{self.what}: {len(elsewhere)} BAM object(s) are not in the pool of {self.url}"
                f" (first: {sorted(elsewhere)[0].hex()[:16]}…), which has no other server"
            )
        server = bamflow.open_server(self.repo, ref, self.what)
        try:
            server.bam_fetch(elsewhere, into, hardlink=hardlink)
        finally:
            server.close()

    def bam_push(self, oids: set[Oid], pool: Pool) -> None:
        for oid in sorted(oids):
            self.repo.pool.copy_from(pool, oid, hardlink=True)

    def push(self, records: Iterator[Record]) -> Outcome:
        with self.repo.locked("push"):
            staged = stage(self.repo, records, source="push")
            return integrate(
                self.repo,
                staged,
                what="push",
                source="push",
                ff_only=True,
                ensure_bam=lambda oids: bamflow.ensure_at_home(self.repo, oids, "push"),
            )

    def create_component(self, path: str, project_id: str) -> None:
        with self.repo.locked("push"):
            nested.create_component(self.repo, path, project_id)

    def close(self) -> None:
        self.repo.close()
