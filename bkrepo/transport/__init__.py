"""How a repository talks to another one: the :class:`Peer` interface and :func:`open_peer`.

A peer is the other end of clone, pull and push.  Local paths open the other repository
in-process (:mod:`bkrepo.transport.local`); ``http(s)://`` URLs talk to ``bkr serve``
(:mod:`bkrepo.transport.http`).  Every peer answers the same questions, so the
commands in :mod:`bkrepo.transfer` never know which transport they use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from bkrepo.bamflow import ServerRef
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
    bam_server: ServerRef | None = None  # url "." = the peer is its own BAM server
    product: bool = False  # the peer is the product of a nested collection
    partition: dict[str, object] | None = None  # how the product was partitioned (partition.py)

    def server_id(self) -> str | None:
        """The repo id of the server holding the peer's BAM data (None: the peer holds it all)."""
        if self.bam_server is None:
            return None
        return self.repo_id if self.bam_server.is_self else self.bam_server.id


class Peer(Protocol):
    url: str

    def info(self) -> PeerInfo: ...

    def resolve(self, rev: str) -> ObjectId: ...

    def known(self, keys: list[ObjectId]) -> set[ObjectId]: ...

    def tag_ids(self) -> list[ObjectId]: ...

    def fetch(
        self,
        want: ObjectId | None,
        have: list[ObjectId],
        have_tags: list[ObjectId],
        receiver: str | None = None,
    ) -> Iterator[Record]:
        """What leads to ``want`` beyond ``have``.  The peer first makes the BAM data of those
        csets present at its own server, unless ``receiver`` (a repo id) is that server."""
        ...

    def bam_missing(self, oids: set[Oid]) -> set[Oid]:
        """Which of these objects the peer's pool lacks."""
        ...

    def bam_fetch(self, oids: set[Oid], into: Pool, *, hardlink: bool = True) -> None:
        """Bring objects into a local pool, verified; the peer answers from its pool or its
        own BAM server."""
        ...

    def bam_push(self, oids: set[Oid], pool: Pool) -> None:
        """Send objects from a local pool into the peer's pool (verified there)."""
        ...

    def push(self, records: Iterator[Record]) -> Outcome: ...

    def create_component(self, path: str, project_id: str) -> None:
        """In a product: make an empty component at ``path`` for a push to fill (nothing if
        it exists with that project id)."""
        ...

    def close(self) -> None: ...


def io_timeout(default: float) -> float:
    """Seconds any one network operation may take before it fails (so nothing hangs):
    ``$BKR_HTTP_TIMEOUT`` when set (slow links may want more), else ``default``."""
    text = os.environ.get("BKR_HTTP_TIMEOUT")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"BKR_HTTP_TIMEOUT={text!r}: expected a number of seconds above 0")
    return value


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def open_peer(location: str, *, what: str) -> Peer:
    """The peer at an HTTP(S) URL served by ``bkr serve``, or at a local path."""
    if is_url(location):
        from bkrepo.transport.http import HttpPeer

        return HttpPeer(location, what=what)
    from bkrepo.transport.local import LocalPeer

    path = location[len("file://") :] if location.startswith("file://") else location
    return LocalPeer(path, what=what)
