"""A real S3-compatible object store for the tests: OpenStack Swift "all in one" with its
s3api middleware, from Debian's packages (scripts/setup installs them), on free ports of
127.0.0.1, with its data in a temp directory.

Five processes (memcached; the account, container, object and proxy servers; plus the
object updater), each started in its own session (``setsid``: a Swift parent stopping
runs ``killpg(0, SIGTERM)``, which must not reach pytest) and stopped by pid.  One replica,
one device (a plain directory).  Facts and pitfalls: ../shared/notes/s3-store.md.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import closing
from pathlib import Path

PY = "/usr/bin/python3"  # Debian's python3-swift lives in the system Python
ACCESS_KEY = "test:tester"  # tempauth account:user
SECRET_KEY = "testing"
REGION = "us-east-1"  # must match s3api's location (SigV4)
BINARIES = ["/usr/bin/swift-proxy-server", "/usr/bin/swift-ring-builder", "/usr/bin/memcached"]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Swift:
    def __init__(self, work: Path) -> None:
        self.work = work.resolve()  # Swift chdirs to /: every path must be absolute
        self.pids: dict[str, int] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port, self.obj_port, self.con_port, self.acc_port, self.mc_port = free_ports(5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Swift:
        missing = [b for b in BINARIES if not os.path.exists(b)]
        if missing or not Path("/etc/swift/swift.conf").is_file():
            raise RuntimeError(
                f"OpenStack Swift is not installed ({', '.join(missing) or '/etc/swift/swift.conf'}"
                " missing): run scripts/setup"
            )
        etc, srv, log = self.work / "etc", self.work / "srv", self.work / "log"
        for d in (etc, srv / "d1", log):
            d.mkdir(parents=True, exist_ok=True)
        self._configs(etc, srv)
        for name, port in (
            ("account", self.acc_port),
            ("container", self.con_port),
            ("object", self.obj_port),
        ):
            builder = str(etc / f"{name}.builder")
            for args in (
                ["create", "6", "1", "1"],
                ["add", f"r1z1-127.0.0.1:{port}/d1", "100"],
                ["rebalance"],
            ):
                subprocess.run(
                    ["/usr/bin/swift-ring-builder", builder, *args],
                    check=True,
                    capture_output=True,
                    cwd=etc,
                )
        user = getpass.getuser()
        self._spawn(
            "memcached",
            [
                *("/usr/bin/memcached", "-l", "127.0.0.1", "-p", str(self.mc_port)),
                *("-U", "0", "-m", "64", "-u", user),
            ],
        )
        for s in ("account", "container", "object", "proxy"):
            self._spawn(
                f"{s}-server",
                [PY, f"/usr/bin/swift-{s}-server", str(etc / f"{s}-server.conf"), "-v"],
            )
        self._spawn(
            "object-updater",
            [PY, "/usr/bin/swift-object-updater", str(etc / "object-server.conf"), "-v"],
        )
        try:
            for port in (self.acc_port, self.con_port, self.obj_port, self.port):
                self._wait(f"http://127.0.0.1:{port}/healthcheck")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.work / "log" / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        try:
            p = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        self.procs.append(p)
        self.pids[name] = p.pid

    def _wait(self, url: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with closing(urllib.request.urlopen(url, timeout=2)) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            for p in self.procs:
                if p.poll() is not None:
                    logs = "\n".join(
                        f.read_text()[-2000:] for f in (self.work / "log").glob("*.log")
                    )
                    raise RuntimeError(f"a Swift process died (pid {p.pid}):\n{logs}")
            time.sleep(0.1)
        raise RuntimeError(f"Swift did not answer {url} within 60 s")

    def stop(self) -> None:
        """TERM each process (a Swift parent takes its workers along), then KILL the process
        group of anything still alive after 10 s."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its own group (it was started with setsid)
            except ProcessLookupError:
                pass
            if p.poll() is None:
                p.wait(10)
        self.procs.clear()

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 client for checks from the tests (the server has its own)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    # -- configs (as in ../shared/notes/s3-store.md, on our ports) ----------------------------
    def _configs(self, etc: Path, srv: Path) -> None:
        user = getpass.getuser()

        def default(port: int, workers: int, name: str) -> str:
            return (
                f"[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {port}\nworkers = {workers}\n"
                f"user = {user}\nswift_dir = {etc}\ndevices = {srv}\nmount_check = false\n"
                f"log_name = {name}\nlog_level = WARNING\nlog_facility = LOG_LOCAL0\n\n"
            )

        for name, port in (("account", self.acc_port), ("container", self.con_port)):
            (etc / f"{name}-server.conf").write_text(
                default(port, 1, f"{name}-server")
                + f"[pipeline:main]\npipeline = healthcheck {name}-server\n\n"
                f"[app:{name}-server]\nuse = egg:swift#{name}\n\n"
                "[filter:healthcheck]\nuse = egg:swift#healthcheck\n"
            )
        (etc / "object-server.conf").write_text(
            default(self.obj_port, 2, "object-server")
            + "[pipeline:main]\npipeline = healthcheck object-server\n\n"
            "[app:object-server]\nuse = egg:swift#object\nnetwork_chunk_size = 1048576\n"
            "disk_chunk_size = 1048576\ncontainer_update_timeout = 10\n\n"
            "[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n"
            f"[object-updater]\ninterval = 5\nlog_level = WARNING\nrecon_cache_path = {self.work}\n"
        )
        filters = {
            "healthcheck": "healthcheck",
            "proxy-logging": "proxy_logging",
            "listing_formats": "listing_formats",
            "copy": "copy",
            "dlo": "dlo",
            "versioned_writes": "versioned_writes",
            "gatekeeper": "gatekeeper",
            "catch_errors": "catch_errors",
        }
        proxy = (
            f"[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {self.port}\nworkers = 2\n"
            f"user = {user}\nswift_dir = {etc}\nlog_name = proxy-server\nlog_level = WARNING\n"
            "log_facility = LOG_LOCAL0\n\n"
            "[pipeline:main]\npipeline = catch_errors gatekeeper healthcheck proxy-logging cache "
            "listing_formats s3api tempauth copy slo dlo versioned_writes proxy-logging "
            "proxy-server\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
            "allow_account_management = true\nobject_chunk_size = 1048576\n"
            "client_chunk_size = 1048576\nnode_timeout = 60\nconn_timeout = 5\n\n"
            f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {REGION}\n"
            "max_upload_part_num = 10000\n\n"
            "[filter:tempauth]\nuse = egg:swift#tempauth\n"
            "user_test_tester = testing .admin\nuser_test2_tester2 = testing2 .admin\n\n"
            f"[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:{self.mc_port}\n\n"
            "[filter:slo]\nuse = egg:swift#slo\nmax_manifest_segments = 10000\n"
            "max_manifest_size = 33554432\n\n"
        )
        for section, egg in filters.items():
            proxy += f"[filter:{section}]\nuse = egg:swift#{egg}\n\n"
        (etc / "proxy-server.conf").write_text(proxy)
