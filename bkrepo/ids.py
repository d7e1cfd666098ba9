"""Identifiers: object ids, cset keys, root keys, BAM object ids, repo and project ids.

Internally ids are raw bytes (fast to compare, compact in LMDB keys); they are shown and
serialised as lowercase hex.  Everything that turns user or network input into an id goes
through the ``parse_*`` functions here, which validate before anything builds a path or a key.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import NewType

from bkrepo.errors import UsageError

#: SHA-256 of an object's canonical encoding (trees, blobs, csets, ...); a cset's key is its id.
ObjectId = NewType("ObjectId", bytes)
#: SHA-256 of a BAM file's bytes, exactly as Git LFS names objects.
Oid = NewType("Oid", bytes)
#: 16 random-derived bytes fixed when a file is added; survives renames.
RootKey = NewType("RootKey", bytes)

OBJECT_ID_LEN = 32
ROOT_KEY_LEN = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def object_id(kind: bytes, payload: bytes) -> ObjectId:
    """The id of an object: SHA-256 over a type/length header and the payload (git's scheme).

    The header keeps objects of different kinds with equal payloads distinct.
    """
    h = hashlib.sha256(b"%s %d\0" % (kind, len(payload)))
    h.update(payload)
    return ObjectId(h.digest())


def hexid(raw: bytes) -> str:
    return raw.hex()


def parse_object_id(text: str) -> ObjectId:
    if not _HEX64.fullmatch(text):
        raise ValueError(f"not an object id: {text!r}")
    return ObjectId(bytes.fromhex(text))


def parse_oid(text: object) -> Oid:
    """Validate a BAM object id (64 lowercase hex digits) from any untrusted source (JSON
    bodies can hold anything: a number or a list is refused like a bad string)."""
    if not isinstance(text, str) or not _HEX64.fullmatch(text):
        raise UsageError(f"bad BAM object id {text!r}: expected 64 lowercase hex digits")
    return Oid(bytes.fromhex(text))


def parse_root_key(text: str) -> RootKey:
    if not _HEX32.fullmatch(text):
        raise ValueError(f"not a root key: {text!r}")
    return RootKey(bytes.fromhex(text))


def new_random_id() -> str:
    """A fresh 128-bit id in hex, for project and repo ids."""
    return os.urandom(16).hex()


def new_root_key(project_id: str, path: bytes, seed: bytes) -> RootKey:
    """A file's identity: fixed at add, unique across clones (random bits), never recomputed."""
    h = hashlib.sha256(b"rootkey\0" + project_id.encode() + b"\0" + path + b"\0" + seed)
    h.update(os.urandom(16))
    return RootKey(h.digest()[:ROOT_KEY_LEN])
