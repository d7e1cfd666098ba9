"""Server benchmark: ``bkr serve`` and the BAM client against curl and nginx, on loopback.

One command generates three BAM-server repositories under /tmp (by default 2 GiB of BAM data
in 200 files; 10,000 objects of 100 KiB; one 1 GiB object), starts ``bkr serve`` and nginx
on 127.0.0.1, and measures each pair side by side in the same run:

* lazy clone (``bkr clone --checkout none``) of the 2 GiB repository: wall time, and the
  bytes that cross the connection (counted by a TCP proxy in between);
* full BAM download of the 2 GiB (``bkr bam pull -a`` in a lazy clone) against ``curl``
  fetching the same 200 objects from the same server to the same disk;
* ``bkr bam pull -a`` of the 10,000 small objects against the same of the one 1 GiB object;
* the server sending the 1 GiB object to ``curl`` against nginx sending the same file;
* the server's peak memory while 16 ``curl`` clients download the 1 GiB object at once.

Several repetitions each, medians, bkr and its peer interleaved.  It prints a table and
writes the same as JSON to ``benchmarks/results/server-<timestamp>.json``; exit status 1
when a target of the issue is missed.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
BKR = str(VENV_BIN / "bkr") if (VENV_BIN / "bkr").exists() else shutil.which("bkr") or "bkr"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
GEN_MARKER = "generated.json"

SCALES: dict[str, dict[str, int]] = {
    # assets: the lazy clone and full download; small/big: batches against one large object
    "full": {
        "assets_files": 200,
        "assets_bytes": 2 * GIB,
        "small_files": 10_000,
        "small_size": 100 * KIB,
        "big_size": GIB,
        "clients": 16,
    },
    "small": {
        "assets_files": 50,
        "assets_bytes": 128 * MIB,
        "small_files": 1_000,
        "small_size": 100 * KIB,
        "big_size": 256 * MIB,
        "clients": 16,
    },
}

ENV = {
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
    cpu: float  # user + system seconds of the command (and children it waited for)
    load1: float  # 1-minute load average when it started (noise from other work)
    bytes: int = 0  # payload bytes the command moved (for throughputs)

    @property
    def rate(self) -> float:
        return self.bytes / self.wall if self.wall else 0.0


def run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """An unmeasured helper command: its stdout, or an error with its stderr."""
    p = subprocess.run(list(cmd), cwd=cwd, env=ENV, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} exited {p.returncode}:\n"
            + p.stderr.decode(errors="replace")
        )
    return p.stdout.decode(errors="replace")


def timed(cmd: Sequence[str], cwd: Path | None = None, nbytes: int = 0) -> Sample:
    """Run ``cmd`` (output discarded): wall time around it and its CPU time (wait4)."""
    with tempfile.TemporaryFile() as err:
        load1 = os.getloadavg()[0]
        start = time.perf_counter()
        p = subprocess.Popen(
            list(cmd), cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stdout=err, stderr=err
        )
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} exited {p.returncode}:\n"
                + err.read().decode(errors="replace")[-2000:]
            )
    return Sample(wall, ru.ru_utime + ru.ru_stime, load1, nbytes)


def settle() -> None:
    """Write back dirty pages between runs, so no run pays for another's write-back."""
    os.sync()


