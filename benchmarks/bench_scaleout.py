"""Scale-out benchmark: ``bkr serve`` on the S3 back end against the S3 store itself, on the
filesystem back end against nginx, and 50 clients against one server.

Everything runs on 127.0.0.1: a real OpenStack Swift + s3api store (tests/swiftstore.py,
the test suite's fixture), ``bkr serve`` (.venv/bin/bkr), nginx and curl.

1. **S3 back end**, one object of ``--size-mib`` (default 1024) random bytes:
   - download: ``curl -o /dev/null`` from ``bkr serve`` (which streams a GET from Swift)
     against boto3 fetching the same object from Swift directly (``download_fileobj``, the
     library's managed transfer; also a single streamed ``get_object`` as an info row);
   - upload: ``curl -T`` to ``bkr serve`` (hashed while streamed, multipart, verified, then
     completed) against boto3 ``upload_file`` of the same file to Swift directly.
   Target: ``bkr serve`` >= 0.7x the direct transfer.
2. **Filesystem back end**, the same object: download with curl from ``bkr serve`` against
   nginx sending the same file (``sendfile on``); upload with ``curl -T`` to ``bkr serve``
   (hash, write, fsync, install) against nginx's WebDAV ``PUT``.  Target >= 0.7x nginx.
3. **Load**: ``--clients`` (default 50) clients at once against one ``bkr serve``: half
   ``bkr get`` of every file in a lazy clone, half bkfs mounts reading every file (each
   with its own HOME, so no client shares a cache); each checks the SHA-256 of what it
   read.  Reports aggregate throughput, the server's peak RSS (sampled every 20 ms) and
   the errors (target: none; RSS bounded, < 300 MB).

Medians of ``--reps`` runs, bkr and its peer alternating.  The machine has 2 cores that
the client, bkr serve and Swift's 5 processes share, and other engineers' work runs on
it too: timings are noisy, compare the ratios of one run.  Prints a table and writes
JSON to ``benchmarks/results/scaleout-<timestamp>.json``; exits 1 when a target is missed.

    .venv/bin/python benchmarks/bench_scaleout.py                  # ~8 min, ~4 GB in /tmp
    .venv/bin/python benchmarks/bench_scaleout.py --size-mib 128 --clients 10 --reps 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # the Swift fixture of the test suite

from swiftstore import ACCESS_KEY, REGION, SECRET_KEY, Swift, free_ports  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MIB = 1 << 20
ENV = {
    "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "BKR_USER": "bench <bench@example.com>",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(list(cmd), cwd=cwd, env=env or ENV, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.stdout


def timed(fn: Callable[[], None]) -> float:
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def rss_of(pids: Callable[[], list[int]]) -> int:
    total = 0
    for pid in pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakRSS(threading.Thread):
    """Samples the summed RSS of some processes every 20 ms; ``peak`` is the highest."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = 0
        self.stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop_event.wait(0.02):
            self.peak = max(self.peak, rss_of(self.pids))

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        return self.peak


