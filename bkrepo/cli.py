"""``bkr``: the command line of the repo engine.

The only module that reads arguments, prints, and turns errors into exit codes: 0 success,
1 the operation failed, 2 usage error.  Failures print one line, ``bkr: <what>: <why>``.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    from bkrepo.commit import add

    bam = True if a.bam else (False if a.no_bam else None)
    with Repo.find() as repo:
        added = add(repo, a.paths, bam=bam)
    out = Output(a.quiet)
    for p in added:
        out.info(f"A  {os.fsdecode(p)}")


def cmd_rm(a: argparse.Namespace) -> None:
    from bkrepo.commit import rm

    with Repo.find() as repo:
        removed = rm(repo, a.paths, force=a.force, keep=a.keep)
    out = Output(a.quiet)
    for p in removed:
        out.info(f"D  {os.fsdecode(p)}")


def cmd_mv(a: argparse.Namespace) -> None:
    from bkrepo.commit import mv

    with Repo.find() as repo:
        pairs = mv(repo, a.src, a.dst)
    out = Output(a.quiet)
    for old, new in pairs:
        out.info(f"R  {os.fsdecode(old)} -> {os.fsdecode(new)}")


def cmd_commit(a: argparse.Namespace) -> None:
    from bkrepo.commit import commit

    with Repo.find() as repo:
        result = commit(repo, a.message, a.paths or None)
    for w in result.warnings:
        print(f"bkr: warning: {w}", file=sys.stderr)
    Output(a.quiet).info(f"committed {result.key.hex()[:12]} ({len(result.changes)} file(s))")


def cmd_status(a: argparse.Namespace) -> int:
    from bkrepo.worktree import WorkState, refresh_index, scan

    with Repo.find() as repo:
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
    from bkrepo import history

    with Repo.find() as repo:
        for line in history.diff(repo, a.paths, a.rev):
            sys.stdout.write(line)


def cmd_get(a: argparse.Namespace) -> None:
    from bkrepo import history

    with Repo.find() as repo:
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
    from bkrepo import history

    with Repo.find() as repo:
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
    )
    for w in result.warnings:
        print(f"bkr: warning: {w}", file=sys.stderr)
    Output(a.quiet).info(f"cloned into {result.path} in {time.monotonic() - start:.1f}s")


def cmd_serve(a: argparse.Namespace) -> None:
    from bkrepo.server.auth import Access
    from bkrepo.server.run import serve

    access = Access.from_file(Path(a.token_file) if a.token_file else None, a.anonymous)
    config = Path(a.config) if a.config else None
    serve(Path(a.root).absolute(), a.host, a.port, access, quiet=a.quiet, config=config)


def _resolve_opt(a: argparse.Namespace) -> str | None:
    return "ours" if a.ours else ("theirs" if a.theirs else None)


def cmd_pull(a: argparse.Namespace) -> None:
    from bkrepo.sync import describe
    from bkrepo.transfer import pull

    with Repo.find() as repo:
        outcome = pull(repo, a.url, rev=a.rev, resolve=_resolve_opt(a))
    Output(a.quiet).info(f"pull: {describe(outcome)}")


def cmd_push(a: argparse.Namespace) -> None:
    from bkrepo.sync import describe
    from bkrepo.transfer import push

    with Repo.find() as repo:
        outcome = push(repo, a.url)
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
    quiet = Parser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p = Parser(
        prog="bkr",
        description="Version control for trees of code and large binaries.",
        parents=[quiet],
    )
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


def main(argv: Sequence[str] | None = None) -> NoReturn:
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
    except KeyboardInterrupt:
        print("bkr: interrupted; nothing was left half done", file=sys.stderr)
        sys.exit(130)
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
