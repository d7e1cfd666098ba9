"""bkfs benchmark: the lazy FUSE mount against native disk, curl, and ``rclone mount``.

One command generates, under /tmp, a served repository of 100,000 files, one with BAM files of
1, 4 and 10 GiB, and a 1,000,000-file tree; starts ``bkr serve`` and nginx on 127.0.0.1; and
measures, side by side in the same run (interleaved, medians):

* metadata walks (``ls -lR``, ``find | xargs stat``) of the 100,000 files: bkfs on a lazy clone
  against the native tree and ``rclone mount`` of the same files over HTTP; the requests each
  mount sends while walking (counted by nginx access logs);
* a cold sequential read of the 1 GiB BAM file against ``curl`` from the same server and
  rclone; a warm re-read against a native page-cache read and rclone;
* the first byte of a cold 4 KiB read near the end of the 1 GiB and the 10 GiB file;
* the first ``ls`` of a mount of the 1,000,000-file tree (and of a 1,000-file tree);
* the daemon's RSS and CPU while reading the 4 GiB file.

It prints a table and writes the same as JSON to ``benchmarks/results/bkfs-<timestamp>.json``;
exit status 1 when a target of the issue is missed.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_server import BkrServer, RssSampler, free_port, nginx_binary, prewarm, proc_cpu
from bench_server import proc_status as _proc_status

from bkrepo.objects import CHUNK_SIZE

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
BKR = str(VENV_BIN / "bkr") if (VENV_BIN / "bkr").exists() else shutil.which("bkr") or "bkr"
BKFS = str(VENV_BIN / "bkfs") if (VENV_BIN / "bkfs").exists() else shutil.which("bkfs") or "bkfs"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
GEN_MARKER = "generated.json"

SCALES: dict[str, dict[str, int]] = {
    "full": {
        "meta_files": 100_000,  # the metadata walk
        "meta_dirs": 1_000,
        "bam_every": 10,  # one file in this many is a BAM file (64-96 KiB)
        "big": GIB,  # cold/warm reads, first byte
        "rss": 4 * GIB,  # daemon memory while reading
        "huge": 10 * GIB,  # first byte of a huge file
        "million": 1_000_000,  # the first ls
        "million_dirs": 1_000,
        "thousand": 1_000,
    },
    "small": {
        "meta_files": 10_000,
        "meta_dirs": 100,
        "bam_every": 10,
        "big": 256 * MIB,
        "rss": GIB,
        "huge": 2 * GIB,
        "million": 100_000,
        "million_dirs": 100,
        "thousand": 1_000,
    },
}

BASE_ENV = {
    "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "BKR_USER": "bench <bench@example.com>",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- running commands --------------------------------------------------------------------------
@dataclass
class Sample:
    wall: float  # seconds
    load1: float  # 1-minute load average when it started
    bytes: int = 0  # payload bytes (throughputs)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.bytes / self.wall if self.wall else 0.0


def run(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """An unmeasured helper command: its stdout, or an error with its stderr."""
    p = subprocess.run(list(cmd), cwd=cwd, env=env or BASE_ENV, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} exited {p.returncode}:\n"
            + p.stderr.decode(errors="replace")[-3000:]
        )
    return p.stdout.decode(errors="replace")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: Sequence[str], env: dict[str, str] | None = None, nbytes: int = 0) -> Sample:
    """Run ``cmd`` with output discarded; wall time around it, and in ``extra["cpu"]`` the
    CPU seconds (user + system) of the command and the processes it waited for: the part
    of a walk through a mount that is the walker's and the kernel's, not the daemon's."""
    with tempfile.TemporaryFile() as err:
        load1 = os.getloadavg()[0]
        cpu0 = _children_cpu()
        start = time.perf_counter()
        p = subprocess.run(
            list(cmd),
            env=env or BASE_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        wall = time.perf_counter() - start
        cpu = _children_cpu() - cpu0
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} exited {p.returncode}:\n"
                + err.read().decode(errors="replace")[-2000:]
            )
    return Sample(wall, load1, nbytes, {"cpu": cpu})


def dd(path: Path, size: int) -> Sample:
    """A sequential read of a whole file with 1 MiB reads (the same reader for every side)."""
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], nbytes=size)


def settle() -> None:
    """Write back dirty pages between runs (bkfs's and rclone's caches write to disk), so no
    run pays for another's write-back."""
    os.sync()


def prewarm_range(path: Path, off: int, n: int) -> None:
    """Read part of a file into the page cache (the server side of a cold read is warm)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < n:
            got = os.pread(fd, min(8 * MIB, n - done), off + done)
            if not got:
                break
            done += len(got)
    finally:
        os.close(fd)


def drop_pages(path: Path) -> None:
    """Drop one file's pages from the page cache (nothing else's: the machine is shared)."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_status(pid: int) -> dict[str, int]:
    return _proc_status(pid)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (rclone and the bkfs daemon are single processes, but a
    launcher may sit in between)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def mounted(mnt: Path) -> str | None:
    """The fstype mounted at ``mnt`` (from /proc/self/mountinfo), or None."""
    target = str(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == target:
                return parts[parts.index("-") + 1]
    return None


# -- the mounts --------------------------------------------------------------------------------
class Mounts:
    """Every mount this run made, so ``finally`` can take down what is left."""

    def __init__(self) -> None:
        self.live: dict[Path, Callable[[], None]] = {}

    def add(self, mnt: Path, stop: Callable[[], None]) -> None:
        self.live[mnt] = stop

    def done(self, mnt: Path) -> None:
        self.live.pop(mnt, None)

    def stop_all(self) -> None:
        for mnt, stop in list(self.live.items()):
            try:
                stop()
            except Exception as e:  # cleanup reports and goes on
                log(f"could not unmount {mnt}: {e}")
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        self.live.clear()


MOUNTS = Mounts()


class BkfsMount:
    """``bkfs mount REPO MNT`` with its own cache directory; ``umount`` in ``close``."""

    def __init__(self, repo: Path, mnt: Path, cache_home: Path) -> None:
        self.repo, self.mnt, self.cache_home = repo, mnt, cache_home
        mnt.mkdir(parents=True, exist_ok=True)
        cache_home.mkdir(parents=True, exist_ok=True)
        self.env = {**BASE_ENV, "XDG_CACHE_HOME": str(cache_home)}
        start = time.perf_counter()
        run([BKFS, "mount", str(repo), str(mnt)], self.env)
        self.mount_seconds = time.perf_counter() - start
        MOUNTS.add(mnt, self.close)
        self.pid = int(self.status()["pid"])

    def status(self) -> dict[str, object]:
        return json.loads(run([BKFS, "status", str(self.mnt), "--json"], self.env))

    def close(self) -> None:
        if mounted(self.mnt):
            run([BKFS, "umount", str(self.mnt)], self.env)
        MOUNTS.done(self.mnt)


class RcloneMount:
    """``rclone mount :http: MNT --vfs-cache-mode full`` in the foreground, stopped by
    ``fusermount3 -u`` and then by pid."""

    def __init__(self, url: str, mnt: Path, cache_dir: Path, log_path: Path) -> None:
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        conf = cache_dir.parent / "rclone.conf"
        conf.touch()
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        cmd = [
            "rclone",
            "mount",
            ":http:",
            str(mnt),
            "--http-url",
            url,
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(cache_dir),
            "--read-only",
            "--config",
            str(conf),
        ]
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, env=BASE_ENV, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log
        )
        self.pid = self.proc.pid
        MOUNTS.add(mnt, self.close)
        deadline = time.monotonic() + 30
        while mounted(mnt) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"rclone mount did not come up; see {log_path}")
            time.sleep(0.01)
        self.mount_seconds = time.perf_counter() - start

    def close(self) -> None:
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        self.log.close()
        MOUNTS.done(self.mnt)


