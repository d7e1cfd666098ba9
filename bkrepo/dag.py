"""Graph questions about the cset DAG, answered from the ``csets`` table alone.

The table gives each cset its generation number (1 + the largest of its parents'), its time
and its parents, so these walks never decode cset objects.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping

from bkrepo.ids import ObjectId

Meta = tuple[int, int, tuple[ObjectId, ...]]  # generation, time, parents
Graph = Mapping[ObjectId, Meta]


def ancestors(graph: Graph, heads: Iterable[ObjectId]) -> set[ObjectId]:
    """Every cset reachable from ``heads``, heads included (unknown heads are ignored)."""
    seen: set[ObjectId] = set()
    stack = [h for h in heads if h in graph]
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        stack.extend(p for p in graph[k][2] if p not in seen)
    return seen


def newest_first(graph: Graph, keys: Iterable[ObjectId]) -> list[ObjectId]:
    """A topological order, children before parents: generation, then time, then key, descending."""
    return sorted(keys, key=lambda k: (graph[k][0], graph[k][1], k), reverse=True)


def oldest_first(graph: Graph, keys: Iterable[ObjectId]) -> list[ObjectId]:
    """Parents before children (the order in which csets can be applied)."""
    return sorted(keys, key=lambda k: (graph[k][0], graph[k][1], k))


def walk_newest_first(graph: Graph, head: ObjectId) -> Iterator[ObjectId]:
    """Ancestors of ``head`` lazily, newest first (for ``log`` on long histories)."""
    heap = [(-graph[head][0], -graph[head][1], head)]
    seen = {head}
    while heap:
        _, _, k = heapq.heappop(heap)
        yield k
        for p in graph[k][2]:
            if p not in seen and p in graph:
                seen.add(p)
                heapq.heappush(heap, (-graph[p][0], -graph[p][1], p))


def is_ancestor(graph: Graph, a: ObjectId, b: ObjectId) -> bool:
    """True if ``a`` is ``b`` or one of its ancestors (generation numbers prune the walk)."""
    if a == b:
        return True
    ga = graph[a][0]
    seen: set[ObjectId] = set()
    stack = [b]
    while stack:
        k = stack.pop()
        for p in graph[k][2]:
            if p == a:
                return True
            if p not in seen and p in graph and graph[p][0] > ga:
                seen.add(p)
                stack.append(p)
    return False


def merge_base(graph: Graph, a: ObjectId, b: ObjectId) -> ObjectId | None:
    """The best common ancestor of ``a`` and ``b``: the newest among their common ancestors
    that is not an ancestor of another common ancestor (ties broken by time, then key)."""
    common = ancestors(graph, [a]) & ancestors(graph, [b])
    if not common:
        return None
    best = newest_first(graph, common)
    return best[0]


def heads(graph: Graph, keys: set[ObjectId]) -> list[ObjectId]:
    """Members of ``keys`` that are no parent of another member."""
    parents = {p for k in keys for p in graph[k][2]}
    return sorted(k for k in keys if k not in parents)


def descendants(graph: Graph, root: ObjectId, within: set[ObjectId]) -> set[ObjectId]:
    """``root`` and every member of ``within`` that has it as an ancestor."""
    out = {root}
    for k in oldest_first(graph, within):
        if k != root and any(p in out for p in graph[k][2]):
            out.add(k)
    return out
