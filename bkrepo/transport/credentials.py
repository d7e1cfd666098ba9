"""Which token to send to which server.

``BKR_TOKEN`` in the environment is sent to every server.  Otherwise the credentials file —
``$BKR_CREDENTIALS``, else ``$XDG_CONFIG_HOME/bkr/credentials``, else
``~/.config/bkr/credentials`` — has lines ``URL-PREFIX TOKEN``; the longest prefix matching a
request's URL wins.  Keep the file private (mode 0600).
"""

from __future__ import annotations

import os
from pathlib import Path


def credentials_file() -> Path:
    env = os.environ.get("BKR_CREDENTIALS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bkr" / "credentials"


def token_for(url: str) -> str | None:
    env = os.environ.get("BKR_TOKEN")
    if env:
        return env
    try:
        lines = credentials_file().read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for raw in lines:
        parts = raw.split()
        if len(parts) != 2 or raw.lstrip().startswith("#"):
            continue
        prefix, token = parts
        if url.startswith(prefix.rstrip("/")) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), token)
    return best[1] if best else None


def auth_headers(url: str) -> dict[str, str]:
    token = token_for(url)
    return {"Authorization": f"Bearer {token}"} if token else {}