def rclone_version() -> str:
    if not shutil.which("rclone"):
        log("rclone is missing: installing Debian's rclone with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "rclone"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
                raise RuntimeError("rclone is not installed and apt-get could not install it")
    return run(["rclone", "version"]).splitlines()[0].strip()


# -- nginx: files for rclone, and a logging proxy in front of bkr serve ----------------------
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    server {{
        listen 127.0.0.1:{files_port};
        access_log {work}/files.log;
        root {web};
        location / {{ autoindex on; }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        access_log {work}/proxy.log;
        location / {{
            proxy_pass {bkr_url};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground (daemon off), stopped by pid: ``files`` serves the web tree
    with directory listings (what rclone's http backend reads); ``proxy`` forwards to
    ``bkr serve`` and logs every request (what a mount asks the BAM server)."""

    def __init__(self, web: Path, work: Path, bkr_url: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "tmp").mkdir(exist_ok=True)
        self.work = work
        self.files_port, self.proxy_port = free_port(), free_port()
        conf = work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                work=work,
                web=web,
                files_port=self.files_port,
                proxy_port=self.proxy_port,
                bkr_url=bkr_url,
            )
        )
        binary = nginx_binary()
        self.version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
        self.log = open(work / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(work)], stdout=self.log, stderr=self.log
        )
        self.pid = self.proc.pid
        import socket

        deadline = time.monotonic() + 10
        for port in (self.files_port, self.proxy_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"nginx did not start; see {work}/error.log") from None
                    time.sleep(0.05)
        self.files_url = f"http://127.0.0.1:{self.files_port}"
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"

    def requests(self, which: str) -> int:
        """Requests logged so far by the ``files`` or ``proxy`` server."""
        try:
            with open(self.work / f"{which}.log", "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- generating the data -----------------------------------------------------------------------
class Noise:
    """Incompressible bytes, fast: a 64 MiB random block; every MiB of a generated file starts
    with a header naming the file and the MiB, so all chunks differ."""

    def __init__(self, seed: int) -> None:
        self.block = random.Random(seed).randbytes(64 * MIB)

    def mib(self, name: str, i: int) -> bytes:
        header = f"bench {name} MiB {i}\n".encode().ljust(64, b"\0")
        start = (i * 7_919 * 4_096) % (len(self.block) - MIB)
        return header + self.block[start : start + MIB - len(header)]


class NoiseReader:
    """A file-like source of a generated file's bytes (``readinto``), for ``hash_stream``."""

    def __init__(self, noise: Noise, name: str, size: int) -> None:
        self.noise, self.name, self.size = noise, name, size
        self.pos = 0

    def readinto(self, buf: bytearray) -> int:
        n = 0
        view = memoryview(buf)
        while n < len(buf) and self.pos < self.size:
            i, within = divmod(self.pos, MIB)
            data = self.noise.mib(self.name, i)[within:]
            take = min(len(data), len(buf) - n, self.size - self.pos)
            view[n : n + take] = data[:take]
            n += take
            self.pos += take
        return n


def new_repo(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    run([BKR, "init", "-q", str(path)])
    run([BKR, "bam", "server", "-q", "."], cwd=path)


def record_tree(repo_root: Path, files: dict[bytes, object], message: str) -> str:
    """Record one cset whose tree is ``files`` (path -> TreeEntry without its name), in
    process; returns the cset key."""
    from bkrepo import objects as ob
    from bkrepo import trees
    from bkrepo.repo import Repo

    repo = Repo.open(repo_root)
    try:
        with repo.store.write() as txn:
            tree = trees.apply_edits(txn, None, files)  # type: ignore[arg-type]
            cset = ob.Cset(
                parents=(),
                tree=tree,
                author=BASE_ENV["BKR_USER"],
                time=int(time.time()),
                comment=message,
            )
            key = txn.put_object(ob.CSET, cset.encode())
            repo.record_cset(txn, key, cset)
            txn.set_meta("tip", key.hex())
        return key.hex()
    finally:
        repo.close()


def gen_big(work: Path, scale: dict[str, int], noise: Noise) -> dict[str, object]:
    """``srv/big``: BAM files written straight into the pool while hashing (no working copy,
    so a 10 GiB file costs 10 GiB of disk), recorded in one cset; ``web/big/NAME`` hardlinks
    the pool objects for nginx."""
    from bkrepo import objects as ob
    from bkrepo.ids import new_root_key
    from bkrepo.pool import _write_all, hash_stream
    from bkrepo.repo import Repo

    t0 = time.perf_counter()
    root = work / "srv" / "big"
    new_repo(root)
    repo = Repo.open(root)
    entries: dict[bytes, object] = {}
    objects: dict[str, dict[str, object]] = {}
    try:
        for name, size in (
            ("big.bin", scale["big"]),
            ("rss.bin", scale["rss"]),
            ("huge.bin", scale["huge"]),
        ):
            log(f"  {name}: {size / GIB:.2f} GiB into the pool")
            fd, tmp = repo.pool.new_temp()
            try:
                hashed = hash_stream(NoiseReader(noise, name, size), _write_all(fd))
                os.fsync(fd)
            finally:
                os.close(fd)
            final = repo.pool.install(tmp, hashed.oid)
            ptr, chunk_list = hashed.pointer()
            with repo.store.write() as txn:
                txn.put_object(ob.CHNK, chunk_list)
                pid = txn.put_object(ob.BAMP, ptr.encode())
            rk = new_root_key(repo.project_id, name.encode(), b"bench")
            entries[name.encode()] = ob.TreeEntry(
                b"", ob.K_BAM, 0o644, size, int(time.time()), rk, pid
            )
            web = work / "web" / "big" / name
            web.parent.mkdir(parents=True, exist_ok=True)
            web.unlink(missing_ok=True)
            os.link(final, web)
            objects[name] = {"oid": hashed.oid.hex(), "size": size, "pool": str(final)}
    finally:
        repo.close()
    record_tree(root, entries, "big BAM files")
    return {"objects": objects, "seconds": round(time.perf_counter() - t0, 1)}


def gen_meta(work: Path, scale: dict[str, int], noise: Noise) -> dict[str, object]:
    """``srv/meta``: ``meta_files`` files in ``meta_dirs`` leaf directories (under 10
    parents), committed with bkr (text files into history, every ``bam_every``-th a binary
    BAM file); ``web/meta`` hardlinks the same working files: the native tree and what nginx
    lists for rclone."""
    from bkrepo.commit import add, commit
    from bkrepo.repo import Repo

    t0 = time.perf_counter()
    root = work / "srv" / "meta"
    new_repo(root)
    n, dirs, every = scale["meta_files"], scale["meta_dirs"], scale["bam_every"]
    rng = random.Random(7)
    per = n // dirs
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)
    ]
    bam_bytes = 0
    for d in range(dirs):
        sub = root / f"p{d % 10}" / f"d{d:04d}"
        sub.mkdir(parents=True)
        for j in range(per):
            k = d * per + j
            if k % every == every - 1:
                size = rng.randint(64, 96) * KIB
                body = noise.mib(f"meta{k}", k % 64)[: size - 8] + b"\0" * 8
                (sub / f"f{k:06d}.bin").write_bytes(body)
                bam_bytes += len(body)
            else:
                line = b" ".join(rng.choices(words, k=12)) + b"\n"
                (sub / f"f{k:06d}.txt").write_bytes(
                    f"file {k}\n".encode() + line * rng.randint(1, 30)
                )
    log(f"  wrote {n} files in {time.perf_counter() - t0:.0f}s; committing")
    os.environ.update({k: v for k, v in BASE_ENV.items() if k.startswith("BKR_")})
    repo = Repo.open(root)
    try:
        add(repo, [str(root)])
        commit(repo, "meta: many files")
    finally:
        repo.close()
    web = work / "web" / "meta"
    shutil.rmtree(web, ignore_errors=True)
    web.mkdir(parents=True)
    run(["cp", "-al", *(str(root / f"p{i}") for i in range(min(10, dirs))), str(web)])
    pooled = sum(1 for _ in (root / ".bk" / "bam").glob("??/*"))
    return {
        "files": per * dirs,
        "bam_files": pooled,
        "bam_bytes": bam_bytes,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def gen_tree(work: Path, name: str, files: int, dirs: int) -> dict[str, object]:
    """``srv/NAME``: a tree of ``files`` tiny files in ``dirs`` leaf directories (under
    ~sqrt(dirs) parents) recorded in process, tree object by tree object, from 16 distinct
    small blobs; no working files (it is mounted, never checked out)."""
    from bkrepo import objects as ob
    from bkrepo.repo import Repo

    t0 = time.perf_counter()
    root = work / "srv" / name
    new_repo(root)
    repo = Repo.open(root)
    now = int(time.time())
    per = max(1, files // dirs)
    parents = max(1, int(dirs**0.5))
    try:
        with repo.store.write() as txn:
            blobs = []
            for b in range(16):
                data = (f"tiny file {b}\n" * (b + 1)).encode()
                blobs.append((txn.put_object(ob.BLOB, data), len(data)))
            tops: dict[int, list[ob.TreeEntry]] = {}
            for d in range(dirs):
                leaf = []
                for j in range(per):
                    bid, size = blobs[(d + j) % 16]
                    rk = hashlib.blake2b(b"%d/%d" % (d, j), digest_size=16).digest()
                    leaf.append(
                        ob.TreeEntry(
                            b"f%07d.txt" % (d * per + j), ob.K_FILE, 0o644, size, now, rk, bid
                        )
                    )
                tid = txn.put_object(ob.TREE, ob.encode_tree(leaf))
                tops.setdefault(d % parents, []).append(
                    ob.TreeEntry(b"d%05d" % d, ob.K_DIR, 0o755, 0, now, b"", tid)
                )
            top = []
            for p, subs in sorted(tops.items()):
                tid = txn.put_object(ob.TREE, ob.encode_tree(subs))
                top.append(ob.TreeEntry(b"p%03d" % p, ob.K_DIR, 0o755, 0, now, b"", tid))
            root_tree = txn.put_object(ob.TREE, ob.encode_tree(top))
            cset = ob.Cset((), root_tree, BASE_ENV["BKR_USER"], now, f"{files} tiny files")
            key = txn.put_object(ob.CSET, cset.encode())
            repo.record_cset(txn, key, cset)
            txn.set_meta("tip", key.hex())
    finally:
        repo.close()
    return {
        "files": per * dirs,
        "dirs": dirs,
        "parents": parents,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def disk_needed(scale: dict[str, int]) -> int:
    big = scale["big"] + scale["rss"] + scale["huge"]
    meta = scale["meta_files"] * 12 * KIB  # files, BAM pool copies, history
    tree = scale["million"] * 600  # history of the big tree and its indexes
    caches = 2 * scale["rss"]  # bkfs's and rclone's caches while reading the rss file
    return big + meta + tree + caches + GIB


def generate(work: Path, scale: dict[str, int]) -> dict[str, object]:
    noise = Noise(1)
    out: dict[str, object] = {}
    log(f"generating meta: {scale['meta_files']} files")
    out["meta"] = gen_meta(work, scale, noise)
    log(
        "generating big: BAM files of "
        + ", ".join(f"{scale[k] / GIB:.2f}" for k in ("big", "rss", "huge"))
        + " GiB"
    )
    out["big"] = gen_big(work, scale, noise)
    log(f"generating million: {scale['million']} files in {scale['million_dirs']} directories")
    out["million"] = gen_tree(work, "million", scale["million"], scale["million_dirs"])
    out["thousand"] = gen_tree(work, "thousand", scale["thousand"], 10)
    return out


# -- results -----------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    metric: str
    unit: str  # "s", "ms", "GB/s", "MB", "req"
    bkfs: float
    peer: float | None
    ratio: float | None
    target: str
    ok: bool | None  # None: information only
    peer_name: str = ""
    bkfs_cmd: str = ""
    peer_cmd: str = ""
    note: str = ""
    samples: dict[str, list[dict[str, object]]] = field(default_factory=dict)


def as_dicts(samples: list[Sample]) -> list[dict[str, object]]:
    return [{**asdict(s), "rate": s.rate} for s in samples]


def med(samples: list[Sample], attr: str = "wall") -> float:
    return statistics.median(getattr(s, attr) for s in samples)


class Bench:
    def __init__(self, work: Path, scale: dict[str, int], reps: int) -> None:
        self.work = work
        self.scale = scale
        self.reps = reps
        self.rows: list[Row] = []
        self.extra: dict[str, object] = {}
        self.gen: dict[str, object] = json.loads((work / GEN_MARKER).read_text())["generation"]
        self.bkr = BkrServer(work / "srv", work / "serve.log")
        self._stops: list[Callable[[], None]] = [self.bkr.stop]  # servers, newest first
        try:
            self._start(work)
        except BaseException:
            self.stop()
            raise

    def _start(self, work: Path) -> None:
        """nginx, rclone, and the lazy clones; on failure ``__init__`` stops what started."""
        log(f"bkr serve {self.bkr.url} (pid {self.bkr.pid})")
        nginx = self.nginx = Nginx(work / "web", work / "nginx", self.bkr.url)
        self._stops.insert(0, nginx.stop)
        log(f"nginx files {nginx.files_url}, proxy {nginx.proxy_url} (pid {nginx.pid})")
        self.rclone = rclone_version()
        self.run_dir = work / "run"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir()
        self._n = 0
        # lazy clones: meta through the logging proxy (its requests are counted), big direct
        self.meta_clone = self.run_dir / "meta-clone"
        clone = [BKR, "clone", "-q", "--checkout", "none"]
        run([*clone, f"{nginx.proxy_url}/meta", str(self.meta_clone)])
        self.big_clone = self.run_dir / "big-clone"
        run([*clone, f"{self.bkr.url}/big", str(self.big_clone)])

    def stop(self) -> None:
        MOUNTS.stop_all()
        for stop in self._stops:
            stop()
        self._stops = []

    def fresh(self, tag: str) -> Path:
        self._n += 1
        return self.run_dir / f"{tag}-{self._n}"

    def bkfs_mount(self, repo: Path, tag: str) -> BkfsMount:
        """A mount with its own, empty cache: nothing of it is in bkfs's cache or in the
        mount's page cache (a new mount has new inodes)."""
        d = self.fresh(tag)
        return BkfsMount(repo, d / "mnt", d / "cache")

    def rclone_mount(self, url: str, tag: str) -> RcloneMount:
        d = self.fresh(tag)
        return RcloneMount(url, d / "mnt", d / "cache", d / "rclone.log")

    def drop(self, m: BkfsMount | RcloneMount) -> None:
        m.close()
        shutil.rmtree(m.mnt.parent, ignore_errors=True)
        settle()

    def rotate(self, fns: list[Callable[[int], None]], reps: int | None = None) -> None:
        """Run each function ``reps`` times, rotating which goes first."""
        for r in range(reps or self.reps):
            k = r % len(fns)
            for fn in fns[k:] + fns[:k]:
                fn(r)

    def big_object(self, name: str) -> tuple[Path, int, str]:
        o = self.gen["big"]["objects"][name]  # type: ignore[index]
        return Path(o["pool"]), int(o["size"]), str(o["oid"])

    # -- 1. metadata walks ------------------------------------------------------------------
    def bench_meta(self) -> None:
        n = int(self.gen["meta"]["files"])  # type: ignore[index]
        native = self.work / "web" / "meta"
        walks = {
            "ls": ("ls -lR", lambda d: ["ls", "-lR", str(d)]),
            "stat": (
                "find -type f | xargs stat",
                lambda d: ["sh", "-c", f"find '{d}' -type f -print0 | xargs -0 stat > /dev/null"],
            ),
        }
        for key, (label, cmd) in walks.items():
            self._meta_walk(n, native, key, label, cmd)

    def _meta_walk(
        self, n: int, native: Path, key: str, label: str, cmd: Callable[[Path], list[str]]
    ) -> None:
        res: dict[str, list[Sample]] = {
            k: [] for k in ("native", "bkfs_first", "bkfs_warm", "rclone_first", "rclone_warm")
        }
        reqs: dict[str, list[int]] = {"bkfs": [], "rclone": [], "bkfs_status": []}

        def native_walk(r: int) -> None:
            timed(cmd(native))  # its dentries and inodes were cached by generation
            res["native"].append(timed(cmd(native)))

        def bkfs_walk(r: int) -> None:
            m = self.bkfs_mount(self.meta_clone, "meta")
            try:
                before = self.nginx.requests("proxy")
                res["bkfs_first"].append(timed(cmd(m.mnt)))
                res["bkfs_warm"].append(timed(cmd(m.mnt)))
                reqs["bkfs"].append(self.nginx.requests("proxy") - before)
                reqs["bkfs_status"].append(int(m.status()["server_requests"]))  # type: ignore[arg-type]
            finally:
                self.drop(m)

        def rclone_walk(r: int) -> None:
            m = self.rclone_mount(f"{self.nginx.files_url}/meta/", "rmeta")
            try:
                before = self.nginx.requests("files")
                res["rclone_first"].append(timed(cmd(m.mnt)))
                res["rclone_warm"].append(timed(cmd(m.mnt)))
                reqs["rclone"].append(self.nginx.requests("files") - before)
            finally:
                self.drop(m)

        self.rotate([native_walk, bkfs_walk, rclone_walk])
        nat = med(res["native"])
        for phase, limit in (("first", 1.5), ("warm", 1.2)):
            b, rc = med(res[f"bkfs_{phase}"]), med(res[f"rclone_{phase}"])
            self.rows.append(
                Row(
                    f"meta_{key}_{phase}",
                    f"{label} over {n:,} files, "
                    + ("first walk after mount" if phase == "first" else "warm"),
                    "s",
                    b,
                    nat,
                    b / nat,
                    f"<= {limit}x native",
                    b / nat <= limit,
                    peer_name="native",
                    bkfs_cmd=f"{label} MNT (a lazy clone mounted)",
                    peer_cmd=f"{label} of the same files on local disk (warm)",
                    note=f"rclone: {rc:.2f} s ({rc / nat:.1f}x native)",
                    samples={k: as_dicts(v) for k, v in res.items()},
                )
            )
        if key == "ls":
            self._walker_floor(label, res)
        self.rows.append(
            Row(
                f"meta_{key}_requests",
                f"{label}: requests to the server during both walks",
                "req",
                max(reqs["bkfs"]),
                statistics.median(reqs["rclone"]),
                None,
                "bkfs: 0",
                max(reqs["bkfs"]) == 0 and max(reqs["bkfs_status"]) == 0,
                peer_name="rclone",
                bkfs_cmd="nginx access log of the proxy in front of bkr serve",
                peer_cmd="nginx access log of the file server rclone reads",
                note=f"bkfs status server_requests: {reqs['bkfs_status']}; rclone per walk "
                f"pair: {reqs['rclone']} ({statistics.median(reqs['rclone']) / n:.2f} per file)",
            )
        )

    def _walker_floor(self, label: str, res: dict[str, list[Sample]]) -> None:
        """The CPU of the walking process itself in the first walk.  The kernel builds an
        inode for every entry of a READDIRPLUS reply in the walker's context, so this is spent
        whatever the daemon does; the walker waits on the daemon and the daemon on the walker,
        so for one walking process it is the first walk's floor (a pipeline's processes
        overlap, so theirs is not)."""
        nat = med(res["native"])
        walker = statistics.median(s.extra["cpu"] for s in res["bkfs_first"])
        nat_cpu = statistics.median(s.extra["cpu"] for s in res["native"])
        self.rows.append(
            Row(
                "meta_ls_first_walker_cpu",
                f"{label}, first walk: CPU of the walker itself (the floor)",
                "s",
                walker,
                nat,
                walker / nat,
                "(context)",
                None,
                peer_name="native",
                bkfs_cmd=f"user + system CPU of {label} MNT in the first walk (the kernel's "
                "work for its system calls included)",
                peer_cmd=f"wall time of {label} on local disk (warm)",
                note=f"a daemon answering every request in no time would leave the first walk "
                f"at {walker / nat:.2f}x native; the native walk's own CPU: {nat_cpu:.2f} s",
            )
        )

    # -- 2. sequential reads --------------------------------------------------------------
    def bench_read(self) -> None:
        pool, size, oid = self.big_object("big.bin")
        name = "big.bin"
        res: dict[str, list[Sample]] = {
            k: []
            for k in (
                "bkfs_cold",
                "bkfs_warm",
                "bkfs_later",
                "curl",
                "curl_file",
                "native",
                "native_cold",
                "native_reread",
                "rclone_cold",
                "rclone_warm",
                "rclone_later",
            )
        }
        cpu: list[float] = []  # the daemon's, per cold read
        server_cpu: list[float] = []  # bkr serve's, per cold read

        def bkfs(r: int) -> None:
            m = self.bkfs_mount(self.big_clone, "read")
            try:
                prewarm([pool])
                c0, s0 = proc_cpu(m.pid), proc_cpu(self.bkr.pid)
                res["bkfs_cold"].append(dd(m.mnt / name, size))
                cpu.append(proc_cpu(m.pid) - c0)
                server_cpu.append(proc_cpu(self.bkr.pid) - s0)
                res["bkfs_warm"].append(dd(m.mnt / name, size))
                res["bkfs_later"] += [dd(m.mnt / name, size) for _ in range(2)]
            finally:
                self.drop(m)

        def curl(r: int) -> None:
            prewarm([pool])
            url = f"{self.bkr.url}/big/bam/{oid}"
            res["curl"].append(timed(["curl", "-sS", "-f", "-o", "/dev/null", url], nbytes=size))
            out = self.work / "curl-out.bin"
            try:
                res["curl_file"].append(
                    timed(["curl", "-sS", "-f", "-o", str(out), url], nbytes=size)
                )
            finally:
                out.unlink(missing_ok=True)

        def native(r: int) -> None:
            prewarm([pool])
            res["native"].append(dd(pool, size))
            drop_pages(pool)  # this file only: a cold read fills the page cache from disk
            res["native_cold"].append(dd(pool, size))
            res["native_reread"].append(dd(pool, size))

        def rclone(r: int) -> None:
            m = self.rclone_mount(f"{self.nginx.files_url}/big/", "rread")
            try:
                prewarm([pool])
                res["rclone_cold"].append(dd(m.mnt / name, size))
                res["rclone_warm"].append(dd(m.mnt / name, size))
                res["rclone_later"] += [dd(m.mnt / name, size) for _ in range(2)]
            finally:
                self.drop(m)

        self.rotate([bkfs, curl, native, rclone])
        rate = {k: med(v, "rate") / 1e9 for k, v in res.items()}
        gib = f"{size / GIB:.2f} GiB"
        cold, warm = f"cold sequential read of a {gib} BAM file", f"warm re-read of the {gib} file"

        def vs(
            key: str,
            metric: str,
            mine: str,
            peer: str,
            peer_name: str,
            bkfs_cmd: str,
            peer_cmd: str,
            at_least: float | None = None,
            note: str = "",
            samples: dict[str, list[dict[str, object]]] | None = None,
        ) -> Row:
            """bkfs's rate ``mine`` against the peer's rate ``peer``; a target when
            ``at_least`` is given (the ratio it must reach), else context."""
            ratio = rate[mine] / rate[peer]
            return Row(
                key,
                metric,
                "GB/s",
                rate[mine],
                rate[peer],
                ratio,
                f">= {at_least:g}x {peer_name}" if at_least else "(context)",
                ratio >= at_least if at_least else None,
                peer_name=peer_name,
                bkfs_cmd=bkfs_cmd,
                peer_cmd=peer_cmd,
                note=note,
                samples=samples or {},
            )

        self.rows += [
            vs(
                "read_cold_vs_curl",
                cold,
                "bkfs_cold",
                "curl",
                "curl",
                "dd bs=1M of the file on a fresh mount with an empty cache",
                "curl -o /dev/null of the same object from the same bkr serve",
                at_least=0.4,
                # Two cores for dd, the daemon and the server: their CPU per GiB against
                # the wall time per GiB shows how much faster the read could be at all.
                note=f"CPU per GiB: bkfs daemon {statistics.median(cpu) * GIB / size:.2f} s, "
                f"bkr serve {statistics.median(server_cpu) * GIB / size:.2f} s; the read "
                f"took {GIB / 1e9 / rate['bkfs_cold']:.2f} s per GiB",
                samples={k: as_dicts(v) for k, v in res.items()},
            ),
            vs(
                "read_cold_vs_native_cold",
                cold,
                "bkfs_cold",
                "native_cold",
                "disk",
                "the same",
                "dd bs=1M of the pool file after dropping its pages "
                "(POSIX_FADV_DONTNEED): the same bytes into the page cache from local disk",
            ),
            vs(
                "read_cold_vs_curl_file",
                cold,
                "bkfs_cold",
                "curl_file",
                "curl>file",
                "the same (the bytes land in the mount's page cache and the cache)",
                "curl -o FILE on the same disk: the bytes land in the page cache once (no fsync)",
            ),
            vs(
                "read_cold_vs_rclone",
                cold,
                "bkfs_cold",
                "rclone_cold",
                "rclone",
                "the same",
                "dd bs=1M on a fresh rclone mount (empty cache)",
                at_least=3,
            ),
            vs(
                "read_warm_vs_native",
                warm,
                "bkfs_warm",
                "native",
                "native",
                "dd bs=1M again, right after the cold read (kernel cache kept)",
                "dd bs=1M of the pool file, in the page cache",
                at_least=0.4,
            ),
            vs(
                "read_warm_vs_rclone",
                warm,
                "bkfs_warm",
                "rclone_warm",
                "rclone",
                "the same",
                "dd bs=1M again on the rclone mount (its disk cache)",
                at_least=10,
            ),
            # The first re-read of pages a read brought in once pays the kernel's LRU
            # activation of each one (the second touch); on a FUSE file that is a 4 KiB page
            # at a time (ext4 has large folios), so later re-reads are faster than the first.
            vs(
                "read_reread_first_vs_native",
                f"first re-read of the {gib} file after its cold read",
                "bkfs_warm",
                "native_reread",
                "native",
                "dd bs=1M right after the cold read (as the warm rows)",
                "dd bs=1M of the pool file right after its cold read from disk",
            ),
            vs(
                "read_reread_later",
                f"later re-reads of the {gib} file (second and third)",
                "bkfs_later",
                "rclone_later",
                "rclone",
                "dd bs=1M twice more after the first re-read",
                "the same on the rclone mount",
                note=f"{rate['bkfs_later'] / rate['native']:.2f}x the native page-cache read",
            ),
        ]

    # -- 3. first byte ----------------------------------------------------------------------
    def bench_first_byte(self) -> None:
        for name in ("big.bin", "huge.bin"):
            self._first_byte_of(name)
        self._first_byte_floor("big.bin")

    def _first_byte_floor(self, name: str) -> None:
        """What the server alone takes to answer the Range request a cold first read makes
        (the whole chunk: bkfs verifies a chunk before returning any of it), on a
        kept-alive connection after the same kind of pause, beside nginx serving the same
        bytes: the part of the first byte that is the server's, on this machine."""
        pool, size, oid = self.big_object(name)
        off = size * 900 // 1024 // CHUNK_SIZE * CHUNK_SIZE
        res: dict[str, list[Sample]] = {"bkr": [], "nginx": []}
        targets = {
            "bkr": (self.bkr.url, f"/big/bam/{oid}"),
            "nginx": (self.nginx.files_url, f"/big/{name}"),
        }

        def answer(which: str) -> Callable[[int], None]:
            def go(r: int) -> None:
                import http.client

                url, path = targets[which]
                host, port = url.split("//")[1].rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    conn.connect()
                    prewarm_range(pool, off, CHUNK_SIZE)
                    time.sleep(0.3)  # idle, as the server is before a cold first read
                    load1 = os.getloadavg()[0]
                    t = time.perf_counter()
                    rng = f"bytes={off}-{off + CHUNK_SIZE - 1}"
                    conn.request("GET", path, headers={"Range": rng})
                    body = conn.getresponse().read()
                    wall = time.perf_counter() - t
                finally:
                    conn.close()
                if len(body) != CHUNK_SIZE:
                    raise RuntimeError(f"{which}: short answer ({len(body)} bytes)")
                res[which].append(Sample(wall, load1, CHUNK_SIZE))

            return go

        self.rotate([answer("bkr"), answer("nginx")], max(self.reps, 5) * 2)
        b, n = med(res["bkr"]) * 1e3, med(res["nginx"]) * 1e3
        self.rows.append(
            Row(
                "first_byte_server",
                f"first byte's server part: a {CHUNK_SIZE // KIB} KiB Range GET after 0.3 s idle",
                "ms",
                b,
                n,
                b / n,
                "(context)",
                None,
                peer_name="nginx",
                bkfs_cmd="bkr serve answering the chunk a cold first read asks for (kept-alive connection)",
                peer_cmd="nginx (sendfile) answering the same byte range of the same file",
                samples={k: as_dicts(v) for k, v in res.items()},
            )
        )

    def _first_byte_of(self, name: str) -> None:
        pool, size, _ = self.big_object(name)
        off = size * 900 // 1024 // 4096 * 4096
        res: dict[str, list[Sample]] = {"bkfs": [], "rclone": []}

        def first_byte(mnt: Path, out: list[Sample]) -> None:
            path = mnt / name
            os.stat(path)  # the name is known (the directory listed): time the data only
            prewarm_range(pool, off - 4 * MIB, 16 * MIB)  # the server side is warm
            load1 = os.getloadavg()[0]
            t = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, 4096, off)
            finally:
                os.close(fd)
            wall = time.perf_counter() - t
            if len(data) != 4096:
                raise RuntimeError(f"short read at {off} of {path}")
            out.append(Sample(wall, load1, 4096))

        def bkfs(r: int) -> None:
            m = self.bkfs_mount(self.big_clone, "fb")
            try:
                first_byte(m.mnt, res["bkfs"])
                st = m.status()
                res["bkfs"][-1].extra["fetched"] = float(st["bam_bytes_fetched"])  # type: ignore[arg-type]
            finally:
                self.drop(m)

        def rclone(r: int) -> None:
            m = self.rclone_mount(f"{self.nginx.files_url}/big/", "rfb")
            try:
                first_byte(m.mnt, res["rclone"])
            finally:
                self.drop(m)

        self.rotate([bkfs, rclone], max(self.reps, 5))
        b, rc = med(res["bkfs"]) * 1e3, med(res["rclone"]) * 1e3
        self.rows.append(
            Row(
                f"first_byte_{name.split('.')[0]}",
                f"first byte: cold 4 KiB read at {off / MIB:.0f} MiB of a {size / GIB:g} GiB file",
                "ms",
                b,
                rc,
                b / rc,
                "<= 5 ms",
                b <= 5.0,
                peer_name="rclone",
                bkfs_cmd="open + pread 4 KiB + close on a fresh mount with an empty cache",
                peer_cmd="the same on a fresh rclone mount",
                note="bytes fetched per read (bkfs): "
                f"{statistics.median(s.extra['fetched'] for s in res['bkfs']) / MIB:.1f} MiB",
                samples={k: as_dicts(v) for k, v in res.items()},
            )
        )

    # -- 4. the first ls of a huge tree -----------------------------------------------------
    def bench_first_ls(self) -> None:
        res: dict[str, list[Sample]] = {"million": [], "thousand": []}

        def first_ls(name: str) -> Callable[[int], None]:
            def go(r: int) -> None:
                d = self.fresh(f"ls-{name}")
                mnt, cache = d / "mnt", d / "cache"
                load1 = os.getloadavg()[0]
                t = time.perf_counter()
                m = BkfsMount(self.work / "srv" / name, mnt, cache)
                t_mount = time.perf_counter() - t
                try:
                    listing = run(["ls", str(mnt)])
                    wall = time.perf_counter() - t
                    t2 = time.perf_counter()
                    deep = sorted(os.listdir(mnt))[0]
                    leaf = sorted(os.listdir(mnt / deep))[0]
                    names = os.listdir(mnt / deep / leaf)
                    os.stat(mnt / deep / leaf / names[0])
                    t_leaf = time.perf_counter() - t2
                    st = m.status()
                    rss = proc_status(m.pid)["VmRSS"] * KIB / 1e6
                    res[name].append(
                        Sample(
                            wall,
                            load1,
                            0,
                            {
                                "mount": t_mount,
                                "ls_entries": len(listing.split()),
                                "leaf_visit": t_leaf,
                                "rss_mb": rss,
                                "dirs_loaded": float(st["dirs_loaded"]),  # type: ignore[arg-type]
                                "entries_loaded": float(st["entries_loaded"]),  # type: ignore[arg-type]
                            },
                        )
                    )
                finally:
                    self.drop(m)

            return go

        self.rotate([first_ls("million"), first_ls("thousand")], max(self.reps, 5))
        mil, th = med(res["million"]), med(res["thousand"])
        files = self.gen["million"]["files"]  # type: ignore[index]
        ex = res["million"][-1].extra
        self.rows.append(
            Row(
                "first_ls",
                f"mount of a {files:,}-file tree, to its first ls answered",
                "s",
                mil,
                th,
                mil / th,
                "<= 1 s",
                mil <= 1.0,
                peer_name="1,000-file tree",
                bkfs_cmd="bkfs mount REPO MNT && ls MNT (wall of both)",
                peer_cmd="the same for a 1,000-file tree",
                note=f"bkfs mount {statistics.median(s.extra['mount'] for s in res['million']):.2f} s "
                f"of it; then one leaf directory listed and a file stat'ed in "
                f"{statistics.median(s.extra['leaf_visit'] for s in res['million']) * 1e3:.1f} ms; "
                f"daemon RSS {ex['rss_mb']:.0f} MB (1,000-file tree: "
                f"{res['thousand'][-1].extra['rss_mb']:.0f} MB) with {ex['dirs_loaded']:.0f} "
                f"directories, {ex['entries_loaded']:.0f} entries loaded",
                samples={k: as_dicts(v) for k, v in res.items()},
            )
        )

    # -- 5. daemon memory and CPU -----------------------------------------------------------
    def bench_rss(self) -> None:
        pool, size, _ = self.big_object("rss.bin")
        name = "rss.bin"
        out: dict[str, dict[str, float]] = {}

        def measure(tag: str, mount: Callable[[], BkfsMount | RcloneMount]) -> None:
            m = mount()
            try:
                prewarm([pool])
                pid = m.pid
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS, so mounting does not count
                sampler = RssSampler(lambda: tree_pids(pid))
                sampler.start()
                c0 = proc_cpu(pid)
                s = dd(m.mnt / name, size)
                cpu = proc_cpu(pid) - c0
                sampler.done.set()
                sampler.join()
                hwm = proc_status(pid)["VmHWM"]
                fetched = (
                    float(m.status()["bam_bytes_fetched"])
                    if isinstance(m, BkfsMount)
                    else float(size)
                )  # type: ignore[arg-type]
                out[tag] = {
                    "peak_mb": max(hwm, sampler.peak_kib) * KIB / 1e6,
                    "cpu_s": cpu,
                    "cpu_per_gb": cpu / (fetched / 1e9),
                    "gbps": s.rate / 1e9,
                    "fetched": fetched,
                }
            finally:
                self.drop(m)

        measure("bkfs", lambda: self.bkfs_mount(self.big_clone, "rss"))
        measure("rclone", lambda: self.rclone_mount(f"{self.nginx.files_url}/big/", "rrss"))
        b, rc = out["bkfs"], out["rclone"]
        self.rows.append(
            Row(
                "rss",
                f"daemon peak RSS while reading a {size / GIB:g} GiB file (cold)",
                "MB",
                b["peak_mb"],
                rc["peak_mb"],
                None,
                "<= 150 MB",
                b["peak_mb"] <= 150,
                peer_name="rclone",
                bkfs_cmd="VmHWM (reset after mounting) and VmRSS sampled "
                "every 10 ms of the daemon, during dd bs=1M",
                peer_cmd="the same for rclone mount",
                note=f"read at {b['gbps']:.2f} GB/s (rclone {rc['gbps']:.2f})",
            )
        )
        self.rows.append(
            Row(
                "cpu_per_gb",
                "daemon CPU seconds per GB fetched",
                "s",
                b["cpu_per_gb"],
                rc["cpu_per_gb"],
                b["cpu_per_gb"] / rc["cpu_per_gb"],
                "(reported)",
                None,
                peer_name="rclone",
                bkfs_cmd="utime+stime of the daemon / bam_bytes_fetched",
                peer_cmd="utime+stime of rclone / file size",
            )
        )
        self.extra["rss"] = out


# -- reporting ---------------------------------------------------------------------------------
def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "GB/s":
        return f"{v:.2f} GB/s"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit == "MB":
        return f"{v:.1f} MB"
    if unit == "req":
        return f"{v:,.0f}"
    return f"{v:.3g} {unit}"


def print_table(rows: list[Row]) -> None:
    head = ("metric", "bkfs", "peer", "", "ratio", "target", "result")
    body = []
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        res = "info" if r.ok is None else ("pass" if r.ok else "FAIL")
        body.append(
            (r.metric, fmt(r.bkfs, r.unit), fmt(r.peer, r.unit), r.peer_name, ratio, r.target, res)
        )
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for row in body:
        print(
            "  ".join(
                c.rjust(w) if i in (1, 2, 4) else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(line)
    for r in rows:
        if r.note:
            print(f"  {r.key}: {r.note}")


def machine(bench: Bench | None) -> dict[str, object]:
    import bkfs

    src = Path(bkfs.__file__).resolve().parent.parent

    def version(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
            return (p.stdout or p.stderr).splitlines()[0].strip()
        except (OSError, IndexError):
            return ""

    return {
        "bkfs": BKFS,
        "git_head": version(["git", "-C", str(src), "rev-parse", "HEAD"]) or None,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "curl": version(["curl", "--version"]),
        "rclone": bench.rclone if bench else None,
        "nginx": bench.nginx.version if bench else None,
        "tmp_fs": version(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", "/tmp"]),
    }


# -- main --------------------------------------------------------------------------------------
METRICS = ("meta", "read", "first_byte", "first_ls", "rss")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--reps", type=int, default=3, help="repetitions (3; 5 for latencies)")
    p.add_argument("--only", default=",".join(METRICS), help="a subset of: " + ",".join(METRICS))
    p.add_argument(
        "--work",
        type=Path,
        help="work directory (default: a new one under /tmp); reused if it holds a generation "
        "of the same scale",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="where JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    scale = SCALES[a.scale]
    only = [m.strip() for m in a.only.split(",") if m.strip()]
    for m in only:
        if m not in METRICS:
            raise SystemExit(f"bench_bkfs: unknown metric {m!r}; choose from {','.join(METRICS)}")
    created = a.work is None
    work = Path(tempfile.mkdtemp(prefix="bkfs-bench-", dir="/tmp")) if created else a.work
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # nginx's workers (www-data) must reach the files under it
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, object] = {
        "timestamp": stamp,
        "scale": a.scale,
        "params": scale,
        "reps": a.reps,
        "loadavg_start": os.getloadavg(),
        "work": str(work),
    }
    bench: Bench | None = None
    try:
        marker = work / GEN_MARKER
        old = json.loads(marker.read_text()) if marker.exists() else None
        # BAM files are recorded with the chunk size bkr records now (data of another
        # chunk size would measure the old format)
        if old is not None and old.get("params") == scale and old.get("chunk") == CHUNK_SIZE:
            log(f"reusing the generated data in {work}")
            report["generation"] = {**old["generation"], "reused": True}
        else:
            free = shutil.disk_usage(work).free
            need = disk_needed(scale)
            log(f"{work}: {free / GIB:.1f} GiB free, about {need / GIB:.1f} GiB needed")
            if free < need * 1.2:
                raise SystemExit(f"bench_bkfs: not enough space under {work}")
            for d in ("srv", "web"):
                shutil.rmtree(work / d, ignore_errors=True)
            gen = generate(work, scale)
            marker.write_text(json.dumps({"params": scale, "chunk": CHUNK_SIZE, "generation": gen}))
            report["generation"] = gen
        settle()
        bench = Bench(work, scale, a.reps)
        steps = {
            "meta": bench.bench_meta,
            "read": bench.bench_read,
            "first_byte": bench.bench_first_byte,
            "first_ls": bench.bench_first_ls,
            "rss": bench.bench_rss,
        }
        for m in only:
            log(f"measuring: {m}")
            steps[m]()
        report["rows"] = [asdict(r) for r in bench.rows]
        report["extra"] = bench.extra
        report["loadavg_end"] = os.getloadavg()
        print_table(bench.rows)
    finally:
        report["machine"] = machine(bench)
        if bench is not None:
            bench.stop()
        else:
            MOUNTS.stop_all()
        if created and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "run", ignore_errors=True)
            log(f"kept {work}")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"bkfs-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    log(f"results: {out}")
    failed = [r.metric for r in bench.rows if r.ok is False] if bench else []
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