def prewarm(paths: Sequence[Path]) -> None:
    """Read files into the page cache right before a timed run (this VM's DAMON pages out
    memory idle for about a minute, so data read by an earlier run may be cold again)."""
    buf = bytearray(8 * MIB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    return out


def proc_io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- servers -----------------------------------------------------------------------------------
class BkrServer:
    def __init__(self, root: Path, log_path: Path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [BKR, "serve", str(root), "--port", "0"],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (http://[0-9.:]+)/", line)
        if not m:
            self.stop()
            raise RuntimeError(f"bkr serve did not start: {line!r}; see {log_path}")
        self.url = m.group(1)
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
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
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if found:
        return found
    log("nginx is missing: installing nginx-light with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for pkgs in (["nginx-light"], ["nginx"]):
        cmd = ["apt-get", "install", "-y", "-q", *pkgs]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
                continue
        found = shutil.which("nginx") or "/usr/sbin/nginx"
        if Path(found).exists():
            return found
    raise RuntimeError("nginx is not installed and apt-get could not install it")


class Nginx:
    """nginx serving ``root`` on a free port, in the foreground (daemon off), stopped by pid."""

    def __init__(self, root: Path, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "tmp").mkdir(exist_ok=True)
        self.port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, port=self.port, root=root))
        binary = nginx_binary()
        self.version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
        self.log = open(work / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(work)], stdout=self.log, stderr=self.log
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not start; see {work}/error.log") from None
                time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The master and its workers."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [self.pid, *(int(c) for c in f.read().split())]
        except OSError:
            return [self.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the master stops its workers and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class CountingProxy:
    """A TCP proxy on 127.0.0.1 counting the bytes that cross it, both ways: bytes over the
    network, measured outside the product."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = 0  # server -> client
        self.up = 0  # client -> server
        self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self.lock:
                self.connections += 1
            for a, b, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                with self.lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


class RssSampler(threading.Thread):
    """The largest VmRSS (summed over ``pids()``) seen every ``interval`` seconds."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            for pid in self.pids():
                try:
                    total += proc_status(pid)["VmRSS"]
                except (OSError, KeyError):
                    continue
            self.peak_kib = max(self.peak_kib, total)
            self.samples += 1
            self.done.wait(self.interval)


# -- generating the repositories ---------------------------------------------------------------
class Noise:
    """Incompressible file contents, fast: slices of a 64 MiB random block, each file made
    unique by a header naming it."""

    def __init__(self, seed: int) -> None:
        self.block = random.Random(seed).randbytes(64 * MIB)

    def write(self, path: Path, size: int, name: str) -> None:
        header = f"bench {name}\n".encode().ljust(64, b"\0")[: min(64, size)]
        rng = random.Random(name)
        with open(path, "wb") as f:
            f.write(header)
            left = size - len(header)
            while left:
                start = rng.randrange(len(self.block) - 1)
                n = min(left, len(self.block) - start, 8 * MIB)
                f.write(memoryview(self.block)[start : start + n])
                left -= n


def make_repo(
    work: Path, name: str, files: list[tuple[str, int]], noise: Noise
) -> dict[str, object]:
    """A repository ``work/srv/NAME`` that is its own BAM server (``bkr bam server .``), its
    files committed as BAM files (the working files stay: serving does not read them)."""
    t0 = time.perf_counter()
    dest = work / "srv" / name
    shutil.rmtree(dest, ignore_errors=True)
    run([BKR, "init", "-q", str(dest)])
    for rel, size in files:
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        noise.write(p, size, f"{name}/{rel}")
    run([BKR, "add", "-q", "."], dest)
    run([BKR, "commit", "-q", "-m", f"{name}: {len(files)} files"], dest)
    run([BKR, "bam", "server", "-q", "."], dest)
    objects = sorted((dest / ".bk" / "bam").glob("??/*"))
    total = sum(p.stat().st_size for p in objects)
    if len(objects) != len(files) or total != sum(s for _, s in files):
        raise RuntimeError(
            f"{name}: expected {len(files)} BAM objects, the pool has {len(objects)}"
        )
    return {
        "files": len(files),
        "bytes": total,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def generate(work: Path, scale: dict[str, int]) -> dict[str, object]:
    noise = Noise(1)
    n = scale["assets_files"]
    each = scale["assets_bytes"] // n
    out = {}
    log(f"generating assets: {n} files of {each / MIB:.1f} MiB")
    out["assets"] = make_repo(
        work, "assets", [(f"art/d{i // 20:02d}/tex{i:04d}.bin", each) for i in range(n)], noise
    )
    k = scale["small_files"]
    log(f"generating small: {k} files of {scale['small_size'] // KIB} KiB")
    out["small"] = make_repo(
        work,
        "small",
        [(f"s/d{i // 100:03d}/f{i:05d}.bin", scale["small_size"]) for i in range(k)],
        noise,
    )
    log(f"generating big: one file of {scale['big_size'] / GIB:.2f} GiB")
    out["big"] = make_repo(work, "big", [("big.bin", scale["big_size"])], noise)
    return out


def pool_files(work: Path, name: str) -> list[Path]:
    return sorted((work / "srv" / name / ".bk" / "bam").glob("??/*"))


def disk_needed(scale: dict[str, int]) -> int:
    data = scale["assets_bytes"] + scale["small_files"] * scale["small_size"] + scale["big_size"]
    # the served repositories keep their working files next to their pools; runs hold one
    # download (two, for clone --checkout get) at a time
    return 2 * data + scale["assets_bytes"] * 2 + GIB


# -- the measurements --------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    metric: str
    unit: str  # "s", "GB/s", "MB", "%"
    bkr: float
    peer: float | None
    ratio: float | None
    target: str
    ok: bool | None  # None: information only
    bkr_cmd: str = ""
    peer_cmd: str = ""
    note: str = ""
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def med_rate(samples: list[Sample]) -> float:
    return statistics.median(s.rate for s in samples)


def med_wall(samples: list[Sample]) -> float:
    return statistics.median(s.wall for s in samples)


def as_dicts(samples: list[Sample]) -> list[dict[str, float]]:
    return [{**asdict(s), "rate": s.rate} for s in samples]


class Bench:
    def __init__(self, work: Path, client: Path, scale: dict[str, int], reps: int) -> None:
        self.work = work
        self.client = client
        self.scale = scale
        self.reps = reps
        self.rows: list[Row] = []
        self.extra: dict[str, object] = {}
        client.mkdir(parents=True, exist_ok=True)
        self.bkr = BkrServer(work / "srv", work / "serve.log")
        self.nginx: Nginx | None = None
        log(f"bkr serve {self.bkr.url} (pid {self.bkr.pid})")

    def start_nginx(self) -> Nginx:
        if self.nginx is None:
            self.nginx = Nginx(self.work / "srv", self.work / "nginx")
            log(f"nginx {self.nginx.url} (pid {self.nginx.pid})")
        return self.nginx

    def stop(self) -> None:
        self.bkr.stop()
        if self.nginx is not None:
            self.nginx.stop()

    def repo_url(self, name: str) -> str:
        return f"{self.bkr.url}/{name}"

    def lazy_clone(self, name: str, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        run([BKR, "clone", "-q", "--checkout", "none", self.repo_url(name), str(dest)])

    def interleave(
        self, a: Callable[[int], Sample], b: Callable[[int], Sample], reps: int | None = None
    ) -> tuple[list[Sample], list[Sample]]:
        """Run a and b ``reps`` times each, alternating which goes first."""
        sa: list[Sample] = []
        sb: list[Sample] = []
        for r in range(reps or self.reps):
            order = [(a, sa), (b, sb)] if r % 2 == 0 else [(b, sb), (a, sa)]
            for fn, out in order:
                out.append(fn(r))
        return sa, sb

    # -- 1. lazy clone ---------------------------------------------------------------------
    def bench_lazy_clone(self) -> None:
        name = "assets"
        data = sum(p.stat().st_size for p in pool_files(self.work, name))
        dest = self.client / "lazy"
        cmd = [BKR, "clone", "-q", "--checkout", "none", self.repo_url(name), str(dest)]
        self.lazy_clone(name, dest)  # warm-up, untimed
        shutil.rmtree(dest)
        samples = []
        for _ in range(max(self.reps, 5)):
            settle()
            samples.append(timed(cmd))
            shutil.rmtree(dest)
        # bytes: once more through a counting proxy; the server's own I/O counters beside
        proxy = CountingProxy(int(self.bkr.url.rsplit(":", 1)[1]))
        io0 = proc_io(self.bkr.pid)
        run(
            [
                BKR,
                "clone",
                "-q",
                "--checkout",
                "none",
                f"http://127.0.0.1:{proxy.port}/{name}",
                str(dest),
            ]
        )
        time.sleep(0.2)
        io1 = proc_io(self.bkr.pid)
        proxy.close()
        wire = proxy.up + proxy.down
        clone_size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        pooled = list((dest / ".bk" / "bam").glob("??/*"))
        shutil.rmtree(dest)
        wall = med_wall(samples)
        self.rows.append(
            Row(
                "lazy_clone_time",
                f"lazy clone of {data / GIB:.2f} GiB in {len(pool_files(self.work, name))} "
                "BAM files: time",
                "s",
                wall,
                None,
                None,
                "< 2 s",
                wall < 2.0,
                bkr_cmd=" ".join([*cmd[:-2], "URL", "DEST"]),
                note="BitKeeper: 'a 20 GB repository of BAM files clones in a few seconds'",
                samples={"bkr": as_dicts(samples)},
            )
        )
        frac = wire / data
        self.rows.append(
            Row(
                "lazy_clone_bytes",
                "lazy clone: bytes over the connection (both ways)",
                "MB",
                wire / 1e6,
                data / 1e6,
                frac,
                "< 1% of the BAM data",
                frac < 0.01 and not pooled,
                bkr_cmd="the same, through a counting TCP proxy",
                peer_cmd="the repository's BAM data",
                note=f"server /proc/pid/io during it: wchar {io1['wchar'] - io0['wchar']} B, "
                f"rchar {io1['rchar'] - io0['rchar']} B; clone on disk {clone_size} B; "
                f"BAM objects in the clone's pool: {len(pooled)}",
            )
        )
        self.extra["lazy_clone"] = {
            "proxy_up": proxy.up,
            "proxy_down": proxy.down,
            "proxy_connections": proxy.connections,
            "server_io_delta": {k: io1[k] - io0[k] for k in io1},
            "clone_bytes_on_disk": clone_size,
        }

    # -- 2. full download against curl ------------------------------------------------------
    def curl_many(self, name: str, out: Path, parallel: bool = False) -> list[str]:
        """A curl command fetching every BAM object of ``name`` from bkr serve into ``out``
        (one process, kept-alive connections; ``parallel``: -Z, 8 at once)."""
        out.mkdir(parents=True, exist_ok=True)
        cfg = out.parent / f"{out.name}.curlrc"
        with open(cfg, "w") as f:
            for p in pool_files(self.work, name):
                f.write(f'url = "{self.repo_url(name)}/bam/{p.name}"\noutput = "{out / p.name}"\n')
        cmd = ["curl", "-sS", "-f", "-K", str(cfg)]
        if parallel:
            cmd[1:1] = ["-Z", "--parallel-max", "8"]
        return cmd

    def bkr_pull(self, name: str, tag: str) -> Callable[[int], Sample]:
        files = pool_files(self.work, name)
        size = sum(p.stat().st_size for p in files)

        def go(r: int) -> Sample:
            dest = self.client / f"{tag}-{r}"
            self.lazy_clone(name, dest)
            settle()
            prewarm(files)
            s = timed([BKR, "bam", "pull", "-q", "-a"], dest, size)
            got = list((dest / ".bk" / "bam").glob("??/*"))
            if len(got) != len(files):
                raise RuntimeError(f"bam pull -a fetched {len(got)} of {len(files)} objects")
            shutil.rmtree(dest)
            settle()
            return s

        return go

    def curl_pull(self, name: str, tag: str, parallel: bool = False) -> Callable[[int], Sample]:
        files = pool_files(self.work, name)
        size = sum(p.stat().st_size for p in files)

        def go(r: int) -> Sample:
            out = self.client / f"{tag}-{r}"
            cmd = self.curl_many(name, out, parallel)
            settle()
            prewarm(files)
            s = timed(cmd, nbytes=size)
            got = sum(p.stat().st_size for p in out.iterdir())
            if got != size:
                raise RuntimeError(f"curl fetched {got} of {size} bytes")
            shutil.rmtree(out)
            (out.parent / f"{out.name}.curlrc").unlink()
            settle()
            return s

        return go

    def bench_full_download(self) -> None:
        name = "assets"
        files = pool_files(self.work, name)
        size = sum(p.stat().st_size for p in files)
        b, c = self.interleave(self.bkr_pull(name, "pull"), self.curl_pull(name, "curl"))
        ratio = med_rate(b) / med_rate(c)
        self.rows.append(
            Row(
                "full_download",
                f"full BAM download, {size / GIB:.2f} GiB in {len(files)} objects",
                "GB/s",
                med_rate(b) / 1e9,
                med_rate(c) / 1e9,
                ratio,
                ">= 0.5x curl",
                ratio >= 0.5,
                bkr_cmd="bkr bam pull -a (in a lazy clone; verified, fsynced)",
                peer_cmd="curl -K LIST (one process, one kept-alive connection, no fsync)",
                note="both write to the same disk; os.sync() between runs",
                samples={"bkr": as_dicts(b), "peer": as_dicts(c)},
            )
        )
        # information: curl 8 at once, and a full clone with checkout
        cp = [self.curl_pull(name, "curlz", parallel=True)(0)]
        self.rows.append(
            Row(
                "full_download_curl_parallel",
                "the same, curl with 8 transfers at once",
                "GB/s",
                med_rate(b) / 1e9,
                med_rate(cp) / 1e9,
                med_rate(b) / med_rate(cp),
                "(info)",
                None,
                peer_cmd="curl -Z --parallel-max 8 -K LIST",
                samples={"peer": as_dicts(cp)},
            )
        )

        def clone_get(r: int) -> Sample:
            dest = self.client / f"get-{r}"
            shutil.rmtree(dest, ignore_errors=True)
            settle()
            prewarm(files)
            s = timed([BKR, "clone", "-q", self.repo_url(name), str(dest)], nbytes=size)
            shutil.rmtree(dest)
            settle()
            return s

        g = [clone_get(0)]
        self.rows.append(
            Row(
                "clone_checkout_get",
                f"clone --checkout get (history, BAM data and {size / GIB:.2f} GiB of working "
                "files)",
                "GB/s",
                med_rate(g) / 1e9,
                med_rate(c) / 1e9,
                med_rate(g) / med_rate(c),
                "(info)",
                None,
                bkr_cmd="bkr clone URL DEST",
                peer_cmd="curl -K LIST",
                samples={"bkr": as_dicts(g)},
            )
        )

    # -- 3. many small objects against one large one ----------------------------------------
    def bench_small_objects(self) -> None:
        small = pool_files(self.work, "small")
        big = pool_files(self.work, "big")
        s, b = self.interleave(self.bkr_pull("small", "small"), self.bkr_pull("big", "big"))
        ratio = med_rate(s) / med_rate(b)
        self.rows.append(
            Row(
                "small_objects",
                f"{len(small)} objects of {small[0].stat().st_size // KIB} KiB vs one of "
                f"{big[0].stat().st_size / GIB:.2f} GiB (bkr bam pull -a)",
                "GB/s",
                med_rate(s) / 1e9,
                med_rate(b) / 1e9,
                ratio,
                ">= 0.3x",
                ratio >= 0.3,
                bkr_cmd="bkr bam pull -a (small objects)",
                peer_cmd="bkr bam pull -a (one large object)",
                samples={"bkr": as_dicts(s), "peer": as_dicts(b)},
            )
        )
        cs, cb = self.interleave(
            self.curl_pull("small", "curls"), self.curl_pull("big", "curlb"), 1
        )
        self.rows.append(
            Row(
                "small_objects_curl",
                "the same with curl (one kept-alive connection)",
                "GB/s",
                med_rate(cs) / 1e9,
                med_rate(cb) / 1e9,
                med_rate(cs) / med_rate(cb),
                "(info)",
                None,
                samples={"bkr": as_dicts(cs), "peer": as_dicts(cb)},
            )
        )
        self.rows.append(
            Row(
                "big_object_vs_curl",
                "one large object: bkr bam pull -a vs curl",
                "GB/s",
                med_rate(b) / 1e9,
                med_rate(cb) / 1e9,
                med_rate(b) / med_rate(cb),
                "(info)",
                None,
            )
        )
        self.rows.append(
            Row(
                "small_objects_vs_curl",
                "small objects: bkr bam pull -a vs curl",
                "GB/s",
                med_rate(s) / 1e9,
                med_rate(cs) / 1e9,
                med_rate(s) / med_rate(cs),
                "(info)",
                None,
            )
        )

    def bench_disk_floor(self) -> None:
        """What the disk alone allows: the small objects' sizes written durably as bkr's pool
        does (temp file, fsync, rename, fsync of the directory; 8 threads), against one file
        of the large object's size written and fsynced.  No network, no hashing."""
        n, each = self.scale["small_files"], self.scale["small_size"]
        big = self.scale["big_size"]
        root = self.client / "floor"
        data = os.urandom(each)
        block = os.urandom(4 * MIB)

        def fsync_dir(d: Path) -> None:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        def many(r: int) -> Sample:
            shutil.rmtree(root, ignore_errors=True)
            (root / "tmp").mkdir(parents=True)
            for i in range(256):
                (root / f"{i:02x}").mkdir()
            settle()

            def one(i: int) -> None:
                tmp = root / "tmp" / f"f{i}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                d = root / f"{i % 256:02x}"
                os.rename(tmp, d / f"f{i}")
                fsync_dir(d)

            from concurrent.futures import ThreadPoolExecutor

            start = time.perf_counter()
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(one, range(n)))
            wall = time.perf_counter() - start
            shutil.rmtree(root)
            settle()
            return Sample(wall, 0.0, os.getloadavg()[0], n * each)

        def one_big(r: int) -> Sample:
            root.mkdir(parents=True, exist_ok=True)
            settle()
            start = time.perf_counter()
            fd = os.open(root / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                left = big
                while left:
                    left -= os.write(fd, memoryview(block)[: min(left, len(block))])
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(root)
            wall = time.perf_counter() - start
            shutil.rmtree(root)
            settle()
            return Sample(wall, 0.0, os.getloadavg()[0], big)

        m, b = self.interleave(many, one_big)
        self.rows.append(
            Row(
                "disk_floor",
                f"the disk alone: {n} files of {each // KIB} KiB vs one of {big / GIB:.2f} GiB, "
                "written durably",
                "GB/s",
                med_rate(m) / 1e9,
                med_rate(b) / 1e9,
                med_rate(m) / med_rate(b),
                "(info)",
                None,
                bkr_cmd="python: temp, write, fsync, rename, fsync dir; 8 threads",
                peer_cmd="python: write, fsync",
                note="no network and no hashing: the most the small-object ratio can reach "
                "with every object durable before it counts as fetched",
                samples={"bkr": as_dicts(m), "peer": as_dicts(b)},
            )
        )

    # -- 4. sending one large object: bkr serve against nginx --------------------------------
    def bench_send(self) -> None:
        ng = self.start_nginx()
        obj = pool_files(self.work, "big")[0]
        size = obj.stat().st_size
        rel = obj.relative_to(self.work / "srv" / "big")
        b_url = f"{self.repo_url('big')}/bam/{obj.name}"
        n_url = f"{ng.url}/big/{rel.as_posix()}"
        cpu: dict[str, list[float]] = {"bkr": [], "nginx": []}

        def fetch(url: str, who: str) -> Callable[[int], Sample]:
            def go(r: int) -> Sample:
                prewarm([obj])
                pids = [self.bkr.pid] if who == "bkr" else ng.pids()
                c0 = sum(proc_cpu(p) for p in pids)
                s = timed(["curl", "-sS", "-f", "-o", "/dev/null", url], nbytes=size)
                cpu[who].append(sum(proc_cpu(p) for p in pids) - c0)
                return s

            return go

        fetch(b_url, "bkr")(0)  # warm-up
        fetch(n_url, "nginx")(0)
        cpu = {"bkr": [], "nginx": []}
        b, n = self.interleave(fetch(b_url, "bkr"), fetch(n_url, "nginx"), max(self.reps, 5))
        ratio = med_rate(b) / med_rate(n)
        self.rows.append(
            Row(
                "send_vs_nginx",
                f"server sends {size / GIB:.2f} GiB to curl (-o /dev/null)",
                "GB/s",
                med_rate(b) / 1e9,
                med_rate(n) / 1e9,
                ratio,
                ">= 0.7x nginx",
                ratio >= 0.7,
                bkr_cmd="curl -o /dev/null URL (bkr serve)",
                peer_cmd="the same from nginx (sendfile on, worker_processes auto)",
                note=f"server CPU seconds per transfer, median: bkr "
                f"{statistics.median(cpu['bkr']):.2f}, nginx {statistics.median(cpu['nginx']):.2f}",
                samples={"bkr": as_dicts(b), "peer": as_dicts(n)},
            )
        )

    # -- 5. server memory under 16 clients --------------------------------------------------
    def bench_memory(self) -> None:
        ng = self.start_nginx()
        obj = pool_files(self.work, "big")[0]
        size = obj.stat().st_size
        rel = obj.relative_to(self.work / "srv" / "big")
        clients = self.scale["clients"]

        def load(url: str, pids: Callable[[], list[int]], reset: int | None) -> dict[str, float]:
            prewarm([obj])
            if reset is not None:  # reset VmHWM (the peak RSS) to the current RSS
                with open(f"/proc/{reset}/clear_refs", "w") as f:
                    f.write("5")
            before = sum(proc_status(p)["VmRSS"] for p in pids())
            sampler = RssSampler(pids)
            sampler.start()
            start = time.perf_counter()
            procs = [
                subprocess.Popen(["curl", "-sS", "-f", "-o", "/dev/null", url], env=ENV)
                for _ in range(clients)
            ]
            codes = [p.wait() for p in procs]
            wall = time.perf_counter() - start
            sampler.done.set()
            sampler.join()
            if any(codes):
                raise RuntimeError(f"curl clients failed: {codes}")
            out = {
                "rss_before_kib": before,
                "sampled_peak_kib": sampler.peak_kib,
                "samples": sampler.samples,
                "wall": wall,
                "aggregate_gbps": clients * size / wall / 1e9,
            }
            if reset is not None:
                out["vmhwm_kib"] = proc_status(reset)["VmHWM"]
            return out

        b = load(f"{self.repo_url('big')}/bam/{obj.name}", lambda: [self.bkr.pid], self.bkr.pid)
        n = load(f"{ng.url}/big/{rel.as_posix()}", ng.pids, None)
        peak = max(b["vmhwm_kib"], b["sampled_peak_kib"]) * KIB / 1e6
        self.rows.append(
            Row(
                "memory_16_clients",
                f"server peak RSS, {clients} curl clients each downloading "
                f"{size / GIB:.2f} GiB at once",
                "MB",
                peak,
                n["sampled_peak_kib"] * KIB / 1e6,
                None,
                "< 200 MB",
                peak < 200,
                bkr_cmd="VmHWM of the bkr serve process (reset first via clear_refs), and "
                "VmRSS sampled every 10 ms",
                peer_cmd="nginx: VmRSS of master + workers, sampled",
                note=f"aggregate throughput: bkr {b['aggregate_gbps']:.2f} GB/s, nginx "
                f"{n['aggregate_gbps']:.2f} GB/s",
            )
        )
        self.extra["memory"] = {"bkr": b, "nginx": n}


# -- reporting ---------------------------------------------------------------------------------
def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "GB/s":
        return f"{v:.2f} GB/s"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "MB":
        return f"{v:.1f} MB"
    return f"{v:.3g} {unit}"


def print_table(rows: list[Row]) -> None:
    head = ("metric", "bkr", "peer", "ratio", "target", "result")
    body = []
    for r in rows:
        if r.ratio is None:
            ratio = "-"
        elif r.key == "lazy_clone_bytes":
            ratio = f"{r.ratio * 100:.3f}%"
        else:
            ratio = f"{r.ratio:.2f}x"
        res = "info" if r.ok is None else ("pass" if r.ok else "FAIL")
        body.append((r.metric, fmt(r.bkr, r.unit), fmt(r.peer, r.unit), ratio, r.target, res))
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

    def version(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
            return (p.stdout or p.stderr).splitlines()[0].strip()
        except (OSError, IndexError):
            return ""

    return {
        "bkr": BKR,
        "bkrepo_git_head": version(["git", "-C", str(src), "rev-parse", "HEAD"]) or None,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "curl": version(["curl", "--version"]),
        "loadavg_start": os.getloadavg(),
        "tmp_fs": version(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", "/tmp"]),
    }


# -- main --------------------------------------------------------------------------------------
METRICS = ("lazy", "download", "small", "floor", "send", "memory")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each pair (3)")
    p.add_argument("--only", default=",".join(METRICS), help="a subset of: " + ",".join(METRICS))
    p.add_argument(
        "--work",
        type=Path,
        help="work directory (default: a new one under /tmp); reused if it holds a generation "
        "of the same scale",
    )
    p.add_argument(
        "--client-dir", type=Path, help="where clients write (default: WORK/client, same disk)"
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="where JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    scale = SCALES[a.scale]
    only = [m.strip() for m in a.only.split(",") if m.strip()]
    created = a.work is None
    work = Path(tempfile.mkdtemp(prefix="bkr-bench-server-", dir="/tmp")) if created else a.work
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # nginx's workers (www-data) must reach the pools under it
    client = a.client_dir or work / "client"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, object] = {
        "timestamp": stamp,
        "scale": a.scale,
        "params": scale,
        "reps": a.reps,
        "machine": machine(),
        "work": str(work),
    }
    bench: Bench | None = None
    try:
        marker = work / GEN_MARKER
        old = json.loads(marker.read_text()) if marker.exists() else None
        if old is not None and old.get("params") == scale:
            log(f"reusing the generated repositories in {work}")
            report["generation"] = {**old["generation"], "reused": True}
        else:
            free = shutil.disk_usage(work).free
            need = disk_needed(scale)
            log(f"{work}: {free / GIB:.1f} GiB free, about {need / GIB:.1f} GiB needed")
            if free < need * 1.1:
                raise SystemExit(f"bench_server: not enough space under {work}")
            shutil.rmtree(work / "srv", ignore_errors=True)
            gen = generate(work, scale)
            marker.write_text(json.dumps({"params": scale, "generation": gen}))
            report["generation"] = gen
        settle()
        bench = Bench(work, client, scale, a.reps)
        steps = {
            "lazy": bench.bench_lazy_clone,
            "download": bench.bench_full_download,
            "small": bench.bench_small_objects,
            "floor": bench.bench_disk_floor,
            "send": bench.bench_send,
            "memory": bench.bench_memory,
        }
        for m in only:
            log(f"measuring: {m}")
            steps[m]()
        if bench.nginx is not None:
            report["nginx"] = bench.nginx.version.strip()
        report["rows"] = [asdict(r) for r in bench.rows]
        report["extra"] = bench.extra
        report["loadavg_end"] = os.getloadavg()
        print_table(bench.rows)
    finally:
        if bench is not None:
            bench.stop()
        if created and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif a.keep:
            log(f"kept {work}")
        if a.client_dir is not None:
            shutil.rmtree(client, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"server-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    log(f"results: {out}")
    failed = [r.metric for r in bench.rows if r.ok is False] if bench else []
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
