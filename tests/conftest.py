"""Shared fixtures: run the real ``bkr`` CLI in subprocesses against repos in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BKR = [sys.executable, "-m", "bkrepo"]


class CLI:
    """Runs ``bkr`` as a user would: a subprocess with a clean, fixed environment."""

    def __init__(self, home: Path) -> None:
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "BKR_USER": "tester@example.com",
            "LANG": "C.UTF-8",
        }

    def run(
        self,
        *args: str,
        cwd: Path | str,
        ok: bool | None = True,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``bkr ARGS``; with ``ok=True`` fail the test on a non-zero exit, with
        ``ok=False`` on a zero exit; ``ok=None`` accepts either."""
        full_env = {**self.env, **(env or {})}
        p = subprocess.run(
            [*BKR, *args],
            cwd=cwd,
            env=full_env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if ok is True and p.returncode != 0:
            raise AssertionError(
                f"bkr {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
            )
        if ok is False and p.returncode == 0:
            raise AssertionError(
                f"bkr {' '.join(args)} unexpectedly succeeded:\n{p.stdout}\n{p.stderr}"
            )
        return p

    def __call__(self, *args: str, cwd: Path | str, **kw: object) -> str:
        return self.run(*args, cwd=cwd, **kw).stdout  # type: ignore[arg-type]


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    home = tmp_path / "home"
    home.mkdir()
    return CLI(home)


@pytest.fixture
def make_repo(tmp_path: Path, cli: CLI) -> Callable[..., Path]:
    """Create a repo with some files committed: make_repo("name", {"path": b"bytes"})."""

    def make(name: str = "repo", files: dict[str, bytes] | None = None, *init_args: str) -> Path:
        root = tmp_path / name
        cli("init", str(root), *init_args, cwd=tmp_path)
        if files:
            write_files(root, files)
            cli("add", ".", cwd=root)
            cli("commit", "-m", "initial", cwd=root)
        return root

    return make


def keys(cli: CLI, repo: Path) -> list[str]:
    """The cset keys of a repo's history, newest first (``bkr log --keys``)."""
    return cli("log", "--keys", cwd=repo).split()


def commit_files(cli: CLI, repo: Path, files: dict[str, bytes], msg: str) -> None:
    """Write files, add them and commit them, with the real CLI."""
    write_files(repo, files)
    cli("add", *files, cwd=repo)
    cli("commit", "-m", msg, cwd=repo)


def proc_environ(pid: int) -> dict[str, str]:
    """The environment a running process was started (or last executed) with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture
def server_root(tmp_path: Path) -> Path:
    root = tmp_path / "srv"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def swift(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real S3 store (OpenStack Swift + s3api on 127.0.0.1), once per session."""
    from swiftstore import Swift

    store = Swift(tmp_path_factory.mktemp("swift"))
    store.start()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Where ``serve`` keeps BAM objects: "fs" unless a test is marked ``both_backends``
    (backends.py), which runs it with "s3" too."""
    from backends import FsBackend, S3Backend

    kind = getattr(request, "param", "fs")
    if kind == "fs":
        return FsBackend()
    return S3Backend(request.getfixturevalue("swift"), tmp_path)


@pytest.fixture
def serve(server_root: Path, backend):  # type: ignore[no-untyped-def]
    """Start ``bkr serve`` over server_root (extra CLI args allowed) with the test's storage
    back end; all stopped at teardown."""
    from servers import Server

    started: list[Server] = []

    def start(*args: str, root: Path | None = None, port: int = 0) -> Server:
        backend.seed(root or server_root)
        s = Server(root or server_root, *args, *backend.serve_args()).start(port)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop()


# -- bkfs mounts (fusehelp.py imports this module, so it is imported inside the fixtures) ----
@pytest.fixture
def bkfs(cli: CLI):  # type: ignore[no-untyped-def]
    """The real ``bkfs`` CLI with the test's environment (its own shared cache)."""
    from fusehelp import Bkfs

    return Bkfs(cli.env)


@pytest.fixture
def mounts(bkfs, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Mounts the test makes; every one unmounted and its daemon stopped by pid at the end."""
    from fusehelp import Mounts

    m = Mounts(bkfs, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def lazy(cli: CLI, tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    """A central repo that is its own BAM server, served, and a lazy clone of it."""
    from fusehelp import make_lazy

    return make_lazy(cli, tmp_path, serve)
