"""How a repository talks to another one: the :class:`Peer` interface and :func:`open_peer`.

A peer is the other end of clone, pull and push.  Local paths open the other repository
in-process (:mod:`bkrepo.transport.local`).  Every peer answers the same questions, so the
commands in :mod:`bkrepo.transfer` never know which transport they use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from bkrepo.bundle import Record
from bkrepo.errors import UsageError
from bkrepo.ids import ObjectId, Oid
from bkrepo.pool import Pool
from bkrepo.sync import Outcome


@dataclass
class PeerInfo:
    url: str
    project_id: str
    repo_id: str
    tip: ObjectId | None
    config: dict[str, str] = field(default_factory=dict)


class Peer(Protocol):
    url: str

    def info(self) -> PeerInfo: ...

    def resolve(self, rev: str) -> ObjectId: ...

    def known(self, keys: list[ObjectId]) -> set[ObjectId]: ...

    def tag_ids(self) -> list[ObjectId]: ...

    def fetch(
        self, want: ObjectId | None, have: list[ObjectId], have_tags: list[ObjectId]
    ) -> Iterator[Record]: ...

    def bam_missing(self, oids: set[Oid]) -> set[Oid]: ...

    def bam_fetch(self, oids: set[Oid], into: Pool, *, hardlink: bool = True) -> None: ...

    def push(self, records: Iterator[Record]) -> Outcome: ...

    def close(self) -> None: ...


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def open_peer(location: str, *, what: str) -> Peer:
    """The peer at a local path (``file://`` accepted)."""
    if is_url(location):
        raise UsageError(f"{what}: {location}: HTTP transport is not available in this version")
    from bkrepo.transport.local import LocalPeer

    path = location[len("file://") :] if location.startswith("file://") else location
    return LocalPeer(path, what=what)
