"""The real ``bkr serve`` in a subprocess on 127.0.0.1 (a free port), stopped by pid."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

BKR = [sys.executable, "-m", "bkrepo"]


class Server:
    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log = root.parent / f"serve-{os.getpid()}-{id(self)}.log"

    def start(self, port: int = 0) -> Server:
        self.log_file = open(self.log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*BKR, "serve", str(self.root), "--port", str(port), *self.args],
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            env={**os.environ, **(self.env or {})},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line or self.proc.poll() is not None:
                break
        m = re.search(r"listening on (https?://[0-9.:]+)/", line)
        if not m:
            self.stop()
            raise RuntimeError(f"bkr serve did not start: {line!r} {self.log.read_text()}")
        self.url = m.group(1)
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def repo_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def kill(self) -> None:
        """Die at once (SIGKILL), as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        if getattr(self, "log_file", None):
            self.log_file.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
