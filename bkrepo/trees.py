"""Operations on per-directory tree objects: look up, walk, diff, and edit.

Trees are stored one directory per object, so every operation here costs what it visits:
equal subtrees share an id and are skipped by :func:`diff`, and :func:`apply_edits` rewrites
only the directories on the paths it changes.  Paths are ``/``-separated bytes relative to
the repository root.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from bkrepo import objects as ob
from bkrepo.ids import ObjectId
from bkrepo.store import Txn

Change = tuple[bytes, ob.TreeEntry | None, ob.TreeEntry | None]
DIR_MODE = 0o755


def empty_tree(txn: Txn) -> ObjectId:
    return txn.put_object(ob.TREE, ob.encode_tree([]))


def _entries(txn: Txn, tree_id: bytes | None) -> dict[bytes, ob.TreeEntry]:
    """A tree's entries by name; shared, read-only (callers copy before changing)."""
    if tree_id is None:
        return {}
    return txn.tree_map(tree_id)


def lookup(txn: Txn, root: bytes, path: bytes) -> ob.TreeEntry | None:
    """The entry at ``path`` (file, link, BAM file, component or directory), or None."""
    tree_id: bytes | None = root
    parts = path.split(b"/")
    for i, part in enumerate(parts):
        if tree_id is None:
            return None
        entry = _entries(txn, tree_id).get(part)
        if entry is None:
            return None
        if i == len(parts) - 1:
            return entry
        tree_id = entry.id if entry.kind == ob.K_DIR else None
    return None


def walk(txn: Txn, tree_id: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, ob.TreeEntry]]:
    """Every non-directory entry under a tree, in path order."""
    for e in txn.tree(tree_id):
        path = prefix + e.name
        if e.kind == ob.K_DIR:
            yield from walk(txn, e.id, path + b"/")
        else:
            yield path, e


def flatten(txn: Txn, tree_id: bytes) -> dict[bytes, ob.TreeEntry]:
    return dict(walk(txn, tree_id))


def walk_under(txn: Txn, root: bytes, path: bytes) -> Iterator[tuple[bytes, ob.TreeEntry]]:
    """Entries at or under ``path`` (a file or a directory); ``b''`` means the whole tree."""
    if not path:
        yield from walk(txn, root)
        return
    entry = lookup(txn, root, path)
    if entry is None:
        return
    if entry.kind == ob.K_DIR:
        yield from walk(txn, entry.id, path + b"/")
    else:
        yield path, entry


def diff(txn: Txn, a: bytes | None, b: bytes | None, prefix: bytes = b"") -> Iterator[Change]:
    """Leaf-level differences ``(path, old, new)`` from tree ``a`` to tree ``b``.

    Subtrees with equal ids are skipped without being read, so the cost follows the change.
    """
    if a == b:
        return
    ea_map, eb_map = _entries(txn, a), _entries(txn, b)
    for name in sorted(ea_map.keys() | eb_map.keys()):
        ea, eb = ea_map.get(name), eb_map.get(name)
        if ea == eb:
            continue
        path = prefix + name
        da = ea if ea is not None and ea.kind == ob.K_DIR else None
        db = eb if eb is not None and eb.kind == ob.K_DIR else None
        if da is None and db is None:
            yield path, ea, eb
            continue
        if ea is not None and da is None:
            yield path, ea, None
        yield from diff(txn, da.id if da else None, db.id if db else None, path + b"/")
        if eb is not None and db is None:
            yield path, None, eb


def apply_edits(
    txn: Txn, root: bytes | None, edits: Mapping[bytes, ob.TreeEntry | None]
) -> ObjectId:
    """A new root tree: ``root`` with each path set to an entry (its name is replaced by the
    last path component) or removed (None).  Directories left empty disappear; a directory's
    mtime is the newest mtime below it.  The caller makes sure no path is both a file and a
    directory in the result (remove the file in the same edit set that creates the directory).
    """
    new_id = _edit(txn, root, edits)[0]
    return new_id if new_id is not None else empty_tree(txn)


def _edit(
    txn: Txn, tree_id: bytes | None, edits: Mapping[bytes, ob.TreeEntry | None]
) -> tuple[ObjectId | None, int]:
    orig = _entries(txn, tree_id)
    entries = dict(orig)
    below: dict[bytes, dict[bytes, ob.TreeEntry | None]] = {}
    for path, entry in edits.items():
        head, sep, rest = path.partition(b"/")
        if sep:
            below.setdefault(head, {})[rest] = entry
        elif entry is None:
            entries.pop(head, None)
        else:
            entries[head] = entry._replace(name=head)
    for name, sub in below.items():
        cur = entries.get(name)
        base = cur.id if cur is not None and cur.kind == ob.K_DIR else None
        sub_id, mtime = _edit(txn, base, sub)
        if sub_id is None:
            if cur is not None and cur.kind == ob.K_DIR:
                del entries[name]
        else:
            entries[name] = ob.TreeEntry(name, ob.K_DIR, DIR_MODE, 0, mtime, b"", sub_id)
    if not entries:
        return None, 0
    mtime = max(e.mtime for e in entries.values())
    if tree_id is not None and entries == orig:
        return ObjectId(bytes(tree_id)), mtime
    return txn.put_tree(list(entries.values())), mtime


def build(txn: Txn, leaves: Mapping[bytes, ob.TreeEntry]) -> ObjectId:
    """A tree from scratch holding exactly ``leaves``."""
    return apply_edits(txn, None, dict(leaves))
