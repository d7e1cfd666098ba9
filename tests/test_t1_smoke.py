"""A first end-to-end pass through the engine: init, add, commit, clone, log."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import CLI


def test_init_commit_clone_log(tmp_path: Path, cli: CLI) -> None:
    repo = tmp_path / "a"
    cli("init", str(repo), cwd=tmp_path)
    (repo / "hello.txt").write_text("hello\n")
    (repo / "art.bin").write_bytes(os.urandom(100_000))
    cli("add", ".", cwd=repo)
    cli("commit", "-m", "first", cwd=repo)
    keys = cli("log", "--keys", cwd=repo).split()
    assert len(keys) == 1 and len(keys[0]) == 64
    cli("clone", "a", "b", cwd=tmp_path)
    clone = tmp_path / "b"
    assert (clone / "hello.txt").read_text() == "hello\n"
    assert (clone / "art.bin").read_bytes() == (repo / "art.bin").read_bytes()
    assert cli("log", "--keys", cwd=clone).split() == keys
    assert cli("status", cwd=clone) == ""
    du = cli("bam", "du", cwd=clone)
    assert "local" in du and "1 objects" in du
