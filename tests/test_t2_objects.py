"""Properties of history objects and tree operations (hypothesis): encodings round-trip, ids
are the same in every process, and the incremental tree operations agree with full walks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bkrepo import objects as ob
from bkrepo import trees
from bkrepo.store import Store, Txn

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.binary(min_size=1, max_size=12)
leaf_kinds = st.sampled_from(ob.LEAF_KINDS)
entry_fields = st.tuples(
    leaf_kinds,
    st.sampled_from([0o644, 0o755, 0o777, 0o600]),
    st.integers(min_value=0, max_value=2**53),
    st.integers(min_value=0, max_value=2**40),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=32, max_size=32),
)


def entry(name: bytes, f: tuple[str, int, int, int, bytes, bytes]) -> ob.TreeEntry:
    return ob.TreeEntry(name, *f)


tree_entries = st.dictionaries(names, entry_fields, max_size=12).map(
    lambda d: [entry(n, f) for n, f in d.items()]
)


# -- encodings -------------------------------------------------------------------------------------
@SETTINGS
@given(tree_entries)
def test_tree_roundtrip_with_any_byte_names(entries: list[ob.TreeEntry]) -> None:
    payload = ob.encode_tree(entries)
    payload.decode("ascii")  # canonical: pure ASCII whatever the names
    assert ob.decode_tree(payload) == sorted(entries, key=lambda e: e.name)
    assert ob.encode_tree(list(reversed(entries))) == payload  # order does not matter


def test_non_utf8_names_survive() -> None:
    names_ = [b"\xff\xfe", b"caf\xc3\xa9", b"\xed\xa0\x80", b"a\x00b", b"\x80", b"\\u0041"]
    es = [ob.TreeEntry(n, ob.K_FILE, 0o644, 1, 2, bytes(16), bytes(32)) for n in names_]
    assert sorted(e.name for e in ob.decode_tree(ob.encode_tree(es))) == sorted(names_)


csets = st.builds(
    ob.Cset,
    parents=st.lists(st.binary(min_size=32, max_size=32), max_size=3).map(tuple),
    tree=st.binary(min_size=32, max_size=32),
    author=st.text(),
    time=st.integers(min_value=0, max_value=2**40),
    comment=st.text(),
)
tags = st.builds(
    ob.Tag,
    name=st.text(min_size=1),
    target=st.binary(min_size=32, max_size=32),
    author=st.text(),
    time=st.integers(min_value=0, max_value=2**40),
)
pointers = st.builds(
    ob.BamPointer,
    oid=st.binary(min_size=32, max_size=32),
    size=st.integers(min_value=0, max_value=2**50),
    chunk_size=st.integers(min_value=1, max_value=2**30),
    chunks=st.binary(min_size=32, max_size=32),
)


@SETTINGS
@given(csets, tags, pointers)
def test_cset_tag_pointer_roundtrip(c: ob.Cset, t: ob.Tag, p: ob.BamPointer) -> None:
    assert ob.Cset.decode(c.encode()) == c
    assert ob.Tag.decode(t.encode()) == t
    assert ob.BamPointer.decode(p.encode()) == p
    for payload in (c.encode(), t.encode(), p.encode()):
        payload.decode("ascii")


def test_object_id_scheme() -> None:
    """Ids are SHA-256 over 'kind length NUL payload' (git's scheme with SHA-256)."""
    assert ob.obj_id(ob.BLOB, b"hello") == hashlib.sha256(b"blob 5\0hello").digest()
    assert ob.obj_id(ob.TREE, b"[]") == hashlib.sha256(b"tree 2\0[]").digest()
    assert ob.obj_id(ob.BLOB, b"x") != ob.obj_id(ob.TREE, b"x")


# -- ids across processes --------------------------------------------------------------------------
CHILD = """
import json, sys
from bkrepo import objects as ob
out = []
for item in json.load(sys.stdin):
    if item["kind"] == "tree":
        es = [ob.TreeEntry(bytes.fromhex(n), k, m, s, t, bytes.fromhex(r), bytes.fromhex(i))
              for n, k, m, s, t, r, i in reversed(item["entries"])]
        out.append(ob.obj_id(ob.TREE, ob.encode_tree(es)).hex())
    else:
        c = ob.Cset(tuple(bytes.fromhex(p) for p in item["parents"]), bytes.fromhex(item["tree"]),
                    item["author"], item["time"], item["comment"])
        out.append(ob.obj_id(ob.CSET, c.encode()).hex())
print(json.dumps(out))
"""


@settings(max_examples=4, deadline=None)
@given(st.lists(tree_entries, min_size=1, max_size=15), st.lists(csets, min_size=1, max_size=15))
def test_ids_stable_across_processes(
    tree_list: list[list[ob.TreeEntry]], cset_list: list[ob.Cset]
) -> None:
    items: list[dict[str, object]] = []
    expected = []
    for es in tree_list:
        items.append(
            {
                "kind": "tree",
                "entries": [
                    [e.name.hex(), e.kind, e.mode, e.size, e.mtime, e.rootkey.hex(), e.id.hex()]
                    for e in es
                ],
            }
        )
        expected.append(ob.obj_id(ob.TREE, ob.encode_tree(es)).hex())
    for c in cset_list:
        items.append(
            {
                "kind": "cset",
                "parents": [p.hex() for p in c.parents],
                "tree": c.tree.hex(),
                "author": c.author,
                "time": c.time,
                "comment": c.comment,
            }
        )
        expected.append(ob.obj_id(ob.CSET, c.encode()).hex())
    env = {**os.environ, "PYTHONHASHSEED": "12345", "LANG": "C", "LC_ALL": "C"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(p.stdout) == expected


# -- tree operations -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(tmp_path_factory.mktemp("treestore") / "db", create=True)
    yield s
    s.close()


@contextmanager
def scratch(store: Store) -> Iterator[Txn]:
    """A write transaction that is thrown away (objects are content addressed: nothing to keep)."""
    txn = store.env.begin(write=True)
    try:
        yield Txn(txn, store.dbs)
    finally:
        txn.abort()


components = st.sampled_from([b"a", b"b", b"c", b"\xff", b"d d"])
paths = st.lists(components, min_size=1, max_size=4).map(lambda parts: b"/".join(parts))


def consistent(leaves: dict[bytes, ob.TreeEntry]) -> dict[bytes, ob.TreeEntry]:
    """Drop paths that sit below another leaf (a path cannot be a file and a directory)."""
    out: dict[bytes, ob.TreeEntry] = {}
    for p in sorted(leaves, key=lambda p: p.count(b"/")):
        parts = p.split(b"/")
        if any(b"/".join(parts[:i]) in out for i in range(1, len(parts))):
            continue
        if any(q.startswith(p + b"/") for q in out):
            continue
        out[p] = leaves[p]
    return out


leaf_maps = st.dictionaries(paths, entry_fields, max_size=14).map(
    lambda d: consistent({p: entry(p.rsplit(b"/", 1)[-1], f) for p, f in d.items()})
)


@SETTINGS
@given(leaf_maps, leaf_maps)
def test_diff_equals_difference_of_full_walks(
    store: Store, a: dict[bytes, ob.TreeEntry], b: dict[bytes, ob.TreeEntry]
) -> None:
    with scratch(store) as txn:
        ta, tb = trees.build(txn, a), trees.build(txn, b)
        assert trees.flatten(txn, ta) == a
        assert trees.flatten(txn, tb) == b
        expected = {(p, a.get(p), b.get(p)) for p in a.keys() | b.keys() if a.get(p) != b.get(p)}
        got = list(trees.diff(txn, ta, tb))
        assert len(got) == len(set(got))
        assert set(got) == expected
        assert list(trees.diff(txn, ta, ta)) == []
        # from and to nothing
        assert {c[0] for c in trees.diff(txn, None, tb)} == set(b)
        for p, e in b.items():
            assert trees.lookup(txn, tb, p) == e


@SETTINGS
@given(leaf_maps, leaf_maps, st.lists(paths, max_size=5))
def test_apply_edits_equals_building_from_scratch(
    store: Store,
    a: dict[bytes, ob.TreeEntry],
    b: dict[bytes, ob.TreeEntry],
    noise: list[bytes],
) -> None:
    edits: dict[bytes, ob.TreeEntry | None] = {p: e for p, e in b.items() if a.get(p) != e}
    edits.update({p: None for p in a if p not in b})
    for p in noise:  # removing paths that do not exist changes nothing
        if not any(q == p or q.startswith(p + b"/") for q in (*a, *b)):
            edits[p] = None
    with scratch(store) as txn:
        ta = trees.build(txn, a)
        tb = trees.apply_edits(txn, ta, edits)
        assert tb == trees.build(txn, b)
        assert trees.flatten(txn, tb) == b
        assert trees.apply_edits(txn, ta, {}) == ta


def test_empty_tree_has_one_id(store: Store) -> None:
    with scratch(store) as txn:
        e = trees.empty_tree(txn)
        assert trees.build(txn, {}) == e
        leaf = ob.TreeEntry(b"x", ob.K_FILE, 0o644, 1, 5, bytes(16), bytes(32))
        t = trees.build(txn, {b"d/x": leaf})
        assert trees.apply_edits(txn, t, {b"d/x": None}) == e
