"""Repository configuration: the keys ``bkr config`` knows, their defaults and their syntax.

Configuration is per repository (stored in the repo database, not versioned).  ``clone`` copies
the ``bam.threshold`` and ``bam.patterns`` of its source so a team keeps one BAM policy.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import re
from typing import NamedTuple

from bkrepo.errors import UsageError

DEFAULT_BAM_THRESHOLD = 64 * 1024


class Key(NamedTuple):
    name: str
    default: str
    help: str


KEYS = {
    k.name: k
    for k in (
        Key("user.name", "", "author recorded in csets (default: $BKR_USER, else user@host)"),
        Key(
            "bam.threshold",
            "64K",
            "binary files at least this big become BAM files; 'off' disables",
        ),
        Key("bam.patterns", "", "globs (comma or space separated) of files that are always BAM"),
        Key("bam.pools", "", "other pools on local disk to search for BAM data, ':'-separated"),
        Key("checkout", "get", "'get' writes files on clone/pull; 'none' leaves them for bkfs"),
        Key("lock.timeout", "30", "seconds to wait for another bkr process to release the repo"),
    )
}
COPIED_ON_CLONE = ("bam.threshold", "bam.patterns", "bam.converted")

_SIZE = re.compile(r"(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``64K``, ``1M``, ``2GiB``, ``1000`` -> bytes."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_threshold(text: str) -> int | None:
    """The BAM threshold in bytes, or None when BAM is off."""
    if text.strip().lower() in ("off", "none", "no", "false"):
        return None
    return parse_size(text)


def validate(key: str, value: str) -> str:
    if key not in KEYS:
        raise UsageError(f"unknown config key {key!r}; known keys: {', '.join(sorted(KEYS))}")
    if key == "user.name" and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UsageError("user.name must be one line without control characters")
    if key == "bam.threshold":
        parse_threshold(value)
    elif key == "checkout" and value not in ("get", "none"):
        raise UsageError("checkout must be 'get' or 'none'")
    elif key == "lock.timeout":
        parse_seconds(value, "lock.timeout")
    return value


def parse_seconds(text: str, what: str) -> float:
    """A wait in seconds: a finite number, 0 or more (NaN would wait forever, -1 makes no
    sense)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{what} must be a number of seconds (0 or more), not {text!r}")
    return value


def patterns(text: str) -> list[str]:
    return [p for p in re.split(r"[,\s]+", text) if p]


@functools.lru_cache(maxsize=256)
def _glob_regex(glob: str) -> re.Pattern[str]:
    """A path glob as a regex: ``*`` and ``?`` stay within one path component (as in
    ``.gitignore`` and ``.gitattributes``), ``**`` spans directories, ``[...]`` as fnmatch."""
    out = []
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and "]" in glob[i + 2 :]:
            j = glob.index("]", i + 2)
            out.append(fnmatch.translate(glob[i : j + 1])[4:-3])  # fnmatch's class syntax
            i = j + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def glob_match(path: str, glob: str) -> bool:
    return _glob_regex(glob).fullmatch(path) is not None


def matches_any(path: str, globs: list[str]) -> bool:
    """A glob without '/' matches the file name anywhere; with '/', the repo-relative path
    (a leading '/' is optional).  ``*`` never matches '/'; ``**`` does."""
    name = path.rsplit("/", 1)[-1]
    return any(glob_match(path, g.lstrip("/")) if "/" in g else glob_match(name, g) for g in globs)


def default_author() -> str:
    env = os.environ.get("BKR_USER")
    if env:
        return env
    import getpass  # here, not at the top: only commands that record an author need them
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
