"""Engine benchmark: ``bkr`` against git and coreutils on one synthetic repository.

One command generates a synthetic tree and history once (by default 100,000 files in 1,000
directories, 1,000 csets, plus 2 GiB of BAM files), builds a bkr repository and a git
repository with the same content and the same csets, then measures each pair side by side in
the same run:

* ``bkr status`` vs ``git status`` on the unchanged tree;
* ``bkr clone --checkout none`` vs ``git clone --no-local --no-checkout`` (git's pack
  transfer, not its hardlink shortcut);
* ``bkr commit`` of a new 1 GiB BAM file vs ``sha256sum`` + ``cp`` of that file;

with several repetitions, reporting medians and the peak RSS of every measured process.  It
prints a table and writes the same as JSON to ``benchmarks/results/engine-<timestamp>.json``.
See ``benchmarks/README.md``.

Generation uses the bkrepo Python API in-process (``bkrepo.commit.add``/``commit``) and git
commands; only the measured commands run through the real CLIs in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
VENV_BIN = Path(sys.executable).parent
BKR = str(VENV_BIN / "bkr") if (VENV_BIN / "bkr").exists() else shutil.which("bkr") or "bkr"
GEN_MARKER = "generated.json"
MIB = 1 << 20
GIB = 1 << 30
BLOCK = 4 * MIB
AUTHOR = "bench <bench@example.com>"


# -- subprocess measurement --------------------------------------------------------------------
@dataclass
class Sample:
    wall: float  # seconds
    maxrss_kib: int  # peak RSS (ru_maxrss) of the process and its waited-for descendants
    cpu: float  # user + system seconds, including children
    anon_kib: int  # peak anonymous (private) RSS summed over the process tree, sampled
    load1: float = 0.0  # 1-minute load average when the run started (noise from other work)
    sys: float = 0.0  # the system part of ``cpu``


class MemSampler(threading.Thread):
    """Samples the anonymous RSS of a process tree every ``interval`` seconds.

    ``ru_maxrss`` counts file pages mapped into the process too: LMDB's memory map and git's
    pack windows make it grow with the repository size although those pages are page cache,
    shared and reclaimable.  ``RssAnon`` is the memory the processes really hold."""

    def __init__(self, root: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)

    def sample(self) -> None:
        total = 0
        stack = [self.root]
        while stack:
            pid = stack.pop()
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
                if pid == self.root:  # the launcher (/usr/bin/time) is not the command
                    continue
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            total += int(line.split()[1])
                            break
            except (OSError, ValueError):
                continue
        self.peak_kib = max(self.peak_kib, total)


def base_env() -> dict[str, str]:
    """A fixed environment: no user or system git config, a fixed bkr author, C locale."""
    return {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "BKR_USER": AUTHOR,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }


ENV = base_env()


# Peak RSS must not be read from wait4() on a child of this process: exec() records the
# high-water RSS of the address space it replaces, and a child forked (or vforked) from this
# large Python process would report this process's RSS.  A small launcher that forks the
# command itself gives the command a fresh count: /usr/bin/time when present, else Python.
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
_LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: Sequence[str], cwd: Path) -> Sample:
    """Run ``cmd`` (output discarded) and return its wall time, peak RSS and CPU time.

    The peak RSS covers the command and every descendant it waited for (for
    ``sh -c 'a && b'`` it is the larger of a's and b's).  Wall time is measured here around
    the launcher, so both sides of a comparison pay the same few milliseconds for it.
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        launcher = (
            [TIME, "-f", "%M", "-o", rss.name]
            if TIME
            else [sys.executable, "-S", "-c", _LAUNCHER, rss.name]
        )
        load1 = os.getloadavg()[0]
        start = time.perf_counter()
        p = subprocess.Popen(
            [*launcher, *cmd],
            cwd=cwd,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        sampler = MemSampler(p.pid)
        sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(
                f"{' '.join(cmd)} (in {cwd}) exited {p.returncode}:\n"
                + err.read().decode(errors="replace")
            )
        maxrss = int(rss.read().split()[-1])
    cpu = ru.ru_utime + ru.ru_stime
    return Sample(wall, maxrss, cpu, sampler.peak_kib, load1, ru.ru_stime)


def run(cmd: Sequence[str], cwd: Path, *, input: bytes | None = None) -> str:
    """An unmeasured helper command; its stdout, or an error with its stderr."""
    p = subprocess.run(list(cmd), cwd=cwd, env=ENV, input=input, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} (in {cwd}) exited {p.returncode}:\n"
            + p.stderr.decode(errors="replace")
        )
    return p.stdout.decode(errors="replace")


def settle() -> None:
    """Write back dirty pages between measured runs, so no run pays for another's writes."""
    os.sync()


