"""The exception tree of bkfs.

Every failure a user can meet is a :class:`BkfsError` with a one-line message ("what failed:
why [; what to do]") and an exit code.  The CLI prints ``bkfs: <message>`` and exits; the FUSE
operations (``fs.py``, the only place errno appears) turn a :class:`ContentError` into EIO for
the one read that met it.  Anything else escaping is a bug and is logged with its traceback.

    BkfsError                    exit 1 unless noted
    ├── UsageError               exit 2: bad arguments
    ├── MountError               mount, umount or the control channel failed
    ├── SourceError              the repository cannot be opened or its history is damaged
    └── ContentError             a read could not be served (EIO for that read)
        ├── ObjectMissing        no source has the bytes (or --offline and none local has)
        ├── ObjectCorrupt        every copy found failed verification against history
        └── ServerUnavailable    the BAM server is down, refused, or missed the deadline
"""

from __future__ import annotations


class BkfsError(Exception):
    """A failure with a message for the user and an exit code."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(BkfsError):
    exit_code = 2


class MountError(BkfsError):
    pass


class SourceError(BkfsError):
    pass


class ContentError(BkfsError):
    pass


class ObjectMissing(ContentError):
    pass


class ObjectCorrupt(ContentError):
    pass


class ServerUnavailable(ContentError):
    pass
