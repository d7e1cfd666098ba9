"""The deliverables around the code (issue 2): the package, its console scripts, the README's
two commands and the CI entry point that installs what the tests need."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_packages_and_console_scripts() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["requires-python"] == ">=3.11"
    assert project["scripts"] == {"bkr": "bkrepo.cli:main", "bkfs": "bkfs.cli:main"}
    found = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "bkrepo*" in found and "bkfs*" in found


def test_installed_console_scripts_run() -> None:
    """The scripts pip installed (not ``python -m``): what a user types."""
    bindir = Path(sys.executable).parent
    for name in ("bkr", "bkfs"):
        p = subprocess.run([bindir / name, "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "usage:" in p.stdout, p.stderr
    p = subprocess.run([bindir / "bkr", "frobnicate"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("bkr: ") and "Traceback" not in p.stderr


def test_readme_opens_with_demo_and_tests_and_ci_runs_them() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```sh") + 1 : readme.index("```")]
    assert [line.split()[0] for line in block] == ["scripts/demo", "scripts/test"]
    assert "```sh" in readme[:5]  # the commands come first, before any prose
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci
    test = (ROOT / "scripts" / "test").read_text()
    assert "scripts/setup" in test and "pytest" in test
    # setup installs the system packages the tests use (FUSE, git-lfs) and the venv
    setup = (ROOT / "scripts" / "setup").read_text()
    for pkg in ("fuse3", "libfuse3-dev", "pkg-config", "git-lfs", "apt-get install"):
        assert pkg in setup
    assert ".[test]" in setup
