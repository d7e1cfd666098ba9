"""nginx (Debian's package) as the HTTP cache tier in front of ``bkr serve``, with the
location rules the docs ship (deploy/bkr-cache-locations.conf), on a free port of
127.0.0.1, in the foreground, stopped by pid."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from swiftstore import free_ports

LOCATIONS = Path(__file__).resolve().parent.parent / "deploy" / "bkr-cache-locations.conf"

CONF = """\
daemon off;
master_process on;
worker_processes 1;
user {user};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format bkr '$request_method $uri $status $upstream_cache_status';
    access_log {work}/access.log bkr;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    upstream bkr_objects {{ server 127.0.0.1:{upstream}; keepalive 8; }}
    proxy_cache_path {work}/cache levels=1:2 keys_zone=bkr_bam:16m max_size=1g
                     inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        include {locations};
    }}
}}
"""


class Nginx:
    def __init__(self, work: Path, upstream_port: int) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed: run scripts/setup")
        work.mkdir(parents=True, exist_ok=True)
        (work / "tmp").mkdir(exist_ok=True)
        self.work = work
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        conf = work / "nginx.conf"
        conf.write_text(
            CONF.format(
                user=getpass.getuser(),
                work=work,
                upstream=upstream_port,
                port=self.port,
                locations=LOCATIONS,
            )
        )
        self.stderr = open(work / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(work)],
            stdout=self.stderr,
            stderr=self.stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"nginx did not start: {(work / 'stderr.log').read_text()}"
                    ) from None
                time.sleep(0.05)

    def log_lines(self) -> list[tuple[str, str, str, str]]:
        """(method, uri, status, cache status) of every request so far."""
        text = (self.work / "access.log").read_text()
        return [tuple(line.split(" ", 3)) for line in text.splitlines()]  # type: ignore[misc]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the master stops its workers and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stderr.close()
