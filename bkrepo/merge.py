"""Three-way merge of trees, by file identity.

Files are matched by root key, not path, so a rename on one side and an edit on the other
merge cleanly.  For each file changed on either side since the merge base:

* changed on one side only: that side wins;
* changed the same way on both: nothing to do;
* otherwise path, mode and content merge separately — each takes the side that changed it;
  text changed on both sides merges by hunks (``merge3``, Bazaar's algorithm); overlapping
  hunks, binary or BAM content changed on both sides, edit vs delete, and two different
  renames are conflicts.

Two different files ending at one path (both sides added ``foo``; or a file where the other
side made a directory) are conflicts too.  ``resolve='ours'|'theirs'`` settles every conflict
for that side (the losing file of a path clash is removed; its history stays).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import merge3

from bkrepo import objects as ob
from bkrepo import trees
from bkrepo.ids import ObjectId
from bkrepo.store import Txn

State = tuple[bytes, ob.TreeEntry] | None  # (path, entry), or None when absent


@dataclass
class MergeResult:
    tree: ObjectId | None
    conflicts: list[str] = field(default_factory=list)
    merged_text: list[str] = field(default_factory=list)


def _side_states(changes: list[trees.Change]) -> tuple[dict[bytes, State], dict[bytes, State]]:
    """Per root key touched by one diff: its base state and its state on that side."""
    base: dict[bytes, State] = {}
    side: dict[bytes, State] = {}
    for path, old, new in changes:
        if old is not None and old.kind != ob.K_COMP:
            base[old.rootkey] = (path, old)
            side.setdefault(old.rootkey, None)
        if new is not None and new.kind != ob.K_COMP:
            side[new.rootkey] = (path, new)
    return base, side


def _pick(b: object, o: object, t: object) -> tuple[object, bool]:
    """Three-way choice of one attribute: (value, conflicted)."""
    if o == t:
        return o, False
    if o == b:
        return t, False
    if t == b:
        return o, False
    return o, True


def _merge_text(txn: Txn, b: ob.TreeEntry, o: ob.TreeEntry, t: ob.TreeEntry) -> bytes | None:
    if not (b.kind == o.kind == t.kind == ob.K_FILE):
        return None
    base, ours, theirs = txn.blob(b.id), txn.blob(o.id), txn.blob(t.id)
    if b"\0" in base or b"\0" in ours or b"\0" in theirs:
        return None
    m = merge3.Merge3(
        base.splitlines(keepends=True),
        ours.splitlines(keepends=True),
        theirs.splitlines(keepends=True),
    )
    if any(region[0] == "conflict" for region in m.merge_regions()):
        return None
    return b"".join(m.merge_lines())


CompMerge = Callable[[bytes, ob.TreeEntry, ob.TreeEntry], ob.TreeEntry | None]


def merge_trees(
    txn: Txn,
    base: ObjectId | None,
    ours: ObjectId | None,
    theirs: ObjectId | None,
    now: int,
    resolve: str | None = None,
    components: CompMerge | None = None,
) -> MergeResult:
    """Merge ``theirs`` into ``ours``; writes merged blobs and trees into ``txn``.

    A product's component entries merge like this: the side that moved a component wins; when
    both did, ``components(path, ours, theirs)`` names the entry that joins them (the
    component's own merge), or None: a conflict on that component."""
    diff_o = list(trees.diff(txn, base, ours))
    diff_t = list(trees.diff(txn, base, theirs))
    base_o, side_o = _side_states(diff_o)
    base_t, side_t = _side_states(diff_t)
    base_all = {**base_o, **base_t}
    result = MergeResult(None)
    edits: dict[bytes, ob.TreeEntry | None] = {}
    claimed: dict[bytes, bytes] = {}  # path -> root key placed there by this merge
    origins: dict[bytes, State] = {}  # root key -> its state in ours, for undoing a placement
    relocated: set[bytes] = set()  # root keys this merge moves away from their place in ours

    for rk in sorted(side_o.keys() | side_t.keys()):
        b = base_all.get(rk)
        o = side_o.get(rk, b) if rk in side_o else b
        t = side_t.get(rk, b) if rk in side_t else b
        if rk not in side_t or _same(o, t):
            continue  # ours already holds the answer
        final: State
        conflict = False
        if rk not in side_o:
            final = t
        elif o is None or t is None or b is None:
            final, conflict = (o, True)  # edit vs delete (or an impossible double add)
        else:
            path, c1 = _pick(b[0], o[0], t[0])
            mode, c2 = _pick(b[1].mode, o[1].mode, t[1].mode)
            content, c3 = _pick((b[1].kind, b[1].id), (o[1].kind, o[1].id), (t[1].kind, t[1].id))
            entry = o[1] if content == (o[1].kind, o[1].id) else t[1]
            if c3:
                merged = _merge_text(txn, b[1], o[1], t[1])
                if merged is None:
                    conflict = True
                else:
                    bid = txn.put_object(ob.BLOB, merged)
                    entry = ob.TreeEntry(b"", ob.K_FILE, o[1].mode, len(merged), now, rk, bid)
                    result.merged_text.append(os.fsdecode(path))  # type: ignore[arg-type]
            conflict = conflict or c1 or c2
            final = (path, entry._replace(mode=mode))  # type: ignore[arg-type]
        if conflict:
            name = os.fsdecode((o or t or b)[0])  # type: ignore[index]
            if resolve is None:
                result.conflicts.append(name)
                continue
            if resolve == "ours":
                continue
            final = t
        if o is not None and (final is None or final[0] != o[0]):
            edits.setdefault(o[0], None)
            relocated.add(rk)
        if final is not None:
            edits[final[0]] = final[1]
            claimed[final[0]] = rk
            origins[rk] = o

    _merge_components(diff_o, diff_t, components, edits, result)
    _check_paths(txn, ours, edits, claimed, origins, relocated, resolve, result)
    if result.conflicts:
        return result
    result.tree = trees.apply_edits(txn, ours, edits)
    return result


def _merge_components(
    diff_o: list[trees.Change],
    diff_t: list[trees.Change],
    components: CompMerge | None,
    edits: dict[bytes, ob.TreeEntry | None],
    result: MergeResult,
) -> None:
    ours = {p: new for p, _old, new in diff_o if new is not None and new.kind == ob.K_COMP}
    for path, _old, t in diff_t:
        if t is None or t.kind != ob.K_COMP:
            continue
        o = ours.get(path)
        if o is None or o.id == t.id:
            edits[path] = t  # only their side moved it
            continue
        joined = components(path, o, t) if components is not None else None
        if joined is None:
            result.conflicts.append(os.fsdecode(path.removesuffix(b"/.bk")) + " (component)")
        elif joined.id != o.id:
            edits[path] = joined


def _same(a: State, b: State) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[1].same_content(b[1])


def _check_paths(
    txn: Txn,
    ours: ObjectId | None,
    edits: dict[bytes, ob.TreeEntry | None],
    claimed: dict[bytes, bytes],
    origins: dict[bytes, State],
    relocated: set[bytes],
    resolve: str | None,
    result: MergeResult,
) -> None:
    """Find files this merge places where another file of ours stays, or where a file of ours
    stays in the way of a directory (or a directory of ours in the way of a file)."""
    if ours is None:
        return
    for path, rk in list(claimed.items()):
        in_way: list[bytes] = []
        here = trees.lookup(txn, ours, path)
        if here is not None and here.kind == ob.K_DIR:
            in_way += [
                p for p, e in trees.walk(txn, here.id, path + b"/") if e.rootkey not in relocated
            ]
        elif here is not None and here.rootkey != rk and here.rootkey not in relocated:
            in_way.append(path)
        parent = path.rpartition(b"/")[0]
        while parent:
            e = trees.lookup(txn, ours, parent)
            if e is not None and e.kind != ob.K_DIR and e.rootkey not in relocated:
                in_way.append(parent)
            parent = parent.rpartition(b"/")[0]
        if not in_way:
            continue
        if resolve is None:
            result.conflicts.append(os.fsdecode(path))
        elif resolve == "ours":
            edits.pop(path, None)  # their file does not come in; ours stays as it was
            origin = origins.get(rk)
            if origin is not None:
                edits.pop(origin[0], None)
        else:
            for p in in_way:
                if p != path:
                    edits[p] = None  # theirs wins: our file in the way goes