class Serve:
    """``bkr serve`` in a subprocess on a free port, stopped by pid."""

    def __init__(self, root: Path, *args: str) -> None:
        self.log = open(root.parent / f"serve-{os.getpid()}-{id(self)}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "bkr"), "serve", str(root), "--port", "0", *args],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"bkr serve did not start: {line!r}")
        self.url = line.split("listening on ", 1)[1].split("/ ", 1)[0]

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user {user};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_max_body_size 0;
    client_body_temp_path {root}/.tmp;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ dav_methods PUT DELETE; create_full_put_path on; }}
    }}
}}
"""


class Nginx:
    """nginx serving (and accepting WebDAV PUTs into) ``root``, stopped by pid."""

    def __init__(self, root: Path, work: Path) -> None:
        import getpass

        work.mkdir(parents=True, exist_ok=True)
        (root / ".tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        conf = work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(user=getpass.getuser(), work=work, root=root, port=self.port)
        )
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start ({work}/error.log)") from None
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The master and its worker."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [self.proc.pid, *(int(c) for c in f.read().split())]
        except OSError:
            return [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def curl_get(url: str) -> None:
    run(["curl", "-sSf", "-o", "/dev/null", url])


def curl_put(url: str, path: Path) -> None:
    run(["curl", "-sSf", "-o", "/dev/null", "-T", str(path), url])


def make_random(path: Path, size: int) -> str:
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(8 * MIB, left))
            sha.update(block)
            f.write(block)
            left -= len(block)
    return sha.hexdigest()


def med(xs: list[float]) -> float:
    return statistics.median(xs)


class Bench:
    def __init__(self, work: Path, size: int, reps: int) -> None:
        self.work = work
        self.size = size
        self.reps = reps
        self.rows: list[dict[str, object]] = []
        self.ok = True

    def row(self, metric: str, bkr: float, peer: float, target: float | None, unit: str) -> None:
        ratio = bkr / peer if peer else 0.0
        passed = None if target is None else ratio >= target
        if passed is False:
            self.ok = False
        self.rows.append(
            {
                "metric": metric,
                "bkr": bkr,
                "peer": peer,
                "ratio": ratio,
                "target": target,
                "unit": unit,
                "result": "info" if passed is None else ("pass" if passed else "fail"),
            }
        )
        log(f"{metric}: bkr {bkr:.1f} {unit}, peer {peer:.1f} {unit}, ratio {ratio:.2f}")

    def interleave(self, a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float]:
        xs, ys = [], []
        for r in range(self.reps):
            if r % 2 == 0:
                xs.append(a())
                ys.append(b())
            else:
                ys.append(b())
                xs.append(a())
        return med(xs), med(ys)

    # -- 1. the S3 back end against Swift directly --------------------------------------------
    def bench_s3(self, big: Path, oid: str) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        swift = Swift(self.work / "swift").start()
        server: Serve | None = None
        try:
            log(f"swift at {swift.endpoint}")
            s3 = boto3.client(
                "s3",
                endpoint_url=swift.endpoint,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
                config=Config(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    max_pool_connections=16,
                ),
            )
            bucket = "bench-scaleout"
            root = self.work / "s3root"
            (root / "game").mkdir(parents=True)
            run([str(VENV_BIN / "bkr"), "init", "-q", str(root / "game")])
            conf = self.work / "s3.toml"
            conf.write_text(
                "[storage]\nbackend = 's3'\n"
                f"endpoint = '{swift.endpoint}'\nbucket = '{bucket}'\nregion = '{REGION}'\n"
                f"access_key_id = '{ACCESS_KEY}'\nsecret_access_key = '{SECRET_KEY}'\n"
            )
            server = Serve(root, "--config", str(conf), "--anonymous", "write")
            key = f"{oid[:2]}/{oid}"
            direct_key = f"direct/{oid}"
            mib = self.size / MIB

            direct_cpu: list[float] = []

            def up_direct() -> float:
                s3.delete_object(Bucket=bucket, Key=direct_key)
                before = time.process_time()
                rate = mib / timed(lambda: s3.upload_file(str(big), bucket, direct_key))
                direct_cpu.append((time.process_time() - before) * 1024 / mib)
                return rate

            restart = [server]

            def fresh_up_bkr() -> float:
                # a fresh server each time: its size cache must not answer "already there"
                restart[0].stop()
                restart[0] = Serve(root, "--config", str(conf), "--anonymous", "write")
                return up_bkr_at(restart[0])

            up_cpu: list[float] = []

            def up_bkr_at(srv: Serve) -> float:
                s3.delete_object(Bucket=bucket, Key=key)
                before = cpu_of(srv.pids())
                rate = mib / timed(lambda: curl_put(f"{srv.url}/game/bam/{oid}", big))
                up_cpu.append((cpu_of(srv.pids()) - before) * 1024 / mib)
                return rate

            peak = PeakRSS(lambda: restart[0].pids())
            b, d = self.interleave(fresh_up_bkr, up_direct)
            up_rss = peak.stop()
            self.row(
                "S3: upload 1 object, curl -T via bkr serve vs boto3 upload_file",
                b,
                d,
                0.7,
                "MiB/s",
            )
            server = restart[0]
            self.rows.append(
                {
                    "metric": "S3: upload, CPU s per GiB: bkr serve / the boto3 process uploading",
                    "bkr": med(up_cpu),
                    "peer": med(direct_cpu),
                    "result": "info",
                }
            )
            url = f"{server.url}/game/bam/{oid}"
            curl_get(url)  # warm: Swift's page cache holds it either way

            def down_bkr() -> float:
                return mib / timed(lambda: curl_get(url))

            cfg = TransferConfig()

            def down_direct() -> float:
                with open(os.devnull, "wb") as null:
                    return mib / timed(
                        lambda: s3.download_fileobj(bucket, direct_key, null, Config=cfg)
                    )

            def down_stream() -> float:
                def go() -> None:
                    body = s3.get_object(Bucket=bucket, Key=direct_key)["Body"]
                    while body.read(MIB):
                        pass

                return mib / timed(go)

            peak = PeakRSS(server.pids)
            b, d = self.interleave(down_bkr, down_direct)
            down_rss = peak.stop()
            self.row(
                "S3: download 1 object, curl via bkr serve vs boto3 download_fileobj",
                b,
                d,
                0.7,
                "MiB/s",
            )
            b2, d2 = self.interleave(down_bkr, down_stream)
            self.row(
                "S3: download, via bkr serve vs one streamed boto3 get_object",
                b2,
                d2,
                None,
                "MiB/s",
            )
            self.rows.append(
                {
                    "metric": "S3: bkr serve peak RSS, upload / download (MB)",
                    "bkr": up_rss / 1e6,
                    "peer": down_rss / 1e6,
                    "result": "info",
                }
            )
            log(
                f"S3 server peak RSS: upload {up_rss / 1e6:.0f} MB, download {down_rss / 1e6:.0f} MB"
            )
        finally:
            if server is not None:
                server.stop()
            swift.stop()

    # -- 2. the filesystem back end against nginx ---------------------------------------------
    def bench_fs(self, big: Path, oid: str) -> None:
        root = self.work / "fsroot"
        (root / "game").mkdir(parents=True)
        run([str(VENV_BIN / "bkr"), "init", "-q", str(root / "game")])
        nroot = self.work / "nginxroot"
        nroot.mkdir()
        nginx = Nginx(nroot, self.work / "nginx")
        server = Serve(root, "--anonymous", "write")
        mib = self.size / MIB
        obj = root / "game" / ".bk" / "bam" / oid[:2] / oid
        try:
            cpu: dict[str, list[float]] = {"bkr": [], "nginx": []}

            def up_bkr() -> float:
                obj.unlink(missing_ok=True)
                before = cpu_of(server.pids())
                rate = mib / timed(lambda: curl_put(f"{server.url}/game/bam/{oid}", big))
                cpu["bkr"].append((cpu_of(server.pids()) - before) * 1024 / mib)
                return rate

            def up_nginx() -> float:
                (nroot / "big.bin").unlink(missing_ok=True)
                before = cpu_of(nginx.pids())
                rate = mib / timed(lambda: curl_put(f"{nginx.url}/big.bin", big))
                cpu["nginx"].append((cpu_of(nginx.pids()) - before) * 1024 / mib)
                return rate

            def up_nginx_durable() -> float:
                def go() -> None:
                    curl_put(f"{nginx.url}/big.bin", big)
                    fd = os.open(nroot / "big.bin", os.O_RDONLY)
                    try:
                        os.fsync(fd)  # what bkr does before an object is installed
                    finally:
                        os.close(fd)

                (nroot / "big.bin").unlink(missing_ok=True)
                return mib / timed(go)

            b, n = self.interleave(up_bkr, up_nginx)
            self.row(
                "FS: upload 1 object, curl -T to bkr serve vs nginx WebDAV PUT", b, n, 0.7, "MiB/s"
            )
            self.rows.append(
                {
                    "metric": "FS: upload, server CPU seconds per GiB received (bkr / nginx)",
                    "bkr": med(cpu["bkr"]),
                    "peer": med(cpu["nginx"]),
                    "result": "info",
                }
            )
            log(f"FS upload CPU s/GiB: bkr {med(cpu['bkr']):.2f}, nginx {med(cpu['nginx']):.2f}")
            b, n = self.interleave(up_bkr, up_nginx_durable)
            self.row(
                "FS: upload, bkr serve vs nginx PUT then fsync of the file", b, n, None, "MiB/s"
            )
            curl_get(f"{server.url}/game/bam/{oid}")
            curl_get(f"{nginx.url}/big.bin")
            b, n = self.interleave(
                lambda: mib / timed(lambda: curl_get(f"{server.url}/game/bam/{oid}")),
                lambda: mib / timed(lambda: curl_get(f"{nginx.url}/big.bin")),
            )
            self.row("FS: download 1 object, curl from bkr serve vs nginx", b, n, 0.7, "MiB/s")
        finally:
            server.stop()
            nginx.stop()

    # -- 3. many clients against one server ---------------------------------------------------
    def bench_load(self, clients: int) -> None:
        root = self.work / "loadroot"
        repo = root / "game"
        root.mkdir()
        run([str(VENV_BIN / "bkr"), "init", "-q", str(repo)])
        (repo / "tex").mkdir()
        (repo / "ui").mkdir()
        files: dict[str, str] = {}
        for i in range(8):  # fetched one by one (GET); the mounts read them by range
            files[f"tex/{i}.bin"] = make_random(repo / "tex" / f"{i}.bin", 4 * MIB)
        for i in range(40):  # small: fetched in batches
            files[f"ui/{i}.bin"] = make_random(repo / "ui" / f"{i}.bin", 100 * 1024)
        per_client = sum((repo / p).stat().st_size for p in files)
        run([str(VENV_BIN / "bkr"), "add", "-q", "."], cwd=repo)
        run([str(VENV_BIN / "bkr"), "commit", "-q", "-m", "assets"], cwd=repo)
        run([str(VENV_BIN / "bkr"), "bam", "server", "-q", "."], cwd=repo)
        server = Serve(root)
        url = f"{server.url}/game"
        homes = self.work / "clients"
        errors: list[str] = []
        mounted: list[Path] = []
        lock = threading.Lock()

        def client_env(i: int) -> dict[str, str]:
            home = homes / f"h{i}"
            home.mkdir(parents=True, exist_ok=True)
            return {**ENV, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}

        def check(base: Path, who: str) -> None:
            for rel, want in files.items():
                got = hashlib.sha256((base / rel).read_bytes()).hexdigest()
                if got != want:
                    raise RuntimeError(f"{who}: {rel} read back wrong")

        clones = []
        log(f"load: {clients} lazy clones")
        for i in range(clients):
            dest = homes / f"c{i}"
            run(
                [str(VENV_BIN / "bkr"), "clone", "-q", "--checkout", "none", url, str(dest)],
                env=client_env(i),
            )
            clones.append(dest)

        def getter(i: int) -> None:
            try:
                run([str(VENV_BIN / "bkr"), "get", "-q", *files], cwd=clones[i], env=client_env(i))
                check(clones[i], f"bkr get #{i}")
            except Exception as e:
                with lock:
                    errors.append(str(e)[:300])

        def reader(i: int) -> None:
            mnt = homes / f"m{i}"
            mnt.mkdir(exist_ok=True)
            try:
                run([str(VENV_BIN / "bkfs"), "mount", str(clones[i]), str(mnt)], env=client_env(i))
                with lock:
                    mounted.append(mnt)
                check(mnt, f"mount reader #{i}")
            except Exception as e:
                with lock:
                    errors.append(str(e)[:300])

        jobs = [
            threading.Thread(target=getter if i % 2 else reader, args=(i,)) for i in range(clients)
        ]
        peak = PeakRSS(server.pids)
        start = time.perf_counter()
        for t in jobs:
            t.start()
        for t in jobs:
            t.join()
        wall = time.perf_counter() - start
        rss = peak.stop()
        for mnt in mounted:
            subprocess.run(
                [str(VENV_BIN / "bkfs"), "umount", str(mnt)], env=ENV, capture_output=True
            )
        server.stop()
        total = per_client * clients
        readers = (clients + 1) // 2
        self.rows.append(
            {
                "metric": f"load: {clients} clients ({readers} bkfs mount readers, {clients - readers} bkr get)",
                "bytes": total,
                "wall_s": wall,
                "throughput_mib_s": total / MIB / wall,
                "server_peak_rss_mb": rss / 1e6,
                "errors": errors,
                "result": "pass" if not errors and rss < 300e6 else "fail",
            }
        )
        if errors or rss >= 300e6:
            self.ok = False
        log(
            f"load: {clients} clients moved {total / MIB:.0f} MiB in {wall:.1f} s "
            f"({total / MIB / wall:.0f} MiB/s), server peak RSS {rss / 1e6:.0f} MB, "
            f"{len(errors)} errors"
        )
        for e in errors[:5]:
            log(f"  error: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="the object for parts 1 and 2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--only", default="s3,fs,load", help="comma-separated parts to run")
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args(argv)
    parts = set(a.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    bench = Bench(work, a.size_mib * MIB, a.reps)
    started = time.strftime("%Y%m%d-%H%M%S")
    try:
        big = work / "big.bin"
        oid = ""
        if parts & {"s3", "fs"}:
            log(f"writing {a.size_mib} MiB of random bytes")
            oid = make_random(big, a.size_mib * MIB)
        if "s3" in parts:
            bench.bench_s3(big, oid)
        if "fs" in parts:
            bench.bench_fs(big, oid)
        if "load" in parts:
            bench.bench_load(a.clients)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'metric':<74} {'bkr':>9} {'peer':>9} {'ratio':>6} {'result':>6}")
    for r in bench.rows:
        if "ratio" in r:
            print(
                f"{r['metric']:<74} {r['bkr']:>9.1f} {r['peer']:>9.1f} {r['ratio']:>6.2f} {r['result']:>6}"
            )
        elif "wall_s" in r:
            print(
                f"{r['metric']:<74} {r['throughput_mib_s']:>7.0f}MiB/s rss {r['server_peak_rss_mb']:.0f} MB, errors {len(r['errors'])} {r['result']:>6}"
            )  # type: ignore[arg-type]
        else:
            print(f"{r['metric']:<74} {r['bkr']:>9.1f} {r['peer']:>9.1f} {'':>6} {r['result']:>6}")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"scaleout-{started}.json"
    out.write_text(
        json.dumps(
            {
                "started": started,
                "size_mib": a.size_mib,
                "reps": a.reps,
                "load1_end": os.getloadavg()[0],
                "rows": bench.rows,
            },
            indent=2,
        )
    )
    log(f"results: {out}")
    return 0 if bench.ok else 1


if __name__ == "__main__":
    sys.exit(main())
