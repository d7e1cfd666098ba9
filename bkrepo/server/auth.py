"""Who may read and write.

A token file has one token per line, ``TOKEN read|write`` (``#`` comments and blank lines
allowed).  Clients send ``Authorization: Bearer TOKEN``.  A request without a token gets the
``--anonymous`` right (``none``, ``read`` or ``write``; default ``read``).  ``write`` includes
``read``.  A request lacking the right gets 401 (no token) or 403 (a token without the right,
or an unknown token), with a one-line reason.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

from bkrepo.errors import UsageError
from bkrepo.server.asgi import HTTPError, Request

LEVELS = {"none": 0, "read": 1, "write": 2}


class Access:
    def __init__(self, tokens: dict[str, str], anonymous: str = "read") -> None:
        if anonymous not in LEVELS:
            raise UsageError(f"serve: --anonymous must be none, read or write, not {anonymous!r}")
        self.tokens = tokens
        self.anonymous = anonymous

    @classmethod
    def from_file(cls, path: Path | None, anonymous: str = "read") -> Access:
        tokens: dict[str, str] = {}
        if path is not None:
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise UsageError(f"serve: cannot read token file {path}: {e.strerror}") from None
            for n, raw in enumerate(lines, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2 or parts[1] not in ("read", "write"):
                    raise UsageError(f"serve: {path}:{n}: expected 'TOKEN read|write'")
                tokens[parts[0]] = parts[1]
        return cls(tokens, anonymous)

    def _right_of(self, token: str) -> str | None:
        for known, right in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return right
        return None

    def require(self, req: Request, need: str) -> None:
        """Raise 401/403 unless the request has the ``need`` right (``read`` or ``write``)."""
        auth = req.header("authorization")
        if auth is None:
            if LEVELS[self.anonymous] >= LEVELS[need]:
                return
            raise HTTPError(
                401, f"{need} access needs a token", [(b"www-authenticate", b'Bearer realm="bkr"')]
            )
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "basic":
            # git-lfs sends credentials as Basic; the password field carries the token.
            try:
                token = base64.b64decode(token.strip()).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                raise HTTPError(401, "malformed Basic credentials") from None
        elif scheme.lower() != "bearer":
            raise HTTPError(401, "unsupported authorization scheme; use Bearer TOKEN")
        right = self._right_of(token.strip())
        if right is None:
            raise HTTPError(403, "unknown token")
        if LEVELS[right] < LEVELS[need]:
            raise HTTPError(403, f"this token grants {right} access; {need} access is needed")