def prewarm(*paths: Path) -> None:
    """Read every file under ``paths`` so its pages are in the page cache.

    Needed right before each timed run, not just once: VMs like this one run DAMON, which pages
    out memory left idle for about a minute (see /sys/kernel/mm/damon), so a repository read
    by the previous repetition may be partly cold again by the next."""
    buf = bytearray(BLOCK)
    for top in paths:
        files = [top] if top.is_file() else [Path(d) / f for d, _, fs in os.walk(top) for f in fs]
        for f in files:
            try:
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
            except OSError:
                continue


# -- synthetic content -------------------------------------------------------------------------
EXTS = ("c", "h", "py", "txt", "md", "json", "cpp", "rs")


class Content:
    """Deterministic source-like text: files are random picks from a pool of lines."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        words = [
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(4000)
        ]
        self.lines = [
            (
                " " * (4 * rng.randint(0, 3))
                + " ".join(rng.choices(words, k=rng.randint(1, 12)))
                + "\n"
            ).encode()
            for _ in range(20000)
        ]

    def new_file(self, rng: random.Random, path: str) -> bytes:
        return b"".join([f"# {path}\n".encode(), *rng.choices(self.lines, k=rng.randint(3, 60))])

    def modify(self, rng: random.Random, old: bytes) -> bytes:
        lines = old.splitlines(keepends=True)
        for _ in range(rng.randint(1, 3)):  # replace a few lines (never the header)
            if len(lines) > 1:
                lines[rng.randrange(1, len(lines))] = rng.choice(self.lines)
        for _ in range(rng.randint(0, 2)):
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(self.lines))
        return b"".join(lines)


def write_random(path: Path, seed: bytes, size: int) -> None:
    """``size`` pseudo-random bytes (BLAKE3 XOF of ``seed``), written in 4 MiB blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    xof = blake3.blake3(seed)
    with open(path, "wb", buffering=0) as f:
        off = 0
        while off < size:
            n = min(BLOCK, size - off)
            f.write(xof.digest(length=n, seek=off))
            off += n


@dataclass
class BamSpec:
    path: str
    seed: bytes
    size: int


@dataclass
class CsetSpec:
    index: int
    message: str
    text: list[tuple[str, bytes]] = field(default_factory=list)  # path -> new content
    bams: list[BamSpec] = field(default_factory=list)


def layout(files: int, dirs: int) -> tuple[list[str], list[list[str]]]:
    """Leaf directories (under ~sqrt(dirs)/3 parents) and the file names in each."""
    tops = max(1, min(dirs, round(dirs**0.5 / 3)))
    dnames = [f"top{d * tops // dirs:02d}/dir{d:04d}" for d in range(dirs)]
    per, extra = divmod(files, dirs)
    fnames = [
        [f"{d}/file{j:03d}.{EXTS[(j + i) % len(EXTS)]}" for j in range(per + (i < extra))]
        for i, d in enumerate(dnames)
    ]
    return dnames, fnames


# -- generation --------------------------------------------------------------------------------
def _git(root: Path, *args: str, input: bytes | None = None) -> str:
    return run(["git", *args], root, input=input)


