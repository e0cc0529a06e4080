"""A TCP proxy on 127.0.0.1 that cuts connections at random byte offsets (a flaky link, for tests).

Each accepted connection is paired with a fresh connection to ``upstream`` and gets
two random byte budgets, one per direction. Bytes are forwarded unchanged until a
direction reaches its budget: exactly that many bytes are passed on, then both sides
are closed, either with a FIN or, at random, with a RST (``SO_LINGER`` 0; as on a real
link, bytes still in flight may then be lost too), so the peers see a link dying in the
middle of a frame, of a handshake, or between acks.
``heal()`` makes later connections pass everything.

Threads, not trio: the proxy runs beside subprocess daemons and blocking test code.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

CHUNK = 65536


@dataclass(frozen=True)
class Cut:
    """One connection cut by the proxy."""

    connection: int  # 1, 2, 3 ... in accept order
    direction: str  # "up" (client → upstream) or "down" (upstream → client)
    offset: int  # bytes that got through in that direction before the cut
    reset: bool  # closed with RST rather than FIN


def default_budget(rng: random.Random, connection: int, direction: str) -> int:
    """Bytes connection number ``connection`` may carry in ``direction`` before it is cut.

    Every fifth connection dies early on the way up (in or right after the handshake), every
    fifth early on the way down (the target's challenge, welcome or first acks); the others
    carry up to 300 kB of op frames and a few acks, so that most connections make progress.
    """
    if direction == "up":
        return rng.randrange(0, 300) if connection % 5 == 1 else rng.randrange(300, 300_000)
    return rng.randrange(0, 120) if connection % 5 == 2 else rng.randrange(120, 2_000)


class CuttingProxy:
    """Forward ``127.0.0.1:PORT`` → ``upstream``, cutting each connection after a random number of bytes.

    Use as a context manager; ``address`` is where clients connect. On exit every
    connection is closed and every thread joined.

    Args:
        upstream: (host, port) to forward to.
        seed: for the byte budgets and the FIN/RST choice (report it when a test fails).
        budget: (rng, connection number, direction) → bytes allowed in that direction;
            default ``default_budget``.
        resets: the share of cuts made with a RST rather than a FIN.
    """

    def __init__(self, upstream: tuple[str, int], *, seed: int,
                 budget: Callable[[random.Random, int, str], int] = default_budget, resets: float = 0.5) -> None:
        self.upstream = upstream
        self.seed = seed
        self._rng = random.Random(seed)
        self._budget = budget
        self._resets = resets
        self._lock = threading.Lock()
        self._cutting = True
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.cuts: list[Cut] = []
        self.bytes = {"up": 0, "down": 0}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    @property
    def address_str(self) -> str:
        return "{}:{}".format(*self.address)

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def heal(self) -> None:
        """From now on, new connections are forwarded without cuts."""
        with self._lock:
            self._cutting = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._sockets)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux)
        self._listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=10)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=10)
        leftover = [t.name for t in threads if t.is_alive()]
        for s in socks:
            s.close()
        assert not leftover, f"proxy threads did not stop: {leftover}"

    # -- internals ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self.connections += 1
                number = self.connections
                limits = ({d: self._budget(self._rng, number, d) for d in ("up", "down")} if self._cutting
                          else {"up": None, "down": None})
                reset = self._rng.random() < self._resets
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()  # the target is down: so is the link
                continue
            conn = _Connection(self, number, client, server, limits, reset)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
                for direction, src, dst in (("up", client, server), ("down", server, client)):
                    t = threading.Thread(target=conn.pump, args=(direction, src, dst),
                                         name=f"proxy-{number}-{direction}", daemon=True)
                    self._threads.append(t)
                    t.start()
                self._threads = [t for t in self._threads if t.is_alive() or not t.ident]

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(socks)


class _Connection:
    def __init__(self, proxy: CuttingProxy, number: int, client: socket.socket, server: socket.socket,
                 limits: dict[str, int | None], reset: bool) -> None:
        self.proxy, self.number = proxy, number
        self.client, self.server = client, server
        self.limits = limits
        self.reset = reset
        self._lock = threading.Lock()
        self._closing = False
        self._pumps_left = 2

    def pump(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        limit = self.limits[direction]
        sent = 0
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    if not self._closing:
                        # The peer closed its side: pass the FIN on, keep the other direction going.
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                    return
                if limit is not None and sent + len(data) >= limit:
                    data = data[: limit - sent]
                    dst.sendall(data)
                    self._count(direction, len(data))
                    self._cut(direction, limit)
                    return
                dst.sendall(data)
                sent += len(data)
                self._count(direction, len(data))
        except OSError:
            self._close_both(reset=False)  # one side failed (reset by its peer, or shut by a cut)
        finally:
            with self._lock:
                self._pumps_left -= 1
                last = self._pumps_left == 0
            if last:
                self._close_both(reset=False)
                self.client.close()  # with SO_LINGER 0 (a RST cut), this sends the RST
                self.server.close()
                self.proxy._forget(self.client, self.server)

    def _count(self, direction: str, n: int) -> None:
        with self.proxy._lock:
            self.proxy.bytes[direction] += n

    def _cut(self, direction: str, offset: int) -> None:
        with self._lock:
            if self._closing:
                return
        with self.proxy._lock:
            self.proxy.cuts.append(Cut(self.number, direction, offset, self.reset))
        if self.reset:
            for s in (self.client, self.server):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close_both(reset=self.reset)

    def _close_both(self, *, reset: bool) -> None:
        """Wake both pumps. A FIN cut shuts both ways now; a RST cut only stops reading, and the
        final close() (SO_LINGER 0) sends the RST."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)
