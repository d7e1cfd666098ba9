"""Helpers shared by the t2 tests: failure checks (SPEC §6) and whole-repo snapshots."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import CLI


def fails(
    cli: CLI,
    *args: str,
    cwd: Path | str,
    code: int = 1,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> str:
    """Run a command that must fail as SPEC §6 says: exit ``code``, exactly one line on stderr
    starting with ``bkr: ``, no traceback and no internal error.  Returns that line."""
    p = cli.run(*args, cwd=cwd, ok=None, env=env, input=input)
    what = f"bkr {' '.join(args)}"
    assert p.returncode == code, f"{what}: exit {p.returncode}, wanted {code}:\n{p.stderr}"
    assert "Traceback" not in p.stderr, f"{what}: traceback:\n{p.stderr}"
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"{what}: wanted one line on stderr, got:\n{p.stderr}"
    assert lines[0].startswith("bkr: "), f"{what}: stderr does not start with 'bkr: ': {lines[0]}"
    assert "internal error" not in lines[0], f"{what}: {lines[0]}"
    return lines[0]


def files(root: Path) -> dict[str, bytes]:
    """Every file and symlink of a working tree (not ``.bk``): path -> bytes or link target."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != ".bk"]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            key = os.path.normpath(os.path.join(rel, name))
            if os.path.islink(full):
                out[key] = b"->" + os.fsencode(os.readlink(full))
            else:
                with open(full, "rb") as f:
                    out[key] = f.read()
    return out


def pool_files(root: Path) -> list[str]:
    """Object files in a repo's BAM pool (names only; temp files excluded)."""
    bam = root / ".bk" / "bam"
    return sorted(p.name for p in bam.glob("??/*") if p.is_file() and len(p.name) == 64)


def snapshot(cli: CLI, repo: Path) -> dict[str, object]:
    """What a user can see of a repo: history, tags, ids, status, files and pool.  The
    read-only commands run concurrently (they never take the lock)."""
    import subprocess

    from conftest import BKR

    commands = {
        "keys": ["log", "--keys"],
        "log": ["log", "-v"],
        "tags": ["tag"],
        "status": ["status"],
        "id": ["id"],
    }
    procs = {
        name: subprocess.Popen(
            [*BKR, *args], cwd=repo, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name, args in commands.items()
    }
    out: dict[str, object] = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"bkr {' '.join(commands[name])}: {stderr.decode()}"
        out[name] = stdout.decode()
    out["files"] = files(repo)
    out["pool"] = pool_files(repo)
    return out


def binary(size: int, seed: int = 0) -> bytes:
    """Deterministic binary content (contains NUL) of exactly ``size`` bytes."""
    unit = bytes([0, seed & 0xFF, (seed >> 8) & 0xFF]) + bytes(range(1, 254))
    data = unit * (size // len(unit) + 1)
    return data[:size]


def run_bytes(cli: CLI, *args: str, cwd: Path | str) -> bytes:
    """Run a command that must succeed and return its stdout as bytes (for binary output)."""
    import subprocess

    from conftest import BKR

    p = subprocess.run([*BKR, *args], cwd=cwd, env=cli.env, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return p.stdout
