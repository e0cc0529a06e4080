"""link.py: owns opening the replication link: TCP, then TLS when configured (docs/FORMAT.md §7.12), on both sides;
and the link's cheap send of a small frame (``send_now``) for the per-batch hot path.

Invariants:
- With TLS, no octofs frame is sent or read before the TLS handshake has
  completed and (primary side) the target's certificate matched the pinned
  fingerprint or chained to the CA file.
- A TLS failure is a ``PeerCertificateError`` with a readable reason; a TCP
  failure stays an ``OSError`` (callers reconnect with backoff, as before TLS).
"""

from __future__ import annotations

import os
import ssl

import trio

from octofs import tlsconf
from octofs.errors import PeerCertificateError
from octofs.tlsconf import ClientTls


async def open_link(host: str, port: int, *, tls: ClientTls | None, peer: str,
                    connect_timeout_s: float) -> trio.abc.Stream:
    """A connected stream to ``host:port``, TLS-wrapped and checked when ``tls`` is given.

    Raises:
        OSError, trio.TooSlowError: the TCP connection failed.
        PeerCertificateError: the TLS handshake failed or the certificate is not the pinned one.
    """
    with trio.fail_after(connect_timeout_s):
        tcp = await trio.open_tcp_stream(host, port)
    if tls is None:
        return tcp
    stream = trio.SSLStream(tcp, tls.context, server_hostname=host)
    try:
        with trio.fail_after(connect_timeout_s):
            await stream.do_handshake()
        if tls.fingerprint is not None:
            der = stream.getpeercert(binary_form=True)
            got = tlsconf.fingerprint_der(der) if der else None
            if got != tls.fingerprint:
                shown = tlsconf.show(got) if got else "none"
                raise PeerCertificateError(peer=peer, reason=f"the target's certificate {shown} is not the pinned "
                                                             f"{tlsconf.show(tls.fingerprint)}")
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        raise PeerCertificateError(peer=peer, reason=tlsconf.describe_failure(exc.__cause__)) from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def send_now(stream: trio.abc.Stream, data: bytes | memoryview) -> int:
    """Hand ``data`` to the kernel at once on a plain TCP stream: the count of bytes it took (0 if it
    would block, or if ``stream`` is not plain TCP, e.g. TLS). No trio checkpoint, no task switch.

    For the small frames of the replication hot path (a target's ``ack``, a primary's op batch of one
    commit): ``send_all`` costs a scheduler pass even when the kernel takes everything at once
    (docs/PERFORMANCE.md). The caller sends the rest, if any, with ``send_all``, and must be the
    only task sending on ``stream`` (a send lock, or one task per connection).

    Raises:
        trio.BrokenResourceError: the connection is gone (as ``send_all`` would raise it).
    """
    if type(stream) is not trio.SocketStream:
        return 0
    try:
        return os.write(stream.socket.fileno(), data)  # the socket is non-blocking (trio made it so)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def tls_refusal(exc: BaseException, peer: str) -> PeerCertificateError | None:
    """The PeerCertificateError behind a broken TLS stream (e.g. the target refused our
    client certificate, which TLS 1.3 reports only at the first read), or None."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    if isinstance(cause, ssl.SSLError):
        return PeerCertificateError(peer=peer, reason=tlsconf.describe_failure(cause))
    return None


async def accept_tls(stream: trio.abc.Stream, context: ssl.SSLContext) -> trio.SSLStream:
    """The target's side: complete the TLS handshake on an accepted connection.

    Raises:
        PeerCertificateError: the handshake failed (no TLS, a missing or untrusted client certificate).
    """
    ssl_stream = trio.SSLStream(stream, context, server_side=True)
    try:
        await ssl_stream.do_handshake()
    except trio.BrokenResourceError as exc:
        # OpenSSL wrote an alert for the peer (certificate required, unknown CA, ...), but trio
        # gives up without sending it; send it ourselves, best effort, so that the primary can
        # say *why* (else it sees only an EOF). `_outgoing` is trio's MemoryBIO; without it, skip.
        outgoing = getattr(ssl_stream, "_outgoing", None)
        alert = outgoing.read() if outgoing is not None else b""
        if alert:
            with trio.move_on_after(1):
                try:
                    await stream.send_all(alert)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        raise PeerCertificateError(peer="primary", reason=tlsconf.describe_failure(exc.__cause__, our_side="target"))\
            from None
    return ssl_stream


class TokenBucket:
    """A bytes-per-second limit (vault.yaml ``bandwidth:``) on what a shipper sends.

    ``take(n)`` charges ``n`` bytes and, when the bucket is in debt, sleeps until the
    debt is paid at ``rate_bps``: a frame larger than the burst still goes out whole,
    and the average rate over any stretch longer than a frame is the limit.

    Args:
        rate_bps: bytes per second (> 0).
        burst: bytes that may go out at once after a quiet spell (default: rate/10, at least 64 KiB).
    """

    def __init__(self, rate_bps: int, burst: int | None = None) -> None:
        if rate_bps <= 0:
            raise ValueError("rate_bps must be positive")
        self.rate_bps = rate_bps
        self.burst = burst if burst is not None else max(64 * 1024, rate_bps // 10)
        self._tokens = float(self.burst)
        self._stamp: float | None = None

    async def take(self, n: int) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate_bps)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate_bps)
