"""``bkr``: the command line of the repo engine.

The only module that reads arguments, prints, and turns errors into exit codes: 0 success,
1 the operation failed, 2 usage error.  Failures print one line, ``bkr: <what>: <why>``.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from bkrepo import config as cfg
from bkrepo import progress
from bkrepo.errors import BkError, UsageError
from bkrepo.repo import Repo

Handler = Callable[[argparse.Namespace], int | None]


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(
            f"{self.prog.removeprefix('bkr ') if self.prog != 'bkr' else 'usage'}: "
            f"{message} (see '{self.prog} --help')"
        )


class Output:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# -- commands ----------------------------------------------------------------------------------
def cmd_init(a: argparse.Namespace) -> None:
    root = Path(a.dir or ".").absolute()
    threshold = "off" if a.no_bam else a.bam_threshold
    if threshold is not None:
        cfg.validate("bam.threshold", threshold)
    repo = Repo.init(root, bam_threshold=threshold)
    Output(a.quiet).info(f"initialized empty repository in {root}")
    repo.close()


def cmd_add(a: argparse.Namespace) -> None:
    from bkrepo import nested
    from bkrepo.commit import add

    bam = True if a.bam else (False if a.no_bam else None)
    with Repo.find() as repo:
        if nested.is_product(repo):
            added = nested.each(repo, a.paths, lambda r, ps: add(r, ps, bam=bam))
        else:
            added = add(repo, a.paths, bam=bam)
    out = Output(a.quiet)
    for p in added:
        out.info(f"A  {os.fsdecode(p)}")


def cmd_rm(a: argparse.Namespace) -> None:
    from bkrepo import nested
    from bkrepo.commit import rm

    with Repo.find() as repo:
        if nested.is_product(repo):
            removed = nested.each(
                repo, a.paths, lambda r, ps: rm(r, ps, force=a.force, keep=a.keep)
            )
        else:
            removed = rm(repo, a.paths, force=a.force, keep=a.keep)
    out = Output(a.quiet)
    for p in removed:
        out.info(f"D  {os.fsdecode(p)}")


def cmd_mv(a: argparse.Namespace) -> None:
    from bkrepo import nested
    from bkrepo.commit import mv

    with Repo.find() as repo:
        pairs = nested.mv(repo, a.src, a.dst) if nested.is_product(repo) else mv(repo, a.src, a.dst)
    out = Output(a.quiet)
    for old, new in pairs:
        out.info(f"R  {os.fsdecode(old)} -> {os.fsdecode(new)}")


def cmd_commit(a: argparse.Namespace) -> None:
    from bkrepo import nested
    from bkrepo.commit import commit

    with Repo.find() as repo:
        if nested.is_product(repo):
            result = nested.commit(repo, a.message, a.paths or None)
        else:
            result = commit(repo, a.message, a.paths or None)
    for w in result.warnings:
        print(f"bkr: warning: {w}", file=sys.stderr)
    Output(a.quiet).info(f"committed {result.key.hex()[:12]} ({len(result.changes)} file(s))")


def cmd_status(a: argparse.Namespace) -> int:
    from bkrepo import nested
    from bkrepo.worktree import WorkState, refresh_index, scan

    with Repo.find() as repo:
        if nested.is_product(repo):
            lines = nested.status(repo, a.paths, not a.no_untracked)
            if lines:
                sys.stdout.write("\n".join(lines) + "\n")
            return 0
        scope = [repo.relpath(p) for p in a.paths] or None
        with repo.store.read() as txn:
            state = WorkState.load(repo, txn)
            result = scan(repo, txn, state, scope, untracked=not a.no_untracked)
        refresh_index(repo, state, result)
    lines = [c.display() for c in result.changes]
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_log(a: argparse.Namespace) -> None:
    from bkrepo import history

    with Repo.find() as repo:
        if a.keys:
            keys = (
                history.history_keys(repo)
                if not a.rev and not a.path
                else [e.key for e in history.log(repo, a.rev, a.path)]
            )
            sys.stdout.write("".join(k.hex() + "\n" for k in keys))
            return
        out = sys.stdout
        for e in history.log(repo, a.rev, a.path, a.verbose):
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(e.cset.time))
            tags = f"  [{', '.join(e.tags)}]" if e.tags else ""
            merge = "  (merge)" if len(e.cset.parents) > 1 else ""
            out.write(f"cset {e.key.hex()[:12]}  {when}  {e.cset.author}{merge}{tags}\n")
            for line in e.cset.comment.splitlines() or [""]:
                out.write(f"    {line}\n")
            for f in e.files:
                out.write(f"      {f}\n")
            out.write("\n")


def cmd_diff(a: argparse.Namespace) -> None:
    from bkrepo import history, nested

    with Repo.find() as repo:
        lines = (
            nested.diff(repo, a.paths, a.rev)
            if nested.is_product(repo)
            else history.diff(repo, a.paths, a.rev)
        )
        for line in lines:
            sys.stdout.write(line)


def cmd_get(a: argparse.Namespace) -> None:
    from bkrepo import history, nested

    with Repo.find() as repo:
        if nested.is_product(repo):
            written = nested.get(repo, a.paths, a.rev, force=a.force, to_stdout=a.print)
        else:
            written = history.get(repo, a.paths, a.rev, force=a.force, to_stdout=a.print)
    if not a.print:
        Output(a.quiet).info(f"checked out {len(written)} file(s)")


def cmd_config(a: argparse.Namespace) -> None:
    with Repo.find() as repo:
        if a.list or a.key is None:
            with repo.store.read() as txn:
                values = txn.all_config()
            for k in sorted(cfg.KEYS):
                v = values.get(k)
                print(
                    f"{k}={v if v is not None else cfg.KEYS[k].default}"
                    + ("" if v is not None else "  (default)")
                )
            return
        if a.key not in cfg.KEYS:
            cfg.validate(a.key, "")
        if a.unset:
            with repo.locked("config"), repo.store.write() as txn:
                txn.set_config(a.key, None)
            return
        if a.value is None:
            print(repo.config_value(a.key))
            return
        cfg.validate(a.key, a.value)
        with repo.locked("config"), repo.store.write() as txn:
            txn.set_config(a.key, a.value)


def cmd_id(a: argparse.Namespace) -> None:
    with Repo.find() as repo:
        print(repo.repo_id if a.repo else repo.project_id)


def cmd_tag(a: argparse.Namespace) -> None:
    from bkrepo import history

    with Repo.find() as repo:
        if a.name is None:
            with repo.store.read() as txn:
                for name, key in sorted(repo.tags(txn).items()):
                    print(f"{name}\t{key.hex()[:12]}")
            return
        target = history.tag(repo, a.name, a.rev)
    Output(a.quiet).info(f"tagged {target.hex()[:12]} as {a.name}")


def cmd_undo(a: argparse.Namespace) -> None:
    from bkrepo import history, nested

    with Repo.find() as repo:
        if nested.is_product(repo):
            n, tip = nested.undo(repo, a.rev)
        else:
            n, tip = history.undo(repo, a.rev)
    Output(a.quiet).info(f"removed {n} cset(s); tip is now {tip.hex()[:12] if tip else '(empty)'}")


def cmd_parent(a: argparse.Namespace) -> None:
    from bkrepo.transport import is_url

    with Repo.find() as repo:
        if a.unset:
            with repo.locked("parent"), repo.store.write() as txn:
                txn.set_meta("parent", None)
            return
        if a.url is None:
            with repo.store.read() as txn:
                parent = txn.meta("parent")
            if parent:
                print(parent)
            return
        url = a.url if is_url(a.url) else os.path.abspath(a.url)
        with repo.locked("parent"), repo.store.write() as txn:
            txn.set_meta("parent", url)


def cmd_clone(a: argparse.Namespace) -> None:
    from bkrepo.transfer import clone

    start = time.monotonic()
    result = clone(
        a.src,
        a.dest,
        rev=a.rev,
        checkout=a.checkout,
        hardlink=not a.no_hardlinks,
        bam=a.bam_server,
        base=a.baseline,
        select=a.select,
    )
    for w in result.warnings:
        print(f"bkr: warning: {w}", file=sys.stderr)
    Output(a.quiet).info(f"cloned into {result.path} in {time.monotonic() - start:.1f}s")


def cmd_serve(a: argparse.Namespace) -> None:
    from bkrepo import malloc

    malloc.restart_on_huge_pages()  # a long-running server: its heap on huge pages
    from bkrepo.server.auth import Access
    from bkrepo.server.run import serve

    access = Access.from_file(Path(a.token_file) if a.token_file else None, a.anonymous)
    if (a.tls_cert is None) != (a.tls_key is None):
        raise UsageError("serve: --tls-cert and --tls-key go together")
    tls = (Path(a.tls_cert), Path(a.tls_key)) if a.tls_cert and a.tls_key else None
    config = Path(a.config) if a.config else None
    serve(Path(a.root).absolute(), a.host, a.port, access, quiet=a.quiet, tls=tls, config=config)


def _product(repo: Repo, what: str) -> None:
    from bkrepo import nested

    if not nested.is_product(repo):
        raise UsageError(
            f"{what}: {repo.root} is not a product (see 'bkr partition', 'bkr attach')"
        )


def cmd_comps(a: argparse.Namespace) -> None:
    from bkrepo import nested

    with Repo.find() as repo:
        _product(repo, "comps")
        rows = nested.listing(repo)
    for c in rows:
        if (a.here and not c.populated) or (a.missing and c.populated):
            continue
        if a.verbose:
            state = "here" if c.populated else "not here"
            extra = f", {c.ahead} cset(s) not yet in the product" if c.ahead else ""
            print(f"{os.fsdecode(c.path)}\t{state}{extra}")
        else:
            print(os.fsdecode(c.path))


def cmd_populate(a: argparse.Namespace) -> None:
    from bkrepo import nested

    with Repo.find() as repo:
        _product(repo, "populate")
        done = nested.populate(repo, a.names, extra_source=a.source)
    out = Output(a.quiet)
    for p in done:
        out.info(f"populated {os.fsdecode(p)}")
    if not done:
        out.info("populate: every named component is already here")


def cmd_unpopulate(a: argparse.Namespace) -> None:
    from bkrepo import nested

    with Repo.find() as repo:
        _product(repo, "unpopulate")
        done = nested.unpopulate(repo, a.names, force=a.force)
    out = Output(a.quiet)
    for p in done:
        out.info(f"unpopulated {os.fsdecode(p)}")


def cmd_attach(a: argparse.Namespace) -> None:
    from bkrepo import nested

    with Repo.find() as repo:
        _product(repo, "attach")
        key = nested.attach(repo, a.url, a.path, a.message)
    Output(a.quiet).info(f"attached {a.path}; product cset {key.hex()[:12]}")


def cmd_partition(a: argparse.Namespace) -> None:
    from bkrepo import partition

    if (a.components is None) == (a.reference is None):
        raise UsageError("partition: give exactly one of -C COMPONENTS and -@ URL")
    if a.reference is not None and a.prune is not None:
        raise UsageError("partition: -P cannot be combined with -@ (the reference decides)")
    start = time.monotonic()
    result = partition.partition(
        a.src,
        a.dest,
        components_file=a.components,
        reference=a.reference,
        prune_file=a.prune,
        keep_deleted=a.keep_deleted,
        jobs=a.jobs,
        progress=None if a.quiet else lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    Output(a.quiet).info(
        f"partitioned {a.src} into {result.path}: {result.components} component(s), "
        f"{result.product_csets} product cset(s) in {time.monotonic() - start:.1f}s"
    )


def _resolve_opt(a: argparse.Namespace) -> str | None:
    return "ours" if a.ours else ("theirs" if a.theirs else None)


def cmd_pull(a: argparse.Namespace) -> None:
    from bkrepo import nested
    from bkrepo.sync import describe
    from bkrepo.transfer import pull

    with Repo.find() as repo:
        if nested.is_product(repo):
            outcome = nested.pull(repo, a.url, rev=a.rev, resolve=_resolve_opt(a))
        else:
            outcome = pull(repo, a.url, rev=a.rev, resolve=_resolve_opt(a))
    Output(a.quiet).info(f"pull: {describe(outcome)}")


def cmd_push(a: argparse.Namespace) -> None:
    from bkrepo import nested
    from bkrepo.sync import describe
    from bkrepo.transfer import push

    with Repo.find() as repo:
        outcome = nested.push(repo, a.url) if nested.is_product(repo) else push(repo, a.url)
    Output(a.quiet).info(f"push: {describe(outcome)}")


def cmd_send(a: argparse.Namespace) -> None:
    from bkrepo.transfer import send

    with Repo.find() as repo:
        n = send(repo, a.rev, a.file)
    if a.file != "-":
        Output(a.quiet).info(f"wrote {n} cset(s) to {a.file}")


def cmd_receive(a: argparse.Namespace) -> None:
    from bkrepo.sync import describe
    from bkrepo.transfer import receive

    with Repo.find() as repo:
        outcome = receive(repo, a.file, resolve=_resolve_opt(a))
    Output(a.quiet).info(f"receive: {describe(outcome)}")


def cmd_bam_du(a: argparse.Namespace) -> None:
    from bkrepo.bam import du

    with Repo.find() as repo:
        u = du(repo)
    print(f"local        {u.local_objects:8d} objects  {human_size(u.local_bytes):>10}")
    if u.shared_objects:
        print(
            f" of which shared with other pools (hardlinks) "
            f"{u.shared_objects} objects, {human_size(u.shared_bytes)}"
        )
    print(f"remote-only  {u.missing_objects:8d} objects  {human_size(u.missing_bytes):>10}")
    print(
        f"unreferenced {u.unreferenced_objects:8d} objects  {human_size(u.unreferenced_bytes):>10}"
    )


def cmd_bam_server(a: argparse.Namespace) -> None:
    from bkrepo import bam, bamflow

    with Repo.find() as repo:
        if a.list:
            ref = bamflow.server_of(repo)
            if ref is not None:
                print(ref.url)
            return
        if a.remove or a.url is not None:
            msg = bam.set_server(repo, None if a.remove else a.url, force=a.force, skip=a.skip)
            Output(a.quiet).info(msg)
            return
        print(bam.describe_server(repo))


def cmd_bam_check(a: argparse.Namespace) -> int:
    from bkrepo import bam

    with Repo.find() as repo:
        r = bam.check(repo, fast=a.fast)
    if not r.ok:
        for line in r.lines():
            print(line)
        print(
            f"bkr: bam check: {len(r.missing)} missing and {len(r.corrupt)} corrupt BAM object(s) "
            "(listed above); run 'bkr bam repair'",
            file=sys.stderr,
        )
        return 1
    Output(a.quiet).info(
        f"bam check passed: {r.total} object(s), {r.local} local"
        + (f", {r.remote} at the BAM server" if r.remote else "")
        + ("" if a.fast else ", hashes verified")
    )
    return 0


def cmd_bam_clean(a: argparse.Namespace) -> None:
    from bkrepo import bam

    with Repo.find() as repo:
        removed = bam.clean(repo, all_at_server=a.all, dry_run=a.dry_run)
    out = Output(a.quiet)
    verb = "would remove" if a.dry_run else "removed"
    for oid, size in removed:
        out.info(f"{verb} {oid.hex()} ({human_size(size)})")
    out.info(f"{verb} {len(removed)} object(s), {human_size(sum(s for _, s in removed))}")


def cmd_bam_pull(a: argparse.Namespace) -> None:
    from bkrepo import bam

    with Repo.find() as repo:
        n = bam.pull(repo, a.url, everything=a.all)
    Output(a.quiet).info(f"fetched {n} BAM object(s)")


def cmd_bam_push(a: argparse.Namespace) -> None:
    from bkrepo import bam

    with Repo.find() as repo:
        n = bam.push(repo, a.url)
    Output(a.quiet).info(f"sent {n} BAM object(s)")


def cmd_bam_repair(a: argparse.Namespace) -> int:
    from bkrepo import bam

    with Repo.find() as repo:
        fixed, broken, before = bam.repair(repo, a.sources or [])
    if not broken:
        Output(a.quiet).info("nothing to repair: all BAM data is present and intact")
        return 0
    for line in before.lines():
        print(line)
    if fixed < broken:
        print(
            f"bkr: bam repair: repaired {fixed} of {broken} object(s); the rest were found "
            "nowhere (try --from URL, or 'bkr bam reattach')",
            file=sys.stderr,
        )
        return 1
    Output(a.quiet).info(f"repaired {fixed} of {broken} object(s)")
    return 0


def cmd_bam_convert(a: argparse.Namespace) -> None:
    from bkrepo.convert import convert

    size = cfg.parse_size(a.size)
    with Repo.find() as repo:
        r = convert(repo, size)
    if not r.files:
        Output(a.quiet).info("bam convert: no files needing conversion found")
        return
    Output(a.quiet).info(
        f"converted {r.files} file(s) to BAM, rewrote {r.csets} cset(s); "
        f"new project id {r.project_id}"
    )


def cmd_bam_reattach(a: argparse.Namespace) -> int:
    from bkrepo import bam

    paths = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    with Repo.find() as repo:
        done, left = bam.reattach(repo, paths)
    out = Output(a.quiet)
    for p in done:
        out.info(f"reattached {p}")
    if left:
        print(f"bkr: bam reattach: {left} BAM object(s) are still missing", file=sys.stderr)
        return 1
    out.info("all missing BAM data found")
    return 0


# -- the parser --------------------------------------------------------------------------------
def build_parser() -> Parser:
    # -q goes before or after the command: 'bkr -q get X' and 'bkr get -q X'.  The
    # subcommands' -q (a separate action) has no default, so it never resets a -q given
    # before the command.
    quiet = Parser(add_help=False)
    quiet.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print nothing but errors",
    )
    p = Parser(prog="bkr", description="Version control for trees of code and large binaries.")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, handler: Handler, help: str) -> Parser:
        sp: Parser = sub.add_parser(name, help=help, description=help, parents=[quiet])
        sp.set_defaults(handler=handler)
        return sp

    sp = command("init", cmd_init, "create a repository")
    sp.add_argument("dir", nargs="?")
    sp.add_argument(
        "--bam-threshold", metavar="SIZE", help="binary files this big become BAM (default 64K)"
    )
    sp.add_argument("--no-bam", action="store_true", help="never make files BAM by size or pattern")

    sp = command("add", cmd_add, "start tracking files (directories are walked)")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--bam", action="store_true", help="make these files BAM whatever their size")
    g.add_argument("--no-bam", action="store_true", help="never make these files BAM")

    sp = command("rm", cmd_rm, "remove tracked files (recorded at the next commit)")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument(
        "-f", "--force", action="store_true", help="remove even with uncommitted changes"
    )
    sp.add_argument("--keep", action="store_true", help="keep the working files, untracked")

    sp = command("mv", cmd_mv, "rename a tracked file or directory (history follows)")
    sp.add_argument("src")
    sp.add_argument("dst")

    sp = command("commit", cmd_commit, "record changes as a new cset")
    sp.add_argument("-m", "--message", required=True)
    sp.add_argument("paths", nargs="*", metavar="PATH")

    sp = command("status", cmd_status, "show changed, added, removed and untracked files")
    sp.add_argument("paths", nargs="*", metavar="PATH")
    sp.add_argument("--no-untracked", "-u", action="store_true", help="do not list untracked files")

    sp = command("log", cmd_log, "show history, newest first")
    sp.add_argument("-r", "--rev", help="one cset, or a range A..B")
    sp.add_argument("-v", "--verbose", action="store_true", help="list the files each cset changed")
    sp.add_argument("--keys", action="store_true", help="print full cset keys only, one per line")
    sp.add_argument("path", nargs="?", help="only csets that changed this file or directory")

    sp = command("diff", cmd_diff, "show changes of the working tree against a revision")
    sp.add_argument("-r", "--rev")
    sp.add_argument("paths", nargs="*", metavar="PATH")

    sp = command("get", cmd_get, "check files out of history (fetching BAM data)")
    sp.add_argument("-r", "--rev")
    sp.add_argument("-f", "--force", action="store_true", help="overwrite uncommitted changes")
    sp.add_argument("-p", "--print", action="store_true", help="write the content to stdout")
    sp.add_argument("paths", nargs="+", metavar="PATH")

    sp = command("config", cmd_config, "show or set repository configuration")
    sp.add_argument("key", nargs="?")
    sp.add_argument("value", nargs="?")
    sp.add_argument("-l", "--list", action="store_true")
    sp.add_argument("--unset", action="store_true")

    sp = command("id", cmd_id, "print the project id (or the repo id)")
    sp.add_argument("--repo", "-r", action="store_true")

    sp = command("tag", cmd_tag, "name a cset (no NAME: list tags)")
    sp.add_argument("name", nargs="?")
    sp.add_argument("-r", "--rev")

    sp = command("undo", cmd_undo, "remove a cset and every cset after it")
    sp.add_argument("-r", "--rev", required=True)

    sp = command("parent", cmd_parent, "show or set the default URL for pull and push")
    sp.add_argument("url", nargs="?")
    sp.add_argument("--unset", action="store_true")

    sp = command("clone", cmd_clone, "copy a repository")
    sp.add_argument("src")
    sp.add_argument("dest", nargs="?")
    sp.add_argument("-r", "--rev", help="clone history up to this cset")
    sp.add_argument(
        "--checkout",
        choices=("get", "none"),
        default="get",
        help="write files (get, default) or only .bk/ (none, for bkfs)",
    )
    sp.add_argument(
        "--no-hardlinks", action="store_true", help="copy BAM objects even on one filesystem"
    )
    sp.add_argument(
        "-@",
        "--baseline",
        metavar="BASE",
        help="a local clone of the same project to take history and BAM data from first",
    )
    sp.add_argument(
        "-B",
        "--bam-server",
        metavar="URL|.|none",
        help="BAM server of the clone (default: the source's; '.': the clone is one)",
    )

    sp.add_argument(
        "-s",
        "--select",
        action="append",
        metavar="ALIAS|PATH",
        help="of a product: clone these components only (repeatable; default all)",
    )

    sp = command("comps", cmd_comps, "list the components of a product")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--here", "-H", action="store_true", help="only those populated here")
    g.add_argument("--missing", action="store_true", help="only those not populated here")
    sp.add_argument("-v", "--verbose", action="store_true", help="say which are here")

    sp = command("populate", cmd_populate, "clone components of a product into place")
    sp.add_argument("names", nargs="+", metavar="PATH|ALIAS")
    sp.add_argument("--from", dest="source", metavar="URL", help="look here first")

    sp = command("unpopulate", cmd_unpopulate, "remove components from this clone of a product")
    sp.add_argument("names", nargs="+", metavar="PATH|ALIAS")
    sp.add_argument(
        "-f", "--force", action="store_true", help="even with uncommitted or untracked files"
    )

    sp = command("attach", cmd_attach, "add a repository to a product as a component")
    sp.add_argument("url")
    sp.add_argument("path")
    sp.add_argument("-m", "--message", help="the product cset's comment")

    sp = command("partition", cmd_partition, "split a repository into a product and components")
    sp.add_argument("src", metavar="FROM")
    sp.add_argument("dest", metavar="TO")
    sp.add_argument("-C", "--components", metavar="FILE", help="component directories, one a line")
    sp.add_argument(
        "-@", "--reference", metavar="URL", help="partition like this earlier result (incremental)"
    )
    sp.add_argument("-P", "--prune", metavar="FILE", help="root keys or paths to remove first")
    sp.add_argument(
        "--keep-deleted", action="store_true", help="keep deleted files, in their last component"
    )
    sp.add_argument("-j", "--jobs", type=int, default=1, help="build N components at once")

    for name, handler, help in (("pull", cmd_pull, "bring in csets from another repository"),):
        sp = command(name, handler, help)
        sp.add_argument("url", nargs="?")
        sp.add_argument("-r", "--rev")
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--ours", action="store_true", help="settle conflicts for this repository")
        g.add_argument(
            "--theirs", action="store_true", help="settle conflicts for the incoming side"
        )

    sp = command("push", cmd_push, "send csets to another repository")
    sp.add_argument("url", nargs="?")

    sp = command("send", cmd_send, "write csets and their BAM data to a bundle file")
    sp.add_argument("-r", "--rev", help="REV (history up to it) or A..B")
    sp.add_argument("file", help="bundle file, or - for stdout")

    sp = command("receive", cmd_receive, "apply a bundle made by send")
    sp.add_argument("file", help="bundle file, or - for stdin")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--ours", action="store_true")
    g.add_argument("--theirs", action="store_true")

    sp = command("serve", cmd_serve, "serve every repository under ROOT over HTTP")
    sp.add_argument("root")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8740, help="0 picks a free port (printed)")
    sp.add_argument("--token-file", metavar="FILE", help="lines 'TOKEN read|write'")
    sp.add_argument("--config", metavar="FILE", help="TOML settings: [storage] (S3), [server]")
    sp.add_argument(
        "--anonymous",
        choices=("none", "read", "write"),
        default="read",
        help="right of requests without a token (default read)",
    )
    sp.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS: certificate (chain) file")
    sp.add_argument("--tls-key", metavar="PEM", help="serve HTTPS: private key file")

    bam = sub.add_parser("bam", help="BAM data tools", parents=[quiet])
    bsub = bam.add_subparsers(dest="bam_command", metavar="SUBCOMMAND", parser_class=Parser)
    bp = bsub.add_parser(
        "du", help="sizes of BAM data: local, remote-only, unreferenced", parents=[quiet]
    )
    bp.set_defaults(handler=cmd_bam_du)

    def bam_command(name: str, handler: Handler, help: str) -> Parser:
        sp: Parser = bsub.add_parser(name, help=help, description=help, parents=[quiet])
        sp.set_defaults(handler=handler)
        return sp

    bp = bam_command("server", cmd_bam_server, "show or change the BAM server")
    bp.add_argument("url", nargs="?", metavar="URL|.|none")
    bp.add_argument("-l", "--list", action="store_true", help="print the server URL only")
    bp.add_argument("-r", "--remove", action="store_true", help="no BAM server (data made local)")
    bp.add_argument("-f", "--force", action="store_true", help="allow changing a server repo")
    bp.add_argument("-s", "--skip", action="store_true", help="do not copy data to the new place")
    bp = bam_command("check", cmd_bam_check, "verify all BAM data history needs is there")
    bp.add_argument("--fast", action="store_true", help="presence only, no hashing")
    bp = bam_command("clean", cmd_bam_clean, "delete BAM objects the pool need not keep")
    bp.add_argument("-a", "--all", action="store_true", help="also objects the BAM server holds")
    bp.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    bp = bam_command("pull", cmd_bam_pull, "fetch BAM data into the local pool")
    bp.add_argument("-a", "--all", action="store_true", help="everything history needs")
    bp.add_argument("url", nargs="?")
    bp = bam_command("push", cmd_bam_push, "send local BAM data to the server")
    bp.add_argument("url", nargs="?")
    bp = bam_command("repair", cmd_bam_repair, "replace missing or corrupt BAM data")
    bp.add_argument(
        "--from",
        dest="sources",
        action="append",
        metavar="URL",
        help="another source to repair from (repeatable)",
    )
    bam_command("reattach", cmd_bam_reattach, "reinstate BAM data from files named on stdin")
    bp = bam_command("convert", cmd_bam_convert, "make binary files in history BAM files")
    bp.add_argument("size", nargs="?", default="64K", help="first revision at least this big")
    bam.set_defaults(handler=None, bam_parser=bam)
    return p


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every ``finally`` and aborted transaction
    cleans up (a clone's work directory, temp files) instead of the process just vanishing."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _redeliver(unraisable: sys.UnraisableHookArgs) -> None:
    """Python cannot raise out of a weakref callback or a ``__del__`` (the import machinery
    runs such callbacks): an interrupt that lands there is printed as "Exception ignored" and
    lost, and the command would go on.  Send the signal to the main thread again a moment
    later, so it lands in ordinary code and the command unwinds after all."""
    exc = unraisable.exc_value
    if not isinstance(exc, Interrupted):
        sys.__unraisablehook__(unraisable)
        return
    again = threading.Timer(0.01, signal.pthread_kill, (threading.get_ident(), exc.signum))
    again.daemon = True
    again.start()


def _prepare_process() -> None:
    # File names are bytes and reach us as os.fsdecode makes them (surrogate escapes): print
    # them, and read them from stdin, undamaged whatever the locale's codec would refuse.
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    # SIGINT too gets its own exception class: CPython (3.11) takes a plain KeyboardInterrupt
    # that leaves an eval() (namedtuple does one, at import) for one nobody caught, and ends
    # the process by SIGINT after our clean exit; a subclass does not trip that.
    for sig, default in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
        (signal.SIGHUP, signal.SIG_DFL),
    ):
        if signal.getsignal(sig) is default:
            signal.signal(sig, _interrupt)
    sys.unraisablehook = _redeliver


def main(argv: Sequence[str] | None = None) -> NoReturn:
    _prepare_process()
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((x for x in args_list if not x.startswith("-")), "")
    try:
        a = parser.parse_args(args_list)
        progress.configure(quiet=a.quiet)
        handler = getattr(a, "handler", None)
        if handler is None:
            if getattr(a, "command", None) == "bam":
                a.bam_parser.print_help(sys.stderr)
            else:
                parser.print_help(sys.stderr)
            sys.exit(2)
        sys.exit(handler(a) or 0)
    except BkError as e:
        msg = str(e)
        if (
            command
            and not msg.startswith((command + ":", command + " "))
            and not isinstance(e, UsageError)
        ):
            msg = f"{command}: {msg}"
        print(f"bkr: {msg}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(
            f"bkr: {command or 'bkr'}: interrupted by {signal.Signals(signum).name}; "
            "nothing was left half done",
            file=sys.stderr,
        )
        sys.exit(128 + signum)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except OSError as e:
        print(
            f"bkr: {command or 'error'}: {e.strerror or e}: {e.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        sys.exit(1)
    except Exception as e:  # a bug: say so in one line; the traceback only on request
        if os.environ.get("BKR_DEBUG"):
            raise
        print(
            f"bkr: internal error in {command or 'bkr'}: {type(e).__name__}: {e} "
            "(set BKR_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