def _git_quiet(root: Path, *args: str) -> None:
    """git with no output captured: the thread only blocks in waitpid (GIL released), so it
    does not fight the bkr generation loop for the GIL the way a pipe-reading loop would."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(
            ["git", *args],
            cwd=root,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        if p.wait() != 0:
            err.seek(0)
            raise RuntimeError(f"git {' '.join(args[:3])}: {err.read().decode(errors='replace')}")


class GitWriter(threading.Thread):
    """Feeds the same csets to ``git fast-import`` while bkr records them in-process.

    ``git add`` + ``git commit`` cost ~0.25 s per cset with a 100k-entry index, so the history
    is streamed into one fast-import process instead; the working tree and index are made at
    the end by ``git reset --hard``.  Text content travels with the spec; BAM files are read
    from the bkr tree (they are never changed once written, so any later read is the same)."""

    def __init__(self, git_root: Path, bkr_root: Path) -> None:
        super().__init__(daemon=True)
        self.git_root = git_root
        self.bkr_root = bkr_root
        self.q: queue.Queue[CsetSpec | None] = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.busy = 0.0
        git_root.mkdir(parents=True, exist_ok=True)
        _git(git_root, "init", "-q", "-b", "main")
        for k, v in (
            ("user.name", "bench"),
            ("user.email", "bench@example.com"),
            ("gc.auto", "0"),
            ("maintenance.auto", "false"),
            # the recommended setting for repos of large binaries: such blobs are stored
            # without delta search.  It only makes git faster.
            ("core.bigFileThreshold", "1m"),
        ):
            _git(git_root, "config", k, v)
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the thread ends
        self.proc = subprocess.Popen(
            ["git", "fast-import", "--quiet", "--done"],
            cwd=git_root,
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self.err,
        )
        assert self.proc.stdin is not None
        self.out = self.proc.stdin

    def run(self) -> None:
        ended = False
        try:
            while (spec := self.q.get()) is not None:
                t = time.perf_counter()
                self.apply(spec)
                self.busy += time.perf_counter() - t
            ended = True
            self.out.write(b"done\n")
            self.out.close()
            if self.proc.wait() != 0:
                self.err.seek(0)
                raise RuntimeError(f"git fast-import: {self.err.read().decode(errors='replace')}")
        except BaseException as e:
            self.error = e
            self.proc.kill()
            while not ended and self.q.get() is not None:  # so the producer never blocks
                pass
        finally:
            self.err.close()

    def apply(self, spec: CsetSpec) -> None:
        w = self.out.write
        msg = spec.message.encode()
        who = b"bench <bench@example.com> %d +0000" % int(time.time())
        w(
            b"commit refs/heads/main\nauthor %s\ncommitter %s\ndata %d\n%s\n"
            % (who, who, len(msg), msg)
        )
        for p, data in spec.text:
            w(b"M 100644 inline %s\ndata %d\n" % (p.encode(), len(data)))
            w(data)
            w(b"\n")
        for b in spec.bams:
            w(b"M 100644 inline %s\ndata %d\n" % (b.path.encode(), b.size))
            with open(self.bkr_root / b.path, "rb") as f:
                shutil.copyfileobj(f, self.out, BLOCK)
            w(b"\n")

    def finish(self) -> None:
        """After the thread ended: check out the tip (index and working tree)."""
        _git_quiet(self.git_root, "reset", "-q", "--hard", "main")


class BkrWriter:
    """Commits csets into the bkr repo in-process.

    ``bkrepo.commit.commit`` reloads the 100k-entry index and walks all of it for every cset
    (~0.3 s at full scale, so 1,000 csets would take minutes).  When the internal
    ``commit._record`` is available with the signature it had when this was written, the
    writer keeps the index in memory and records each cset with exactly the changes it knows
    it made (what ``commit`` would have found by scanning); otherwise it falls back to the
    public ``commit`` scoped to the directories it touched.  ``sanity()`` checks the result
    either way (clean ``bkr status``, equal history length, identical trees)."""

    def __init__(self, repo: object) -> None:
        import inspect

        from bkrepo import commit as cm

        self.repo = repo
        self.cm = cm
        rec = getattr(cm, "_record", None)
        params = list(inspect.signature(rec).parameters) if rec else []
        self.fast = params[:5] == ["repo", "txn", "state", "changes", "message"]
        self.state = None

    def commit(self, message: str, modified: list[str], added: list[str], root: Path) -> None:
        cm, repo = self.cm, self.repo
        if added:
            cm.add(repo, [str(root / p) for p in added])
            self.state = None  # add saved its own copy of the index
        if not self.fast:
            scope = sorted({p.rsplit("/", 1)[0] for p in modified} | set(added))
            cm.commit(repo, message, [str(root / p) for p in scope])
            return
        from bkrepo.worktree import Change, WorkState

        with repo.locked("commit"):  # type: ignore[attr-defined]
            if self.state is None:
                with repo.store.read() as txn:  # type: ignore[attr-defined]
                    self.state = WorkState.load(repo, txn)
            changes = [Change(p.encode(), "A") for p in added]
            changes += [Change(p.encode(), "M") for p in modified]
            changes.sort(key=lambda c: c.path)
            with repo.store.write() as txn:  # type: ignore[attr-defined]
                cm._record(repo, txn, self.state, changes, message)


def generate(work: Path, a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, object]:
    """Build ``work/bkr`` and ``work/git`` with identical trees and histories."""
    from bkrepo.commit import add, commit
    from bkrepo.repo import Repo

    os.environ.update({k: v for k, v in ENV.items() if k.startswith("BKR_")})
    bkr_root, git_root = work / "bkr", work / "git"
    for d in (bkr_root, git_root):
        if d.exists():
            shutil.rmtree(d)
    bkr_root.mkdir(parents=True)
    rng = random.Random(a.seed)
    content = Content(a.seed)
    dnames, fnames = layout(a.files, a.dirs)
    t_all = time.perf_counter()

    # BAM files: equal sizes (the last one takes the remainder), spread evenly over csets 1..N-1
    bam_total = int(a.bam_gib * GIB)
    bam_each = a.bam_file_mib * MIB
    nbam = -(-bam_total // bam_each) if bam_total else 0
    bams_of: dict[int, list[BamSpec]] = {}
    for j in range(nbam):
        size = min(bam_each, bam_total - j * bam_each)
        at = 1 + j * (a.csets - 1) // nbam if a.csets > 1 else 0
        d = dnames[(j * 7919) % len(dnames)]
        bams_of.setdefault(at, []).append(BamSpec(f"{d}/asset{j:04d}.bin", b"bam%d" % j, size))

    # cset 0: the whole tree
    t = time.perf_counter()
    first = CsetSpec(0, "initial import", bams=bams_of.get(0, []))
    nbytes = 0
    for d, names in zip(dnames, fnames, strict=True):
        (bkr_root / d).mkdir(parents=True)
        for p in names:
            data = content.new_file(rng, p)
            nbytes += len(data)
            (bkr_root / p).write_bytes(data)
            first.text.append((p, data))
    for b in first.bams:
        write_random(bkr_root / b.path, b.seed, b.size)
    t_tree = time.perf_counter() - t
    log(f"  wrote {a.files} files ({nbytes / MIB:.0f} MiB of text) in {t_tree:.1f}s")

    git = GitWriter(git_root, bkr_root)
    git.start()
    git.q.put(first)
    del first
    t = time.perf_counter()
    run([BKR, "init", "-q", str(bkr_root)], work)
    repo = Repo.open(bkr_root)
    try:
        add(repo, [str(bkr_root)])
        commit(repo, "initial import")
        t_first = time.perf_counter() - t
        log(f"  bkr: initial cset of {a.files} files in {t_first:.1f}s")

        t = time.perf_counter()
        writer = BkrWriter(repo)
        how = "commit._record, index kept in memory" if writer.fast else "commit.commit()"
        log(f"  bkr: recording csets with {how}")
        every = max(1, (a.csets - 1) // 10)
        for i in range(1, a.csets):
            spec = CsetSpec(i, f"cset {i}: edit a few files", bams=bams_of.get(i, []))
            for d in rng.sample(range(len(dnames)), min(a.dirs_per_cset, len(dnames))):
                names = fnames[d]
                for p in rng.sample(names, min(a.files_per_dir, len(names))):
                    f = bkr_root / p
                    data = content.modify(rng, f.read_bytes())
                    f.write_bytes(data)
                    spec.text.append((p, data))
            for b in spec.bams:
                write_random(bkr_root / b.path, b.seed, b.size)
            writer.commit(
                spec.message, [p for p, _ in spec.text], [b.path for b in spec.bams], bkr_root
            )
            if git.error:
                raise RuntimeError("git generation failed") from git.error
            git.q.put(spec)
            if i % every == 0:
                log(
                    f"  bkr: {i}/{a.csets - 1} csets, {time.perf_counter() - t:.0f}s "
                    f"(git fast-import is {git.q.qsize()} behind)"
                )
        t_hist_bkr = time.perf_counter() - t
    finally:
        repo.close()
        git.q.put(None)
    git.join()
    if git.error:
        raise RuntimeError("git generation failed") from git.error
    t_hist_total = time.perf_counter() - t
    t = time.perf_counter()
    _git(git_root, "gc", "-q")
    t_gc = time.perf_counter() - t
    t = time.perf_counter()
    git.finish()
    t_checkout = time.perf_counter() - t
    log(
        f"  history: bkr {t_hist_bkr:.0f}s, both done after {t_hist_total:.0f}s; "
        f"git gc {t_gc:.0f}s, git checkout {t_checkout:.0f}s"
    )

    info: dict[str, object] = {
        "params": gen_params(a),
        "seconds": {
            "total": round(time.perf_counter() - t_all, 1),
            "write_tree": round(t_tree, 1),
            "bkr_initial_cset": round(t_first, 1),
            "bkr_history": round(t_hist_bkr, 1),
            "git_fast_import_feed_busy": round(git.busy, 1),
            "history_wall_both": round(t_hist_total, 1),
            "git_gc": round(t_gc, 1),
            "git_checkout": round(t_checkout, 1),
        },
        "text_bytes_initial": nbytes,
        "bam_files": nbam,
        "bam_bytes": bam_total,
        "bkr_history_via": how,
    }
    (work / GEN_MARKER).write_text(json.dumps(info, indent=1))
    return info


def gen_params(a: argparse.Namespace) -> dict[str, object]:
    return {
        k: getattr(a, k)
        for k in (
            "files",
            "dirs",
            "csets",
            "bam_gib",
            "bam_file_mib",
            "dirs_per_cset",
            "files_per_dir",
            "seed",
        )
    }


def disk_usage(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def sanity(work: Path, a: argparse.Namespace) -> dict[str, object]:
    """Both repos hold the same history length and a clean tree; the trees are identical."""
    bkr_root, git_root = work / "bkr", work / "git"
    n_bkr = len(run([BKR, "log", "--keys"], bkr_root).split())
    n_git = int(_git(git_root, "rev-list", "--count", "HEAD").strip())
    if n_bkr != n_git:
        raise RuntimeError(f"history lengths differ: bkr {n_bkr}, git {n_git}")
    st_bkr = run([BKR, "status"], bkr_root)  # also hashes stats the scoped commits left racy
    st_git = _git(git_root, "status", "--porcelain")
    if st_bkr.strip() or st_git.strip():
        raise RuntimeError(f"trees not clean:\nbkr:\n{st_bkr[:2000]}\ngit:\n{st_git[:2000]}")
    diff = subprocess.run(
        ["diff", "-rq", "--exclude=.bk", "--exclude=.git", str(bkr_root), str(git_root)],
        capture_output=True,
        text=True,
    )
    if diff.returncode != 0:
        raise RuntimeError(f"working trees differ:\n{diff.stdout[:2000]}")
    tracked = len(_git(git_root, "ls-files", "-z").split("\0")) - 1
    return {
        "csets": n_bkr,
        "tracked_files": tracked,
        "bkr_repo_bytes": disk_usage(bkr_root / ".bk"),
        "git_repo_bytes": disk_usage(git_root / ".git"),
        "working_tree_bytes": disk_usage(git_root) - disk_usage(git_root / ".git"),
    }


# -- the comparisons ---------------------------------------------------------------------------
@dataclass
class Pair:
    """One side-by-side comparison: samples of bkr and of its peer."""

    key: str
    metric: str
    bkr_cmd: str
    peer_cmd: str
    required: bool  # a target of the issue (else extra information)
    bkr: list[Sample] = field(default_factory=list)
    peer: list[Sample] = field(default_factory=list)
    rss_limit_kib: int | None = None
    note: str = ""


def interleaved(
    reps: int, bkr: Callable[[int], Sample], peers: list[Callable[[int], Sample]]
) -> tuple[list[Sample], list[list[Sample]]]:
    """Alternate the order (bkr first on even reps, last on odd ones) to spread drift fairly."""
    bs: list[Sample] = []
    ps: list[list[Sample]] = [[] for _ in peers]
    for r in range(reps):
        if r % 2 == 0:
            bs.append(bkr(r))
        for i, peer in enumerate(peers):
            ps[i].append(peer(r))
        if r % 2 == 1:
            bs.append(bkr(r))
    return bs, ps


def bench_status(work: Path, reps: int, log: Callable[[str], None]) -> list[Pair]:
    bkr_root, git_root = work / "bkr", work / "git"
    pair = Pair(
        "status",
        "status, unchanged tree",
        "bkr status",
        "git status",
        True,
        rss_limit_kib=512 * 1024,
    )
    # The floor of any single-process Python status: start-up, then one os.lstat per tracked
    # file (paths listed beforehand), with no index and no comparison.
    listing = work / "status-floor.list"
    names = _git(git_root, "ls-files", "-z").encode().split(b"\0")[:-1]
    listing.write_bytes(b"\0".join(os.fsencode(bkr_root) + b"/" + n for n in names))
    floor = [sys.executable, "-c", _LSTAT_ALL, str(listing)]
    startup = [sys.executable, "-c", "pass"]
    log("status: warm-up (one untimed run of each)")
    for cmd, cwd in (([BKR, "status"], bkr_root), (["git", "status"], git_root), (floor, work)):
        measure(cmd, cwd)
    settle()
    pair.bkr, (pair.peer, floor_s, startup_s) = interleaved(
        reps,
        lambda r: measure([BKR, "status"], bkr_root),
        [
            lambda r: measure(["git", "status"], git_root),
            lambda r: measure(floor, work),
            lambda r: measure(startup, work),
        ],
    )
    log(f"status: bkr {med(pair.bkr):.3f}s  git {med(pair.peer):.3f}s")
    info = [
        Pair(
            "status_floor",
            f"status floor: Python start-up + os.lstat of the {len(names):,} files",
            "python: lstat every tracked file",
            "git status",
            False,
            floor_s,
            pair.peer,
            note="one process, paths listed beforehand, no index, no comparison",
        ),
        Pair(
            "status_startup",
            "Python start-up alone",
            "python -c pass",
            "git status",
            False,
            startup_s,
            pair.peer,
        ),
    ]
    return [pair, *info]


_LSTAT_ALL = """
import os, sys
with open(sys.argv[1], "rb") as f:
    paths = f.read().split(b"\\0")
