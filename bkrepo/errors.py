"""The exception tree of the repo engine.

Every failure a user can cause or meet is a :class:`BkError` carrying a one-line message
("what failed: why [; what to do]") and an exit code; the CLI prints it as ``bkr: <message>``
and exits, never with a traceback.  Anything else escaping a command is a bug.

    BkError                      exit 1 unless noted
    ├── UsageError               exit 2: bad arguments
    ├── RepoError                the repository cannot be used as asked
    │   ├── NotARepository
    │   ├── FormatError          newer or damaged repository format
    │   ├── RepoLocked           another process holds the write lock
    │   ├── UnknownRevision
    │   ├── PathError            a path is missing, outside the repo, or not tracked
    │   ├── NothingToCommit
    │   ├── WouldLoseWork        uncommitted changes stand in the way
    │   └── MergeConflict        a pull found real conflicts (names the files)
    ├── SyncError                clone/pull/push/send/receive refused or failed
    │   ├── ForeignProject
    │   ├── PullFirst
    │   ├── BundleError          a bundle or sync stream is malformed or incomplete
    │   ├── ServerUnavailable    unreachable, or failing after retries
    │   └── AccessDenied         the server refused: a right is missing
    └── BamError                 BAM data problems
        ├── ObjectMissing        no copy of an object where one was needed
        └── ObjectCorrupt        bytes that do not match their hash
"""

from __future__ import annotations

from collections.abc import Iterable


class BkError(Exception):
    """A failure with a message for the user and an exit code."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(BkError):
    exit_code = 2


class RepoError(BkError):
    pass


class NotARepository(RepoError):
    pass


class FormatError(RepoError):
    pass


class RepoLocked(RepoError):
    pass


class UnknownRevision(RepoError):
    pass


class PathError(RepoError):
    pass


class NothingToCommit(RepoError):
    pass


def _name_files(paths: Iterable[str], limit: int = 10) -> str:
    paths = sorted(paths)
    shown = ", ".join(paths[:limit])
    if len(paths) > limit:
        shown += f" and {len(paths) - limit} more"
    return shown


class WouldLoseWork(RepoError):
    def __init__(self, what: str, paths: Iterable[str], advice: str) -> None:
        self.paths = sorted(paths)
        super().__init__(f"{what}: uncommitted changes in {_name_files(self.paths)}; {advice}")


class MergeConflict(RepoError):
    def __init__(self, what: str, paths: Iterable[str]) -> None:
        self.paths = sorted(paths)
        super().__init__(
            f"{what}: conflicts in {_name_files(self.paths)}; nothing was changed. "
            "Rerun with --ours or --theirs to resolve them, or change the files and retry"
        )


class SyncError(BkError):
    pass


class ForeignProject(SyncError):
    pass


class PullFirst(SyncError):
    pass


class BundleError(SyncError):
    pass


class BamError(BkError):
    """``oid``: the object concerned, when there is one (so a caller can name its file)."""

    def __init__(self, message: str, oid: bytes | None = None) -> None:
        super().__init__(message)
        self.oid = oid


class ObjectMissing(BamError):
    pass


class ObjectCorrupt(BamError):
    pass


class ServerUnavailable(SyncError):
    """A server could not be reached, or kept failing after retries."""


class AccessDenied(SyncError):
    """A server refused a request for lack of a right (401/403)."""
