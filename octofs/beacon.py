"""beacon.py: owns the UDP sockets of discovery: the target's responder and the `octofs discover` query.

The datagrams themselves are discovery.py's (sans-I/O); docs/FORMAT.md §9 is the spec.

Invariants:
- The responder answers only a valid query, only by unicast to the sender, and at
  most ``MAX_ANSWERS_PER_S`` times a second; anything else it receives is dropped
  with a DEBUG line, never a traceback. It never takes ``octofs serve`` down: if
  it cannot bind its port it logs a WARNING and serving goes on without it.
- An answer holds nothing derived from the shared secret (discovery.py).
- The query is sent per interface (directed broadcast, and multicast with
  ``IP_MULTICAST_IF``), so it works without a default route; TTL 1 keeps it on the LAN.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import secrets
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from octofs import discovery, state
from octofs.discovery import Answer, DiscoveryError, Query

log = logging.getLogger(__name__)

MAX_ANSWERS_PER_S = 50
# New interfaces (a cable plugged in, a VM's bridge) are joined to the group this often.
REJOIN_INTERVAL_S = 30.0
FINGERPRINT_FILE = "fingerprint"

# <linux/sockios.h>, <net/if.h>
_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_SIOCGIFBRDADDR = 0x8919
_IFF_UP = 0x1
_IFF_BROADCAST = 0x2
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000


@dataclass(frozen=True)
class Interface:
    """An IPv4 interface that is up: its name, (primary) address and broadcast address."""

    name: str
    address: str
    broadcast: str | None
    loopback: bool
    multicast: bool


def ipv4_interfaces() -> list[Interface]:
    """The interfaces that are up and have an IPv4 address (SIOCGIF* ioctls: no dependency, no parsing)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("16s24x", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req), 16)[0]
                if not flags & _IFF_UP:
                    continue
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:  # EADDRNOTAVAIL: no IPv4 address; ENODEV: gone meanwhile
                continue
            brd = None
            if flags & _IFF_BROADCAST:
                with contextlib.suppress(OSError):
                    brd = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFBRDADDR, req)[20:24])
            out.append(Interface(name, addr, brd if brd != "0.0.0.0" else None,
                                 bool(flags & _IFF_LOOPBACK), bool(flags & _IFF_MULTICAST)))
    return out


def target_fingerprint(state_root: Path) -> str:
    """The target root's discovery fingerprint: 32 random hex digits, created once and kept.

    Random, so nothing about the shared secret can be learned from it.
    """
    path = Path(state_root) / FINGERPRINT_FILE
    try:
        text = path.read_text().strip()
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            return text
        log.warning("%s is malformed; making a new fingerprint", path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = secrets.token_hex(16)
    state.write_atomic(path, text.encode() + b"\n")
    return text


# -- the responder (target) -----------------------------------------------------------------


def _membership(group: str, interface_address: str) -> bytes:
    return socket.inet_aton(group) + socket.inet_aton(interface_address)


def _join_groups(sock, joined: set[str]) -> None:
    for itf in ipv4_interfaces():
        if not itf.multicast or itf.address in joined:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                            _membership(discovery.MULTICAST_GROUP, itf.address))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # EADDRINUSE: already a member there
                log.debug("cannot join %s on %s: %s", discovery.MULTICAST_GROUP, itf.name, exc)
                continue
        joined.add(itf.address)
        log.debug("joined %s on %s (%s)", discovery.MULTICAST_GROUP, itf.name, itf.address)


