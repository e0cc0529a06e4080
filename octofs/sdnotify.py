"""sdnotify.py: owns the systemd readiness notification (``Type=notify`` units in docs/systemd/).

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` if systemd set it
(sd_notify(3)); without it, or if sending fails, it does nothing: readiness is a
courtesy to the service manager and never a reason to stop a daemon.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd. Returns whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("cannot notify systemd (%s): %s", address, exc)
        return False
    return True
