"""exporter.py: owns the metrics endpoint's TCP listener: one HTTP request per connection, answered and closed.

What it says is metrics.py's (sans-I/O); this is the trio part, no HTTP library.

Invariants:
- Opt-in: nothing listens unless ``metrics:`` is configured (vault.yaml, SERVE.yaml).
- A connection costs at most ``MAX_REQUEST_BYTES`` and ``REQUEST_TIMEOUT_S``; a bad or
  slow client gets a 400 or is dropped and never disturbs the daemon.
- The figures are read from the daemon's status document at request time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from octofs import __version__, metrics
from octofs.errors import OctofsError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
StatusSource = Callable[[], Awaitable[dict[str, Any]]]


async def serve_metrics(host: str, port: int, status: StatusSource, *,
                        task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``host:port`` until cancelled.

    Args:
        host, port: where to listen; port 0 picks a free one.
        status: returns the daemon's status document (what ``status --json`` shows).

    Returns (through ``task_status.started``): the bound address as ``host:port``, or
    None when the address cannot be bound: then an ERROR is logged and this returns,
    because a daemon without its metrics is better than no daemon.

    Cancellation: closes the listener and open connections.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        log.error("no metrics endpoint: cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        task_status.started(None)
        return
    sockname = listeners[0].socket.getsockname()
    bound = f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0] else f"{sockname[0]}:{sockname[1]}"
    log.info("serving Prometheus metrics on http://%s/metrics", bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, lambda stream: _handle(stream, status), listeners)
        task_status.started(bound)


async def _handle(stream: trio.SocketStream, status: StatusSource) -> None:
    async with stream:
        try:
            reply = await _reply(stream, status)
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            log.debug("metrics client dropped: %s", type(exc).__name__)
            return
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            log.debug("metrics client went away before the reply")


async def _reply(stream: trio.SocketStream, status: StatusSource) -> bytes:
    data = bytearray()
    with trio.fail_after(REQUEST_TIMEOUT_S):
        while not metrics.request_complete(data):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > metrics.MAX_REQUEST_BYTES:
                return metrics.response(400, "request too large\n")
    try:
        method, path = metrics.parse_request(bytes(data))
    except metrics.HttpRequestError as exc:
        return metrics.response(400, f"{exc}\n")
    if path != "/metrics" or method not in ("GET", "HEAD"):
        return metrics.answer(method, path, lambda: "")
    try:
        doc = await status()
    except OctofsError as exc:  # e.g. the control socket does not answer (yet)
        log.warning("metrics: cannot read the status: %s", exc.message)
        return metrics.response(503, f"cannot read the status: {exc.message}\n")
    return metrics.answer(method, path, lambda: metrics.render(doc, __version__))