for _ in map(os.lstat, paths):
    pass
"""


def bench_clone(work: Path, reps: int, log: Callable[[str], None]) -> list[Pair]:
    bkr_root, git_root = work / "bkr", work / "git"
    dest = work / "clones"
    dest.mkdir(exist_ok=True)

    def cloned(cmd: list[str], d: Path) -> Sample:
        prewarm(bkr_root / ".bk" if cmd[0] == BKR else git_root / ".git")
        s = measure([*cmd, str(d)], dest)
        shutil.rmtree(d)
        settle()
        return s

    bkr_cmd = [BKR, "clone", "-q", "--checkout", "none", str(bkr_root)]
    bkr_copy = [BKR, "clone", "-q", "--checkout", "none", "--no-hardlinks", str(bkr_root)]
    git_cmd = ["git", "clone", "-q", "--no-local", "--no-checkout", str(git_root)]
    log("clone: warm-up (one untimed run of each)")
    for cmd, name in ((bkr_cmd, "b"), (bkr_copy, "c"), (git_cmd, "g")):
        cloned(cmd, dest / f"warm-{name}")
    main = Pair(
        "clone",
        "clone --checkout none (BAM hardlinked: the default)",
        "bkr clone --checkout none SRC DST",
        "git clone --no-local --no-checkout SRC DST",
        True,
        rss_limit_kib=512 * 1024,
    )
    copy = Pair(
        "clone_copy",
        "clone --checkout none --no-hardlinks (BAM copied and verified)",
        "bkr clone --checkout none --no-hardlinks SRC DST",
        "git clone --no-local --no-checkout SRC DST",
        False,
        rss_limit_kib=512 * 1024,
        note="git copies its BAM blobs too (in the pack), so this is the like-for-like copy",
    )
    bs: list[Sample] = []
    cs: list[Sample] = []
    gs: list[Sample] = []
    for r in range(reps):
        order = [(bkr_cmd, bs, "b"), (bkr_copy, cs, "c"), (git_cmd, gs, "g")]
        if r % 2:
            order.reverse()
        for cmd, out, name in order:
            out.append(cloned(cmd, dest / f"{name}{r}"))
    main.bkr, main.peer = bs, gs
    copy.bkr, copy.peer = cs, gs
    log(f"clone: bkr {med(bs):.2f}s  bkr --no-hardlinks {med(cs):.2f}s  git {med(gs):.2f}s")
    return [main, copy]


def bench_commit(work: Path, reps: int, size: int, log: Callable[[str], None]) -> list[Pair]:
    bkr_root = work / "bkr"
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    gib = f"{size / GIB:g} GiB"

    def peer(sync: bool) -> Callable[[int, Path], Sample]:
        script = 'sha256sum "$1" >/dev/null && cp "$1" "$2"' + (' && sync "$2"' if sync else "")

        def go(r: int, f: Path) -> Sample:
            dst = scratch / "copy.bin"
            prewarm(f)
            s = measure(["sh", "-c", script, "sh", str(f), str(dst)], scratch)
            dst.unlink()
            settle()
            return s

        return go

    def new_file(tag: str, r: int) -> Path:
        rel = Path("bench-commit") / f"{tag}-{r}.bin"
        f = bkr_root / rel
        write_random(f, f"commit-{tag}-{r}-{time.time_ns()}".encode(), size)
        run([BKR, "add", "-q", str(rel)], bkr_root)
        settle()  # the new file is in the page cache (warm) and clean
        return f

    pairs = []
    for tag, scoped in (("scoped", True), ("whole", False)):
        p_cp = Pair(
            f"commit_{tag}",
            f"commit a new {gib} BAM file"
            + (" (bkr commit FILE)" if scoped else " (bkr commit, whole tree scanned)"),
            "bkr commit -m M FILE" if scoped else "bkr commit -m M",
            "sha256sum FILE && cp FILE COPY",
            scoped,
            rss_limit_kib=max(size // 4, 128 * MIB) // 1024,
            note="" if scoped else "includes the full-tree status scan",
        )
        p_sync = Pair(
            f"commit_{tag}_fsync",
            f"commit a new {gib} BAM file vs a durable copy"
            + (" (bkr commit FILE)" if scoped else " (bkr commit)"),
            p_cp.bkr_cmd,
            "sha256sum FILE && cp FILE COPY && sync COPY",
            False,
            rss_limit_kib=max(size // 4, 128 * MIB) // 1024,
            note="bkr fsyncs the pool object; plain cp leaves the write-back to later",
        )
        for r in range(reps):
            mark = repo_mark(bkr_root)
            f = new_file(tag, r)
            cmd = [BKR, "commit", "-q", "-m", f"bench {tag} {r}"] + ([str(f)] if scoped else [])

            def b(_: int, cmd: list[str] = cmd, f: Path = f) -> Sample:
                prewarm(f)
                s = measure(cmd, bkr_root)
                settle()
                return s

            steps: list[tuple[Callable[[int], Sample], list[Sample]]] = [
                (b, p_cp.bkr),
                (lambda r, f=f: peer(False)(r, f), p_cp.peer),
                (lambda r, f=f: peer(True)(r, f), p_sync.peer),
            ]
            if r % 2:
                steps.reverse()
            for fn, out in steps:
                out.append(fn(r))
            restore(bkr_root, mark)  # every repetition starts from the same repository
        p_sync.bkr = p_cp.bkr
        log(
            f"commit ({tag}): bkr {med(p_cp.bkr):.2f}s  sha256sum+cp {med(p_cp.peer):.2f}s  "
            f"+sync {med(p_sync.peer):.2f}s"
        )
        pairs += [p_cp, p_sync]

    return pairs


def repo_mark(bkr_root: Path) -> tuple[set[str], set[str]]:
    """The csets and pool objects of the repository now (see :func:`restore`)."""
    keys = set(run([BKR, "log", "--keys"], bkr_root).split())
    return keys, {p.name for p in (bkr_root / ".bk" / "bam").glob("??/*")}


def restore(bkr_root: Path, mark: tuple[set[str], set[str]]) -> None:
    """Undo the csets made since ``mark`` (``bkr undo`` removes their files) and delete the
    pool objects they added, so the disk holds one test file at a time."""
    keys, objects = mark
    new = [k for k in run([BKR, "log", "--keys"], bkr_root).split() if k not in keys]
    if new:
        run([BKR, "undo", "-q", "-r", new[-1]], bkr_root)  # log is newest first
    for p in (bkr_root / ".bk" / "bam").glob("??/*"):
        if p.name not in objects:
            p.unlink()
    shutil.rmtree(bkr_root / "bench-commit", ignore_errors=True)
    settle()


# -- profiling (optional) ----------------------------------------------------------------------
def profile(work: Path, out: Path, stamp: str, size: int, log: Callable[[str], None]) -> dict:
    """One cProfile'd run of the bkr side of each metric; .prof files and top-30 listings."""
    import pstats

    bkr_root = work / "bkr"
    py = [sys.executable, "-m", "cProfile", "-o"]
    results = {}

    def prof(name: str, args: list[str], cwd: Path) -> None:
        pfile = out / f"engine-{stamp}-{name}.prof"
        s = measure([*py, str(pfile), "-m", "bkrepo", *args], cwd)
        txt = out / f"engine-{stamp}-{name}.txt"
        with open(txt, "w") as fh:
            st = pstats.Stats(str(pfile), stream=fh)
            st.sort_stats("cumulative").print_stats(40)
            st.sort_stats("tottime").print_stats(30)
        results[name] = {"prof": str(pfile), "text": str(txt), "wall_under_profiler": s.wall}
        log(f"profile {name}: {s.wall:.2f}s under cProfile -> {txt}")

    prof("status", ["status"], bkr_root)
    dest = work / "clones" / "prof"
    prof("clone", ["clone", "-q", "--checkout", "none", str(bkr_root), str(dest)], work)
    shutil.rmtree(dest)
    f = bkr_root / "bench-commit" / "prof.bin"
    mark = repo_mark(bkr_root)
    write_random(f, f"prof-{time.time_ns()}".encode(), size)
    run([BKR, "add", "-q", str(f)], bkr_root)
    settle()
    prof("commit", ["commit", "-q", "-m", "prof", str(f)], bkr_root)
    restore(bkr_root, mark)
    return results


