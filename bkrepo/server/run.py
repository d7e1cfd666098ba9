"""Starting and stopping ``bkr serve``: hypercorn's trio worker around the app.

Once listening it prints ``bkr serve: listening on http://HOST:PORT/`` (``https://`` with
``--tls-cert``/``--tls-key``) (with the real port
when ``--port 0`` asks for a free one) and tells systemd it is ready (``NOTIFY_SOCKET``).
SIGTERM, SIGINT and SIGHUP stop it gracefully.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path

import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from bkrepo import malloc
from bkrepo.errors import BkError, UsageError
from bkrepo.sdnotify import notify as sd_notify
from bkrepo.server import settings as serve_settings
from bkrepo.server.app import App
from bkrepo.server.auth import Access
from bkrepo.server.storage import Storage

# hypercorn reads each socket 64 KiB at a time (its module constant, no setting): every read
# becomes an h11 event and an ASGI message, which costs more CPU than the bytes.  Uploads of
# BAM objects (GiBs) are received in 1 MiB reads instead (docs/performance.md).
hypercorn.trio.tcp_server.MAX_RECV = 1 << 20


def serve(
    root: Path,
    host: str,
    port: int,
    access: Access,
    *,
    quiet: bool = False,
    tls: tuple[Path, Path] | None = None,
    config: Path | None = None,
) -> None:
    """Serve ROOT until SIGTERM/SIGINT.  ``tls`` = (certificate chain, private key), PEM
    files: HTTPS instead of HTTP.  ``config``: the TOML settings file (server/settings.py)."""
    if not root.is_dir():
        raise UsageError(f"serve: {root}: no such directory")
    settings = serve_settings.load(config)
    malloc.tame()
    storage: Storage | None = None
    if settings.s3 is not None:
        from bkrepo.server.s3store import S3Store  # boto3 only for the S3 back end

        s3 = S3Store(settings.s3)
        s3.start()  # reachable, bucket there (created if missing): else one line, exit 1
        storage = s3
    logging.basicConfig(level=logging.WARNING, format="bkr serve: %(message)s", stream=sys.stderr)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.keep_alive_timeout = 75
    config.graceful_timeout = 5
    if tls is not None:
        for f in tls:
            if not os.access(f, os.R_OK):
                raise UsageError(f"serve: {f}: cannot read this TLS file")
        config.certfile, config.keyfile = (str(f) for f in tls)
        try:
            config.create_ssl_context()
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise UsageError(f"serve: unusable TLS certificate or key: {e}") from None
    app = App(root, access, settings, storage)
    what = "BAM objects only" if settings.objects_only else f"serving {root}"
    if storage is not None:
        what += f"; objects in {storage.describe}"

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            stop = trio.Event()

            async def wait_stop() -> None:
                await stop.wait()

            async with trio.open_nursery() as nursery:
                binds = await nursery.start(
                    partial(hypercorn_serve, app, config, shutdown_trigger=wait_stop)  # type: ignore[arg-type]
                )
                if not quiet:
                    print(f"bkr serve: listening on {binds[0]}/ ({what})", flush=True)
                sd_notify("READY=1")
                async for _ in signals:
                    sd_notify("STOPPING=1")
                    stop.set()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:  # the nursery wraps what hypercorn raised
        failed, _rest = group.split(OSError)
        if failed is None:
            raise
        err = _first(failed)
        raise BkError(f"serve: cannot listen on {config.bind[0]}: {err.strerror or err}") from None


def _first(group: BaseExceptionGroup[OSError]) -> OSError:
    leaf = group.exceptions[0]
    return _first(leaf) if isinstance(leaf, BaseExceptionGroup) else leaf
