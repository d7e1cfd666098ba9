"""The HTTP client as a user meets it, through the real CLI and the real server: connections
kept and used in parallel, timeouts that turn a stalled server into an error or a resumed
download, and the progress bar (on a terminal only; ``-q`` silences it).  What crosses the
network is watched by a TCP proxy outside the product (netproxy.py)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bamhelp import binary, oid, pool
from conftest import BKR, CLI, write_files
from netproxy import CountingProxy

from bkrepo.transport import bamclient

MID = [binary((3 << 19) + i, seed=300 + i) for i in range(20)]  # 1.5 MiB: fetched one by one


def central_with(cli: CLI, root: Path, files: dict[str, bytes]) -> Path:
    repo = root / "game"
    cli("init", str(repo), cwd=root)
    write_files(repo, files)
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "assets", cwd=repo)
    cli("bam", "server", ".", cwd=repo)
    return repo


@pytest.fixture
def proxied(serve) -> Iterator[tuple[object, CountingProxy]]:  # type: ignore[no-untyped-def]
    server = serve("--anonymous", "write")
    proxy = CountingProxy(server.port)
    try:
        yield server, proxy
    finally:
        proxy.close()


def test_objects_move_in_parallel_over_kept_connections(
    cli: CLI, tmp_path: Path, server_root: Path, proxied
) -> None:  # type: ignore[no-untyped-def]
    """20 objects too big for a batch are 20 GETs: they share at most PARALLEL kept-alive
    connections (plus the few of the history requests), several open at once."""
    central_with(cli, server_root, {f"m/{i:02d}.bin": d for i, d in enumerate(MID)})
    _server, proxy = proxied
    cli("clone", f"{proxy.url}/game", "c", cwd=tmp_path)
    assert {oid(d) for d in MID} <= pool(tmp_path / "c")
    gets = sum(bytes(s).count(b"GET /game/bam/") for s in proxy.sent)
    assert gets == len(MID)
    assert proxy.connections <= bamclient.PARALLEL + 4 < gets  # reused, not one per object
    assert proxy.max_open >= 2  # in parallel


def wait_for(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def tmp_bytes(repo: Path) -> int:
    total = 0
    for f in (repo / ".bk" / "bam" / "tmp").glob("*"):
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


@pytest.mark.slow
def test_a_stalled_download_times_out_and_resumes_with_range(
    cli: CLI, tmp_path: Path, server_root: Path, proxied
) -> None:  # type: ignore[no-untyped-def]
    """The server stops answering mid-object (SIGSTOP: the process is there, the socket open,
    nothing comes).  The client's read times out, it reconnects and asks for the rest with
    Range; once the server runs again the download completes, verified."""
    central = central_with(cli, server_root, {"t.txt": b"t\n"})
    with open(central / "huge.bin", "wb") as f:
        f.write(b"\0head")
        f.truncate(256 << 20)
    cli("add", "huge.bin", cwd=central)
    cli("commit", "-m", "huge", cwd=central)
    server, proxy = proxied
    cli("clone", "--checkout", "none", f"{proxy.url}/game", "lazy", cwd=tmp_path)
    lazy = tmp_path / "lazy"
    get = subprocess.Popen(
        [*BKR, "get", "huge.bin"],
        cwd=lazy,
        env={**cli.env, "BKR_HTTP_TIMEOUT": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    stopped = False
    try:
        wait_for(lambda: tmp_bytes(lazy) > (4 << 20))
        before = proxy.connections
        server.proc.send_signal(signal.SIGSTOP)  # type: ignore[attr-defined]
        stopped = True
        wait_for(lambda: proxy.connections > before, 20)  # timed out, reconnected
        server.proc.send_signal(signal.SIGCONT)  # type: ignore[attr-defined]
        stopped = False
        _, err = get.communicate(timeout=120)
    finally:
        if stopped:
            server.proc.send_signal(signal.SIGCONT)  # type: ignore[attr-defined]
        if get.poll() is None:
            get.kill()
            get.wait()
    assert get.returncode == 0, err
    h = hashlib.sha256()
    with open(lazy / "huge.bin", "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    assert h.hexdigest() in pool(lazy)
    later = b"".join(bytes(s) for s in proxy.sent[before:])
    assert b"Range: bytes=" in later and b"Range: bytes=0-" not in later


def test_a_server_that_never_answers_is_an_error_not_a_hang(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    central_with(cli, server_root, {"t.txt": b"t\n"})
    server = serve()
    cli("clone", f"{server.url}/game", "a", cwd=tmp_path)
    server.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        start = time.monotonic()
        env = {"BKR_HTTP_TIMEOUT": "1"}
        for args, where in (
            (["clone", f"{server.url}/game", "c"], tmp_path),
            (["pull"], tmp_path / "a"),
        ):
            p = cli.run(*args, cwd=where, env=env, ok=False)
            assert "timed out" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert time.monotonic() - start < 20
        assert not (tmp_path / "c").exists()
    finally:
        server.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    p = cli.run("pull", cwd=tmp_path / "a", env={"BKR_HTTP_TIMEOUT": "soon"}, ok=False)
    assert p.returncode == 2 and "BKR_HTTP_TIMEOUT" in p.stderr


# -- the progress bar --------------------------------------------------------------------------
def on_a_terminal(cli: CLI, *args: str, cwd: Path) -> tuple[int, str, str]:
    """Run bkr with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, and what
    the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    shown = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the last writer closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        p = subprocess.Popen(
            [*BKR, *args],
            cwd=cwd,
            env={**cli.env, "TERM": "xterm"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        out, _ = p.communicate(timeout=120)
        reader.join(10)
    finally:
        os.close(master)
    return p.returncode, out.decode(), shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_only_and_q_silences_it(
    cli: CLI, tmp_path: Path, server_root: Path, serve
) -> None:  # type: ignore[no-untyped-def]
    big = binary(12 << 20, seed=401)
    central = central_with(cli, server_root, {"big.bin": big})
    server = serve("--anonymous", "write")
    cli("clone", "--checkout", "none", f"{server.url}/game", "lazy", cwd=tmp_path)
    lazy = tmp_path / "lazy"

    def forget() -> None:
        for f in (lazy / ".bk" / "bam").glob("??/*"):
            f.unlink()
        (lazy / "big.bin").unlink(missing_ok=True)

    code, out, shown = on_a_terminal(cli, "get", "big.bin", cwd=lazy)
    assert code == 0 and "fetching 1 BAM objects" in shown and "MB" in shown
    assert "fetching" not in out  # the bar never goes to stdout
    assert (lazy / "big.bin").read_bytes() == big
    forget()
    code, out, shown = on_a_terminal(cli, "-q", "get", "big.bin", cwd=lazy)
    assert code == 0 and shown == "" and out == ""
    forget()
    p = cli.run("get", "big.bin", cwd=lazy)  # stderr a pipe: no bar
    assert p.stderr == ""
    # the upload side: a push whose BAM data travels with the csets
    new = binary(10 << 20, seed=402)
    write_files(lazy, {"new.bin": new})
    cli("add", "new.bin", cwd=lazy)
    cli("commit", "-m", "new", cwd=lazy)
    code, out, shown = on_a_terminal(cli, "push", cwd=lazy)
    assert code == 0 and "sending BAM data" in shown and "fast-forward" in out
    assert oid(new) in pool(central)
