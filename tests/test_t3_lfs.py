"""Stock ``git-lfs`` (Debian's package, installed by scripts/setup) against ``bkr serve``'s
Git LFS Batch API (basic transfer), anonymous and with access tokens."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from backends import both_backends
from bamhelp import binary, oid, pool, pool_path
from conftest import CLI, write_files


def git(*args: str, cwd: Path, env: dict[str, str], ok: bool = True) -> str:
    p = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert (p.returncode == 0) == ok, f"git {' '.join(args)}: {p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


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


def test_git_lfs_with_access_tokens(cli: CLI, tmp_path: Path, server_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """A private server (--anonymous none): git-lfs sends the token as the password of Basic
    auth (here from the URL); a write token uploads, a read token downloads but cannot
    upload, and no token gets nothing."""
    central = server_root / "game"
    cli("init", str(central), cwd=server_root)
    cli("bam", "server", ".", cwd=central)
    tokens = tmp_path / "tokens"
    tokens.write_text("r-token read\nw-token write\n")
    server = serve("--token-file", str(tokens), "--anonymous", "none")
    hostport = server.url.removeprefix("http://")

    def lfs_url(token: str | None) -> str:
        auth = f"bkr:{token}@" if token else ""
        return f"http://{auth}{hostport}/game/info/lfs"

    env = {
        **cli.env,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
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
    git("lfs", "track", "*.bin", cwd=work, env=env)
    art = binary(300_000, seed=91)
    (work / "art.bin").write_bytes(art)
    git("add", ".", cwd=work, env=env)
    git("commit", "-q", "-m", "art", cwd=work, env=env)
    git("remote", "add", "origin", str(remote), cwd=work, env=env)
    # no right to upload: the push fails (git-lfs says why), nothing is stored
    for token, why in ((None, "credentials"), ("r-token", "write access is needed")):
        git("config", "lfs.url", lfs_url(token), cwd=work, env=env)
        assert why in git("push", "-q", "origin", "main", cwd=work, env=env, ok=False)
        assert oid(art) not in pool(central)
    git("config", "lfs.url", lfs_url("w-token"), cwd=work, env=env)
    git("push", "-q", "origin", "main", cwd=work, env=env)
    assert pool_path(central, oid(art)).read_bytes() == art

    clone = tmp_path / "clone"
    env2 = {**env, "GIT_LFS_SKIP_SMUDGE": "1"}
    git("clone", "-q", str(remote), str(clone), cwd=tmp_path, env=env2)
    git("config", "lfs.url", lfs_url(None), cwd=clone, env=env2)
    assert "credentials" in git("lfs", "pull", cwd=clone, env=env2, ok=False)
    git("config", "lfs.url", lfs_url("r-token"), cwd=clone, env=env2)
    git("lfs", "pull", cwd=clone, env=env2)
    assert (clone / "art.bin").read_bytes() == art