# -- reporting ---------------------------------------------------------------------------------
def med(samples: list[Sample], attr: str = "wall") -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def rows_for(pairs: list[Pair], target_ratio: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for p in pairs:
        b, g = med(p.bkr), med(p.peer)
        ratio = b / g if g else float("inf")
        rows.append(
            {
                "key": p.key,
                "metric": p.metric,
                "kind": "time",
                "bkr": round(b, 4),
                "peer": round(g, 4),
                "unit": "s",
                "ratio": round(ratio, 3),
                "target": f"<= {target_ratio}x",
                "pass": ratio <= target_ratio,
                "required": p.required,
                "bkr_cmd": p.bkr_cmd,
                "peer_cmd": p.peer_cmd,
                "note": p.note,
                "bkr_samples": [asdict(s) for s in p.bkr],
                "peer_samples": [asdict(s) for s in p.peer],
                "bkr_cpu_median": round(med(p.bkr, "cpu"), 4),
                "peer_cpu_median": round(med(p.peer, "cpu"), 4),
            }
        )
    for p in pairs:
        if p.rss_limit_kib is None or p.key.endswith("_fsync"):
            continue
        b = max(s.anon_kib for s in p.bkr) / 1024
        g = max(s.anon_kib for s in p.peer) / 1024
        limit = p.rss_limit_kib / 1024
        rows.append(
            {
                "key": f"{p.key}_rss",
                "metric": f"peak memory: {p.metric}",
                "kind": "memory",
                "bkr": round(b, 1),
                "peer": round(g, 1),
                "bkr_maxrss": round(max(s.maxrss_kib for s in p.bkr) / 1024, 1),
                "peer_maxrss": round(max(s.maxrss_kib for s in p.peer) / 1024, 1),
                "unit": "MiB",
                "ratio": None,
                "target": f"anon < {limit:.0f} MiB",
                "pass": b < limit,
                "required": p.required,
                "bkr_cmd": p.bkr_cmd,
                "peer_cmd": p.peer_cmd,
                "note": "max over repetitions of the sampled anonymous RSS (bkr/peer) and of "
                "ru_maxrss (bkr_maxrss/peer_maxrss, which includes mapped file pages)",
            }
        )
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    head = ("metric", "bkr", "peer", "ratio", "target", "result")
    body = []
    for r in rows:
        res = "pass" if r["pass"] else "FAIL"
        if not r["required"]:
            res = f"({res.lower()}, info)"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        if r["unit"] == "s":
            b, g = f"{r['bkr']:.3f} s", f"{r['peer']:.3f} s"
        else:  # anonymous RSS, then ru_maxrss
            b = f"{r['bkr']:.0f} ({r['bkr_maxrss']:.0f}) MiB"
            g = f"{r['peer']:.0f} ({r['peer_maxrss']:.0f}) MiB"
        body.append((str(r["metric"]), b, g, ratio, str(r["target"]), res))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for row in body:
        print(
            "  ".join(
                c.ljust(w) if i in (0, 4, 5) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(line)


def machine() -> dict[str, object]:
    import bkrepo

    src = Path(bkrepo.__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "bkr": BKR,
        "bkrepo": str(Path(bkrepo.__file__).parent),
        "bkrepo_git_head": head or None,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": run(["git", "--version"], Path("/")).strip(),
        "loadavg_start": os.getloadavg(),
    }


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--files", type=int, default=100_000, help="files in the tree (100,000)")
    p.add_argument("--dirs", type=int, default=1_000, help="leaf directories (1,000)")
    p.add_argument("--csets", type=int, default=1_000, help="csets/commits of history (1,000)")
    p.add_argument("--bam-gib", type=float, default=2.0, help="GiB of BAM files in history (2)")
    p.add_argument("--bam-file-mib", type=int, default=32, help="size of each BAM file (32 MiB)")
    p.add_argument("--commit-gib", type=float, default=1.0, help="size of the committed file (1)")
    p.add_argument("--dirs-per-cset", type=int, default=3, help="directories each cset edits")
    p.add_argument("--files-per-dir", type=int, default=3, help="files edited per directory")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of status (5)")
    p.add_argument("--clone-reps", type=int, default=3, help="... of clone (3)")
    p.add_argument("--commit-reps", type=int, default=3, help="... of commit (3)")
    p.add_argument("--target", type=float, default=1.5, help="ratio target (1.5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--only", default="status,clone,commit", help="comma-separated subset of the metrics"
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="where JSON goes")
    p.add_argument(
        "--work",
        type=Path,
        help="work directory (default: a new one under /tmp); reused if it holds a generation "
        "with the same parameters",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after measuring, run the bkr side of each metric once under cProfile",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    created = a.work is None
    work = Path(tempfile.mkdtemp(prefix="bkr-bench-", dir="/tmp")) if created else a.work
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"timestamp": stamp, "machine": machine(), "work": str(work)}
    try:
        marker = work / GEN_MARKER
        old = json.loads(marker.read_text()) if marker.exists() else None
        if old is not None and old.get("params") == gen_params(a):
            log(f"reusing the generated repositories in {work}")
            gen = old
            gen["reused"] = True
        else:
            free = shutil.disk_usage(work).free
            log(f"generating in {work} ({free / GIB:.0f} GiB free)")
            gen = generate(work, a, log)
        report["generation"] = gen
        report["repos"] = sanity(work, a)
        log(f"repos: {report['repos']}")

        pairs: list[Pair] = []
        size = int(a.commit_gib * GIB)
        if "status" in only:
            pairs += bench_status(work, a.reps, log)
        if "clone" in only:
            pairs += bench_clone(work, a.clone_reps, log)
        if "commit" in only:
            pairs += bench_commit(work, a.commit_reps, size, log)
        rows = rows_for(pairs, a.target)
        report["method"] = {
            "statistic": "median wall time of the repetitions; peak RSS = max ru_maxrss",
            "cache": "warm: every command ran once untimed before timing (status, clone); right "
            "before each timed run the inputs are read into the page cache (clone: the source "
            "repository's .bk or .git; commit: the new file), because DAMON pages out memory "
            "idle for ~60 s on this VM; caches are never dropped; os.sync() after every run "
            "that writes, so no run pays for another's write-back",
            "order": "bkr and peer interleaved, order alternating per repetition",
            "rss": "peak anonymous RSS of the command's process tree sampled from /proc every "
            "10 ms (the target applies to it); ru_maxrss from /usr/bin/time -f %M also reported",
            "reps": {"status": a.reps, "clone": a.clone_reps, "commit": a.commit_reps},
        }
        report["rows"] = rows
        report["machine"]["loadavg_end"] = os.getloadavg()  # type: ignore[index]
        if a.profile:
            report["profile"] = profile(work, a.out, stamp, size, log)
        path = a.out / f"engine-{stamp}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print()
        print_table(rows)
        print(
            "memory: peak anonymous RSS sampled every 10 ms (in parentheses: ru_maxrss, which "
            "also counts mapped file pages such as LMDB's map and git's pack windows)"
        )
        print(f"\nJSON: {path}")
        return 0 if all(r["pass"] for r in rows if r["required"]) else 1
    finally:
        if created and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif a.keep or not created:
            print(f"work directory kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