async def serve_discovery(template: Answer, *, port: int = discovery.PORT, host: str = "",
                          task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer `octofs discover` queries on UDP ``port`` until cancelled.

    Args:
        template: the answer to send; its nonce is replaced by each query's.
        port: the UDP port (discovery.PORT; 0 for tests that query it directly).
        host: the address to bind; only the default (every address) joins the
            multicast group, so a test bound to 127.0.0.1 sends nothing onto a LAN.

    Returns (through ``task_status.started``): the bound UDP port, or None when
    the port could not be bound (then this returns at once, after a WARNING).

    Cancellation: closes the socket.

    Error handling: bad datagrams are dropped (DEBUG); a failed send is logged at
    DEBUG; nothing a peer sends ends the responder.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        # SO_REUSEADDR: several `octofs serve` on one host all bind the port, and the
        # kernel hands each of them every broadcast and multicast datagram.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((host, port))
        except OSError as exc:
            log.warning("discovery is off: cannot bind UDP port %d: %s", port, exc.strerror or exc)
            task_status.started(None)
            return
        joined: set[str] = set()
        if not host:
            _join_groups(sock, joined)
        bound = sock.getsockname()[1]
        log.info("answering octofs discover on UDP port %d (broadcast, multicast %s) as %s, fingerprint %s",
                 bound, discovery.MULTICAST_GROUP, template.name, template.fingerprint)
        task_status.started(bound)
        window_start, answered = trio.current_time(), 0
        next_join = trio.current_time() + REJOIN_INTERVAL_S
        while True:
            with trio.move_on_at(next_join):
                try:
                    data, addr = await sock.recvfrom(discovery.MAX_DATAGRAM_BYTES + 1)
                except OSError as exc:  # e.g. a queued ICMP error; the socket itself is still good
                    log.debug("discovery socket: %s", exc)
                    continue
                try:
                    query = discovery.decode_query(data)
                except DiscoveryError as exc:
                    log.debug("ignoring a datagram from %s:%d: %s", addr[0], addr[1], exc)
                    continue
                now = trio.current_time()
                if now - window_start >= 1.0:
                    window_start, answered = now, 0
                if answered >= MAX_ANSWERS_PER_S:
                    log.debug("not answering %s:%d: over %d answers this second", addr[0], addr[1],
                              MAX_ANSWERS_PER_S)
                    continue
                answered += 1
                reply = discovery.encode_answer(Answer(query.nonce, *_fields(template)))
                try:
                    await sock.sendto(reply, addr)
                except OSError as exc:
                    log.debug("cannot answer %s:%d: %s", addr[0], addr[1], exc)
                    continue
                log.debug("answered a discovery query from %s:%d", addr[0], addr[1])
            if trio.current_time() >= next_join:
                if not host:
                    _join_groups(sock, joined)
                next_join = trio.current_time() + REJOIN_INTERVAL_S


def _fields(a: Answer) -> tuple:
    return (a.name, a.host, a.port, a.version, a.protocols, a.fingerprint)


# -- the query (`octofs discover`; blocking, no event loop) -----------------------------------


@dataclass(frozen=True)
class Found:
    """One answering target: its answer and the address it came from."""

    answer: Answer
    source: str

    @property
    def address(self) -> str:
        return self.answer.address(self.source)


def discover(timeout_s: float, *, port: int = discovery.PORT, resend_after_s: float = 0.5) -> list[Found]:
    """Ask the LAN who runs `octofs serve`, and collect the answers for ``timeout_s`` seconds.

    The query goes to each interface's broadcast address and to the multicast
    group on each interface, and is sent again after ``resend_after_s`` (UDP may
    lose one). Answers are de-duplicated by (fingerprint, address) and sorted by name.

    Returns:
        One ``Found`` per target and address.
    """
    nonce = secrets.token_bytes(discovery.NONCE_BYTES)
    query = discovery.encode_query(Query(nonce))
    found: dict[tuple[str, str], Found] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.bind(("", 0))
        start = time.monotonic()
        deadline = start + timeout_s
        sends = [start] + ([start + resend_after_s] if resend_after_s < timeout_s else [])
        while True:
            now = time.monotonic()
            while sends and now >= sends[0]:
                sends.pop(0)
                _send_query(sock, query, port)
            if now >= deadline:
                break
            wait = (min(deadline, sends[0]) if sends else deadline) - now
            ready, _, _ = select.select([sock], [], [], wait)
            if not ready:
                continue
            data, (ip, sport) = sock.recvfrom(discovery.MAX_DATAGRAM_BYTES + 1)
            try:
                answer = discovery.decode_answer(data)
            except DiscoveryError as exc:
                log.debug("ignoring a datagram from %s:%d: %s", ip, sport, exc)
                continue
            if answer.nonce != nonce:
                log.debug("ignoring an answer from %s:%d to another query", ip, sport)
                continue
            f = Found(answer, ip)
            found.setdefault((answer.fingerprint, f.address), f)
    return sorted(found.values(), key=lambda f: (f.answer.name, f.address))


def _send_query(sock: socket.socket, query: bytes, port: int) -> None:
    sent = 0
    for itf in ipv4_interfaces():
        if itf.loopback:
            continue
        if itf.broadcast:
            sent += _sendto(sock, query, itf.broadcast, port, itf.name)
        if itf.multicast:
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(itf.address))
            except OSError as exc:
                log.debug("cannot send multicast on %s: %s", itf.name, exc)
                continue
            sent += _sendto(sock, query, discovery.MULTICAST_GROUP, port, itf.name)
    if not sent:
        log.info("no network interface to query (only loopback, or none up)")


def _sendto(sock: socket.socket, data: bytes, host: str, port: int, itf: str) -> int:
    try:
        sock.sendto(data, (host, port))
    except OSError as exc:
        log.debug("cannot send the query to %s on %s: %s", host, itf, exc)
        return 0
    log.debug("sent the query to %s:%d on %s", host, port, itf)
    return 1


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (a target there cannot be reached from the LAN)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return host == "localhost"
    return all(info[4][0].startswith("127.") or info[4][0] == "::1" for info in infos)


__all__ = ["Found", "Interface", "discover", "ipv4_interfaces", "is_loopback", "serve_discovery",
           "target_fingerprint"]
