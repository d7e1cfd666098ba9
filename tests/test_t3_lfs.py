"""Stock ``git-lfs`` against ``bkr serve``'s Git LFS Batch API (basic transfer)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from backends import both_backends
from bamhelp import binary, oid
from conftest import CLI, write_files

pytestmark = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")


def git(*args: str, cwd: Path, env: dict[str, str]) -> str:
    p = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, f"git {' '.join(args)}: {p.stdout}\n{p.stderr}"
    return p.stdout


@both_backends
def test_git_lfs_push_and_clone_through_bkr_serve(
    cli: CLI, tmp_path: Path, server_root: Path, serve, backend
) -> None:  # type: ignore[no-untyped-def]
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    from_bkr = binary(500_000, seed=81)
    write_files(central, {"old.bin": from_bkr})
    cli("add", ".", cwd=central)
    cli("commit", "-m", "old", cwd=central)
    cli("bam", "server", ".", cwd=central)
    server = serve("--anonymous", "write")
    lfs_url = f"{server.url}/game/info/lfs"
    env = {
        **cli.env,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    git("lfs", "install", "--skip-repo", cwd=tmp_path, env=env)
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path, env=env)
    work = tmp_path / "work"
    git("init", "-q", "-b", "main", str(work), cwd=tmp_path, env=env)
    git("config", "lfs.url", lfs_url, cwd=work, env=env)
    git("lfs", "track", "*.bin", cwd=work, env=env)
    art = binary(2 << 20, seed=82)
    (work / "art.bin").write_bytes(art)
    (work / "old.bin").write_bytes(from_bkr)  # an object the server already has
    git("add", ".", cwd=work, env=env)
    git("commit", "-q", "-m", "art", cwd=work, env=env)
    git("remote", "add", "origin", str(remote), cwd=work, env=env)
    git("push", "-q", "origin", "main", cwd=work, env=env)
    assert oid(art) in backend.objects(central)
    assert backend.read(central, oid(art)) == art

    clone = tmp_path / "clone"
    env2 = {**env, "GIT_LFS_SKIP_SMUDGE": "0"}
    git("-c", f"lfs.url={lfs_url}", "clone", "-q", str(remote), str(clone), cwd=tmp_path, env=env2)
    git("config", "lfs.url", lfs_url, cwd=clone, env=env2)
    git("lfs", "pull", cwd=clone, env=env2)
    assert (clone / "art.bin").read_bytes() == art
    assert (clone / "old.bin").read_bytes() == from_bkr
    assert os.path.getsize(clone / "art.bin") == len(art)
