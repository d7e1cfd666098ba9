"""Moving history between repositories, whatever the transport.

The sender side (:func:`fetch_records`) answers "I have these csets; send me what leads to
WANT": it walks back from WANT to what the receiver has and streams the missing csets' new
objects, oldest first.  The receiver side (:func:`stage`, :func:`validate`, :func:`integrate`)
stores the objects (ids computed from the bytes), checks the history is complete, then
fast-forwards or merges in one transaction and updates the working tree through the journal.

A pull that meets conflicts, a push the target must refuse, or a failure anywhere before the
final transaction leaves the receiver's history, tip, index and files as they were; objects it
had already stored are deleted again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from bkrepo import bamflow, dag
from bkrepo import objects as ob
from bkrepo.bundle import BamRecord, Header, Record, history_records, introduced
from bkrepo.errors import (
    BundleError,
    ForeignProject,
    MergeConflict,
    ObjectMissing,
    PullFirst,
    RepoError,
)
from bkrepo.ids import ObjectId, Oid
from bkrepo.merge import CompMerge, merge_trees
from bkrepo.repo import Repo
from bkrepo.store import Txn
from bkrepo.worktree import (
    WorkState,
    begin_update,
    fetch_bam_for,
    plan_update,
    run_update,
    update_writes,
)

STAGE_BATCH_BYTES = 32 << 20


# -- sender ------------------------------------------------------------------------------------
def fetch_records(
    repo: Repo, want: ObjectId | None, have: Iterable[ObjectId], have_tags: Iterable[ObjectId]
) -> Iterator[Record]:
    """Header + objects that bring a repo holding ``have`` up to ``want`` (and its tags)."""
    return _records(repo, [want] if want is not None else [], have, have_tags, with_tags=True)


def history_of(repo: Repo, heads: Iterable[ObjectId]) -> Iterator[Record]:
    """Header + objects of every cset up to ``heads`` (no tags, no tip): the part of a
    baseline clone that comes from the local baseline."""
    return _records(repo, list(heads), [], [], with_tags=False)


def _records(
    repo: Repo,
    wants: list[ObjectId],
    have: Iterable[ObjectId],
    have_tags: Iterable[ObjectId],
    *,
    with_tags: bool,
) -> Iterator[Record]:
    with repo.store.read() as txn:
        graph = repo.graph(txn)
        common = dag.ancestors(graph, [h for h in have if h in graph])
        wanted = dag.ancestors(graph, wants)
        send = dag.oldest_first(graph, wanted - common)
        final = common | wanted
        have_t = set(have_tags)
        tags = []
        if with_tags:
            tags = [
                tid
                for tid, tag in repo.tag_objects(txn)
                if tid not in have_t and tag.target in final
            ]
        needs = sorted({p for k in send for p in graph[k][2] if p not in wanted - common})
        yield Header(
            project=repo.project_id,
            tip=wants[0].hex() if len(wants) == 1 and with_tags else None,
            csets=[k.hex() for k in send],
            tags=[t.hex() for t in tags],
            needs=[n.hex() for n in needs],
        )
        yield from history_records(txn, send, tags)


def prepare_send(
    repo: Repo, want: ObjectId | None, have: list[ObjectId], receiver: str | None
) -> None:
    """Invariant 3, sending side: before csets leave, their BAM data goes to our own server
    (unless the receiver *is* that server: it will take the data from us instead)."""
    records = fetch_records(repo, want, have, [])
    header = next(records)
    records.close()
    assert isinstance(header, Header)
    with repo.store.read() as txn:
        oids = bam_oids_for(repo, txn, [ObjectId(bytes.fromhex(k)) for k in header.csets])
    bamflow.push_to_server(repo, oids, "send", skip_id=receiver)


def bam_oids_for(repo: Repo, txn: Txn, csets: Iterable[ObjectId]) -> set[Oid]:
    """BAM objects that the deltas of these csets use."""
    out: set[Oid] = set()
    for k in csets:
        out.update(repo.bam_oids_of(txn, txn.cset(k)))
    return out


# -- receiver ----------------------------------------------------------------------------------
@dataclass
class Staged:
    """History received and stored but not yet part of the repository."""

    header: Header
    csets: list[ObjectId]
    tags: list[ObjectId]
    inserted: list[bytes] = field(default_factory=list)
    bam_received: list[Oid] = field(default_factory=list)  # installed in the pool by this stage
    adopted_from: str | None = None  # the project id before ``adopt`` took the incoming one

    @property
    def tip(self) -> ObjectId | None:
        return ObjectId(bytes.fromhex(self.header.tip)) if self.header.tip else None


def stage(repo: Repo, records: Iterable[Record], *, source: str, adopt: bool = False) -> Staged:
    """Store incoming objects (in batches) and BAM data; nothing becomes visible yet.

    ``adopt``: a repository with no csets yet takes the project id of what it receives
    (``receive`` of a bundle into a fresh ``init``); it is recorded by :func:`integrate`, so a
    failed transfer leaves the old one."""
    it = iter(records)
    header = next(it, None)
    if not isinstance(header, Header):
        raise BundleError(f"{source}: the stream does not start with a header")
    adopted_from = None
    if adopt and header.project != repo.project_id:
        with repo.store.read() as txn:
            if txn.cset_count() == 0:
                adopted_from = repo.project_id
                repo.project_id = header.project
    check_same_project(repo, header.project, source)
    try:
        staged = Staged(
            header,
            [ObjectId(bytes.fromhex(k)) for k in header.csets],
            [ObjectId(bytes.fromhex(t)) for t in header.tags],
        )
    except ValueError as e:
        if adopted_from is not None:
            repo.project_id = adopted_from
        raise BundleError(f"{source}: bad key in header: {e}") from e
    staged.adopted_from = adopted_from
    batch: list[bytes] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not batch:
            return
        with repo.store.write() as txn:
            for raw in batch:
                oid = ob.obj_id(raw[:1], raw[1:])
                if txn.put_raw(oid, raw):
                    staged.inserted.append(oid)
        batch.clear()
        size = 0

    try:
        for rec in it:
            if isinstance(rec, bytes):
                batch.append(rec)
                size += len(rec)
                if size >= STAGE_BATCH_BYTES:
                    flush()
            elif isinstance(rec, BamRecord):
                had = repo.pool.has(rec.oid)
                repo.pool.receive(rec.oid, rec.stream, where=source)
                if not had:
                    staged.bam_received.append(rec.oid)
            else:
                raise BundleError(f"{source}: a second header in the stream")
        flush()
    except BaseException:
        discard(repo, staged)
        raise
    return staged


def discard(repo: Repo, staged: Staged) -> None:
    """Forget what a failed transfer stored: history objects, BAM data that came in the stream
    (unless history uses it), and an adopted project id."""
    if staged.adopted_from is not None:
        repo.project_id = staged.adopted_from
        staged.adopted_from = None
    if not staged.inserted and not staged.bam_received:
        return
    with repo.store.write() as txn:
        for oid in staged.inserted:
            if not txn.has_cset(oid):
                txn.delete_object(oid)
        unused = [o for o in staged.bam_received if not txn.index_values("bamidx", o)]
    for o in unused:
        repo.pool.remove(o)
    staged.inserted.clear()
    staged.bam_received.clear()


def validate(repo: Repo, txn: Txn, staged: Staged, source: str) -> dict[ObjectId, dag.Meta]:
    """Check the staged history is complete; return the DAG including the new csets."""
    graph = repo.graph(txn)
    missing_needs = [
        n
        for n in staged.header.needs
        if ObjectId(bytes.fromhex(n)) not in graph
        and ObjectId(bytes.fromhex(n)) not in staged.csets
    ]
    if missing_needs:
        raise BundleError(
            f"{source} builds on {len(missing_needs)} cset(s) this repository lacks "
            f"(first: {missing_needs[0][:12]}); pull them first"
        )
    seen: set[bytes] = set()
    for key in staged.csets:
        raw = txn.get_raw(key)
        if raw is None or raw[:1] != ob.CSET:
            raise BundleError(f"{source}: cset {key.hex()[:12]} is missing from the transfer")
        cset = ob.Cset.decode(raw[1:])
        if key in graph:
            continue
        gen = 1
        for p in cset.parents:
            if p not in graph:
                raise BundleError(
                    f"{source}: cset {key.hex()[:12]} has a parent that did not arrive"
                )
            gen = max(gen, graph[p][0] + 1)
        try:
            for oid in introduced(txn, cset, seen):
                if not txn.has_object(oid):
                    raise BundleError(
                        f"{source}: object {oid.hex()[:16]} of cset {key.hex()[:12]} did not arrive"
                    )
        except RepoError as e:  # a tree the walk needed is missing
            raise BundleError(f"{source}: incomplete history for cset {key.hex()[:12]}: {e}") from e
        graph[key] = (gen, cset.time, cset.parents)
    tip = staged.tip
    if tip is not None and tip not in graph:
        raise BundleError(f"{source}: the transfer does not contain its tip {tip.hex()[:12]}")
    return graph


@dataclass
class Outcome:
    kind: str  # "up-to-date", "fast-forward", "merge"
    new_csets: int
    tip: ObjectId | None
    merged_text: list[str] = field(default_factory=list)
    new_tags: int = 0


def integrate(
    repo: Repo,
    staged: Staged,
    *,
    what: str,
    source: str,
    resolve: str | None = None,
    ff_only: bool = False,
    ensure_bam: Callable[[set[Oid]], None] | None = None,
    update_tree: bool = True,
    components: CompMerge | None = None,
) -> Outcome:
    """Make staged history part of the repo (caller holds the lock).  On any refusal the
    staged objects are discarded and the repo is exactly as before.

    ``ensure_bam`` is called with the BAM objects the new csets use that are not in the local
    pool; it must make them present where the BAM invariants want them (the pool, or this
    repo's server) or raise.  Without it, every such object must already be in the pool.
    ``components`` joins a product's components in a merge (merge.py)."""
    try:
        return _integrate(
            repo, staged, what, source, resolve, ff_only, ensure_bam, update_tree, components
        )
    except BaseException:
        discard(repo, staged)
        raise


def _integrate(
    repo: Repo,
    staged: Staged,
    what: str,
    source: str,
    resolve: str | None,
    ff_only: bool,
    ensure_bam: Callable[[set[Oid]], None] | None,
    update_tree: bool,
    components: CompMerge | None,
) -> Outcome:
    with repo.store.read() as rtxn:
        known = set(repo.graph(rtxn))
        graph = validate(repo, rtxn, staged, source)
        state = WorkState.load(repo, rtxn)
        ours = repo.tip(rtxn)
        reach = dag.ancestors(graph, [staged.tip]) if staged.tip is not None else set()
        new = [k for k in dag.oldest_first(graph, staged.csets) if k not in known and k in reach]
        needed = bam_oids_for(repo, rtxn, new)
    theirs = staged.tip
    missing = {o for o in needed if not repo.pool.has(o)}
    if missing:
        if ensure_bam is None:
            raise ObjectMissing(
                f"{what}: {len(missing)} BAM object(s) needed by the incoming csets are not "
                f"available from {source}"
            )
        ensure_bam(missing)
    with repo.store.write() as txn:
        merged_text: list[str] = []
        if theirs is None or (ours is not None and dag.is_ancestor(graph, theirs, ours)):
            kind, target, new_tree = "up-to-date", ours, state.tree
        elif ours is None or dag.is_ancestor(graph, ours, theirs):
            kind, target = "fast-forward", theirs
            new_tree = txn.cset(theirs).tree
        else:
            if ff_only:
                raise PullFirst(
                    f"{what}: the target has csets this repository lacks; pull first, then push"
                )
            base = dag.merge_base(graph, ours, theirs)
            base_tree = txn.cset(base).tree if base is not None else None
            now = repo.now()
            result = merge_trees(
                txn, base_tree, txn.cset(ours).tree, txn.cset(theirs).tree, now, resolve, components
            )
            if result.conflicts:
                raise MergeConflict(what, result.conflicts)
            merged_text = result.merged_text
            new_tree = result.tree
            assert new_tree is not None
            mc = ob.Cset(
                parents=(ours, theirs),
                tree=new_tree,
                author=repo.author(),
                time=now,
                comment=f"Merge {source}",
            )
            target = txn.put_object(ob.CSET, mc.encode())
            kind = "merge"
        plan = plan_update(repo, txn, state, new_tree, what) if update_tree else None
        if plan is not None:  # fetch what the update will write now, before the tip moves
            checkout_new = repo.config_value("checkout", txn) == "get"
            fetch_bam_for(repo, txn, update_writes(repo, state, plan, checkout_new), what)
        for k in new:
            repo.record_cset(txn, k, txn.cset(k))
        if kind == "merge":
            assert target is not None
            repo.record_cset(txn, target, txn.cset(target))
        tag_count = 0
        have_tags = set(txn.tag_ids())
        final_graph_has = txn.has_cset
        for tid in staged.tags:
            raw = txn.get_raw(tid)
            if raw is None or raw[:1] != ob.TAG or tid in have_tags:
                continue
            if final_graph_has(ob.Tag.decode(raw[1:]).target):
                txn.put("tags", tid, b"")
                tag_count += 1
        if target is not None:
            txn.set_meta("tip", target.hex())
        if staged.adopted_from is not None:
            txn.set_meta("project_id", repo.project_id)
        if plan is not None and plan.changes:
            begin_update(txn, plan)
        elif plan is not None:
            state.save(txn, new_tree)
    staged.inserted.clear()  # they belong to the repo now
    staged.bam_received.clear()
    staged.adopted_from = None
    if plan is not None and plan.changes:
        run_update(repo, plan, state)
    return Outcome(kind, len(new) + (kind == "merge"), target, merged_text, tag_count)


# -- helpers for the commands ------------------------------------------------------------------
def check_same_project(repo: Repo, project: str, source: str) -> None:
    if project != repo.project_id:
        raise ForeignProject(
            f"{source} is a different project (project id {project[:12]}…, this repository has "
            f"{repo.project_id[:12]}…); sync works only between clones of one project"
        )


def describe(outcome: Outcome) -> str:
    if outcome.kind == "up-to-date":
        extra = f", {outcome.new_tags} new tag(s)" if outcome.new_tags else ""
        return f"already up to date{extra}"
    tip = outcome.tip.hex()[:12] if outcome.tip else "-"
    msg = f"{outcome.kind}: {outcome.new_csets} new cset(s), tip {tip}"
    if outcome.merged_text:
        msg += f"; merged text in {', '.join(outcome.merged_text[:5])}"
    return msg
