"""Faults caused for real: servers and clients killed mid-transfer, corrupt objects on a
server.  Each leaves every repo, pool and server as it was or fully done."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from backends import both_backends
from bamhelp import binary, oid, pool, pool_path
from conftest import BKR, CLI, write_files
from servers import Server

pytestmark = pytest.mark.slow
BIG = 256 << 20


def wait_for(cond, timeout: float = 30.0, step: float = 0.002) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def tmp_bytes(repo: Path) -> int:
    d = repo / ".bk" / "bam" / "tmp"
    total = 0
    if d.is_dir():
        for f in d.iterdir():
            try:
                total += f.stat().st_size
            except FileNotFoundError:
                pass
    return total


def big_file(path: Path, size: int = BIG) -> bytes:
    data = b"\0" + os.urandom(size - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_server_killed_mid_push_then_retry_finishes(
    cli: CLI, tmp_path: Path, server_root: Path
) -> None:
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    write_files(central, {"a.txt": b"a\n"})
    cli("add", ".", cwd=central)
    cli("commit", "-m", "a", cwd=central)
    cli("bam", "server", ".", cwd=central)
    server = Server(server_root, "--anonymous", "write").start()
    try:
        cli("clone", "--checkout", "none", f"{server.url}/game", "c", cwd=tmp_path)
        c = tmp_path / "c"
        data = big_file(c / "huge.bin")
        cli("add", "huge.bin", cwd=c)
        cli("commit", "-m", "huge", cwd=c)
        before = cli("log", "--keys", cwd=central)
        push = subprocess.Popen(
            [*BKR, "push"], cwd=c, env=cli.env, stderr=subprocess.PIPE, text=True
        )
        try:
            assert wait_for(lambda: tmp_bytes(central) > (16 << 20)), "the upload never started"
            server.kill()
            _, err = push.communicate(timeout=60)
        finally:
            if push.poll() is None:
                push.kill()
                push.wait()
        assert push.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err
        assert cli("log", "--keys", cwd=central) == before
        assert oid(data) not in pool(central)
        port = server.port
        server.stop()
        server = Server(server_root, "--anonymous", "write").start(port)
        cli("push", cwd=c)
        assert cli("log", "--keys", cwd=central) == cli("log", "--keys", cwd=c)
        assert pool_path(central, oid(data)).stat().st_size == BIG
        assert "hashes verified" in cli("bam", "check", cwd=central)
        assert tmp_bytes(central) == 0  # the dead upload's temp file was cleaned up
    finally:
        server.stop()


def test_download_resumes_after_the_server_comes_back(
    cli: CLI, tmp_path: Path, server_root: Path
) -> None:
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    data = big_file(central / "huge.bin")
    cli("add", ".", cwd=central)
    cli("commit", "-m", "huge", cwd=central)
    cli("bam", "server", ".", cwd=central)
    server = Server(server_root).start()
    try:
        cli("clone", "--checkout", "none", f"{server.url}/game", "c", cwd=tmp_path)
        c = tmp_path / "c"
        get = subprocess.Popen(
            [*BKR, "get", "huge.bin"], cwd=c, env=cli.env, stderr=subprocess.PIPE, text=True
        )
        try:
            assert wait_for(lambda: tmp_bytes(c) > (8 << 20)), "the download never started"
            port = server.port
            server.kill()
            server.stop()
            server = Server(server_root).start(port)
            _, err = get.communicate(timeout=120)
        finally:
            if get.poll() is None:
                get.kill()
                get.wait()
        assert get.returncode == 0, err
        assert (c / "huge.bin").read_bytes() == data
    finally:
        server.stop()


def test_client_killed_mid_clone_leaves_no_half_repo(
    cli: CLI, tmp_path: Path, server_root: Path
) -> None:
    src = server_root / "game"
    cli("init", str(src), cwd=server_root)
    big_file(src / "huge.bin")
    cli("add", ".", cwd=src)
    cli("commit", "-m", "huge", cwd=src)
    server = Server(server_root).start()
    try:
        dest = tmp_path / "dest"
        clone = subprocess.Popen(
            [*BKR, "clone", f"{server.url}/game", str(dest)], cwd=tmp_path, env=cli.env
        )
        try:
            assert wait_for(
                lambda: any(tmp_bytes(d) > (8 << 20) for d in tmp_path.glob(".dest.bkclone-*"))
            )
            clone.send_signal(signal.SIGKILL)
            clone.wait(10)
        finally:
            if clone.poll() is None:
                clone.kill()
                clone.wait()
        assert not dest.exists()
        cli("clone", f"{server.url}/game", str(dest), cwd=tmp_path)
        assert not list(tmp_path.glob(".dest.bkclone-*"))  # the dead clone's work dir is gone
        assert "hashes verified" in cli("bam", "check", cwd=dest)
    finally:
        server.stop()


@both_backends
def test_corrupt_object_on_the_server_is_never_installed(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    data = binary(3 << 20, seed=71)
    write_files(central, {"tex.bin": data, "ok.txt": b"fine\n"})
    cli("add", ".", cwd=central)
    cli("commit", "-m", "tex", cwd=central)
    cli("bam", "server", ".", cwd=central)
    p = pool_path(central, oid(data))
    os.chmod(p, 0o644)
    p.write_bytes(data[:-1] + b"\1")
    server = serve()
    r = cli.run("clone", f"{server.url}/game", "full", cwd=tmp_path, ok=False)
    assert oid(data) in r.stderr and "corrupt" in r.stderr and r.stderr.count("\n") == 1
    assert "tex.bin" in r.stderr  # the file that needs it
    assert not (tmp_path / "full").exists()
    cli("clone", "--checkout", "none", f"{server.url}/game", "lazy", cwd=tmp_path)
    lazy = tmp_path / "lazy"
    r = cli.run("get", "tex.bin", cwd=lazy, ok=False)
    assert "corrupt" in r.stderr and oid(data) in r.stderr and "get: tex.bin: " in r.stderr
    assert pool(lazy) == set() and tmp_bytes(lazy) == 0
    assert not (lazy / "tex.bin").exists()
    cli("get", "ok.txt", cwd=lazy)
