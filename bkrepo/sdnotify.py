"""Telling systemd about a service's state (``Type=notify``): ``bkr serve`` and the bkfs
daemon both report READY once they answer and STOPPING when they begin to stop."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("bkr")


def notify(message: str) -> None:
    """Send ``message`` (e.g. ``READY=1``) to ``$NOTIFY_SOCKET``; a no-op outside systemd,
    and never a failure of the service: an unreachable socket is only logged."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("could not notify systemd: %s", e)
