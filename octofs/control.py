"""control.py: owns the unix-socket control channel between a daemon and the CLI.

Protocol: the client connects, sends one JSON object on one line
(``{"cmd": "status", ...}``), and reads one JSON object on one line back. A
reply has ``"ok": true`` and the command's fields, or ``"ok": false`` and an
``"error"`` sentence. The socket is mode 0600 (root, or the daemon's user).

Invariants:
- A handler never raises into the server: a bad request gets ``ok: false``, and a
  handler that fails unexpectedly is logged with its traceback and answered
  ``ok: false`` — the daemon serving it goes on.
- The client is synchronous (plain ``socket``), so the CLI needs no event loop.
- Socket paths of any length work: a path longer than ``sun_path`` allows (107
  bytes) is reached through ``/proc/self/fd/N/NAME``, N an fd of its directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from octofs.errors import DaemonNotRunningError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
_SUN_PATH_MAX = 107


@contextlib.contextmanager
def _addressable(socket_path: Path):
    """A name for ``socket_path`` that fits in ``sun_path`` (valid inside the block)."""
    path = os.fspath(socket_path)
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    parent, name = os.path.split(path)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve_control(
    socket_path: Path, handlers: dict[str, Handler], *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Serve control requests on ``socket_path`` until cancelled.

    Args:
        socket_path: where to bind; a stale socket file is replaced.
        handlers: command name → async function(request) → reply fields.

    Cancellation: closes the listener and removes the socket file.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _addressable(socket_path) as address:
        await sock.bind(address)
    os.chmod(socket_path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        task_status.started(socket_path)
        await trio.serve_listeners(lambda stream: _handle(stream, handlers), [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


async def _handle(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    async with stream:
        try:
            request = await _read_line(stream)
            cmd = request.get("cmd")
            handler = handlers.get(cmd) if isinstance(cmd, str) else None
            if handler is None:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
            else:
                reply = {"ok": True, **(await handler(request))}
        except (ValueError, UnicodeDecodeError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        except trio.BrokenResourceError:
            return
        except ControlRequestError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a handler's bug must not take the daemon down
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("control client went away before the reply")


class ControlRequestError(Exception):
    """A handler's way to answer ok: false with a sentence."""


async def _read_line(stream: trio.SocketStream) -> dict[str, Any]:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    obj = json.loads(bytes(buf).split(b"\n", 1)[0].decode())
    if not isinstance(obj, dict):
        raise ValueError("request is not a JSON object")
    return obj


def request(socket_path: Path, cmd: str, *, io_timeout_s: float | None = 10.0, **fields: Any) -> dict[str, Any]:
    """Send one command to the daemon at ``socket_path`` and return its reply.

    Raises:
        DaemonNotRunningError: nobody answers on the socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(io_timeout_s)
    try:
        try:
            with _addressable(socket_path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunningError(socket=str(socket_path), reason=exc.strerror) from exc
        sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError as exc:
        raise DaemonNotRunningError(socket=str(socket_path), reason="no answer in time") from exc
    finally:
        sock.close()
    if not buf:
        raise DaemonNotRunningError(socket=str(socket_path), reason="the daemon closed the connection")
    return json.loads(bytes(buf).split(b"\n", 1)[0].decode())
