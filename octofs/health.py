"""health.py: owns the health probe: the tiny authenticated UDP "are you alive?" exchange of failover.

docs/FORMAT.md §11 is the spec. Three kinds of peers use it:

- the primary's mount daemon (vault.yaml ``failover.health``) answers ``probe``:
  "I am the primary of vault V at epoch E" (or "fenced");
- a target's failure detector (failover.py) sends ``probe`` to the primary over
  this separate path when heartbeats stop: the direct query;
- a witness (an ``octofs serve`` with ``health:`` in SERVE.yaml) answers ``see``:
  it probes the primary itself and says whether it got an answer, so that a
  target that merely lost its own link to a live primary does not take over.

Invariants:
- Every datagram carries an HMAC-SHA256 of its body under the shared secret; a
  datagram whose MAC does not verify is dropped without an answer (nothing is
  told to, or amplified for, someone who does not know the secret).
- An answer echoes the request's fresh nonce under its own MAC, and answers and
  requests have different types, so neither a replayed nor a reflected datagram
  is taken for an answer.
- The responder never ends its daemon: bad datagrams are dropped at DEBUG, a
  failed bind is a WARNING.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from octofs import codec

log = logging.getLogger(__name__)

MAGIC = "octofs-health"
VERSION = 1
NONCE_BYTES = 16
MAX_DATAGRAM_BYTES = 2048
DEFAULT_PORT = 7071
_MAC_PREFIX = b"octofs-health-v1|"
REQUEST_TYPES = ("probe", "see", "handover", "failback")
ANSWER_TYPES = {"probe": "alive", "see": "seen", "handover": "handover_ok", "failback": "failback_ok"}


class HealthError(Exception):
    """A datagram that is not a valid, authenticated health message."""


@dataclass(frozen=True)
class Alive:
    """An answer to ``probe``: who answers for ``vault`` there, at which epoch."""

    vault: str
    role: str  # "primary", "fenced", "target" or "unknown"
    epoch: int
    seq: int


@dataclass(frozen=True)
class Seen:
    """A witness's answer to ``see``: whether it got an answer from the primary, and that answer."""

    seen: bool
    alive: Alive | None


# -- sans-I/O codec ---------------------------------------------------------------------


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, _MAC_PREFIX + body, hashlib.sha256).digest()


def encode(secret: bytes, body: dict) -> bytes:
    raw = codec.packb(body)
    data = codec.packb({"m": MAGIC, "v": VERSION, "b": raw, "mac": _mac(secret, raw)})
    if len(data) > MAX_DATAGRAM_BYTES:
        raise ValueError(f"health datagram of {len(data)} bytes is over {MAX_DATAGRAM_BYTES}")
    return data


def decode(secret: bytes, data: bytes) -> dict:
    """The authenticated body of a datagram. Raises HealthError."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise HealthError(f"{len(data)} bytes, over {MAX_DATAGRAM_BYTES}")
    try:
        outer = codec.unpackb(bytes(data))
    except codec.CodecError as exc:
        raise HealthError(str(exc)) from None
    if not isinstance(outer, dict) or outer.get("m") != MAGIC:
        raise HealthError("not an octofs health datagram (magic)")
    if outer.get("v") != VERSION:
        raise HealthError(f"unsupported health version {outer.get('v')!r}")
    raw, mac = outer.get("b"), outer.get("mac")
    if not isinstance(raw, bytes) or not isinstance(mac, bytes):
        raise HealthError("missing body or mac")
    if not hmac.compare_digest(mac, _mac(secret, raw)):
        raise HealthError("bad mac (a different secret, or forged)")
    try:
        body = codec.unpackb(raw)
    except codec.CodecError as exc:
        raise HealthError(str(exc)) from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str) or not isinstance(body.get("vault"), str):
        raise HealthError("body is not a map with type and vault")
    nonce = body.get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise HealthError("bad nonce")
    return body


def alive_from(body: dict) -> Alive:
    role, epoch, seq = body.get("role"), body.get("epoch"), body.get("seq")
    if not isinstance(role, str) or type(epoch) is not int or type(seq) is not int:
        raise HealthError("alive: bad role, epoch or seq")
    return Alive(body["vault"], role, epoch, seq)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HealthError(f"bad address {text!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the client ---------------------------------------------------------------------


async def _exchange(address: tuple[str, int], secret: bytes, body: dict, timeout_s: float) -> dict | None:
    """Send a request, wait ``timeout_s`` for its answer; None when none came (or the path failed)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock, trio.move_on_after(timeout_s):
        try:
            await sock.connect(address)
            await sock.send(encode(secret, body))
        except OSError as exc:  # no route, blackholed, unreachable
            log.debug("health request to %s failed: %s", format_address(*address), exc)
            await trio.sleep(timeout_s)  # count it as a try that got no answer
            return None
        while True:
            try:
                data = await sock.recv(MAX_DATAGRAM_BYTES + 1)
            except OSError as exc:  # ICMP port unreachable: nobody listens there
                log.debug("health request to %s: %s", format_address(*address), exc)
                await trio.sleep(timeout_s)
                return None
            try:
                answer = decode(secret, data)
            except HealthError as exc:
                log.debug("ignoring a health datagram from %s: %s", format_address(*address), exc)
                continue
            if answer["nonce"] == body["nonce"] and answer["type"] == ANSWER_TYPES[body["type"]]:
                return answer
    return None


async def probe(address: tuple[str, int], vault: str, secret: bytes, *, timeout_s: float,
                tries: int = 3) -> Alive | None:
    """Ask ``address`` who answers for ``vault``; up to ``tries`` requests of ``timeout_s`` each.

    Returns the answer, or None when none came (the peer is unreachable or dead).
    """
    for _ in range(tries):
        body = {"type": "probe", "vault": vault, "nonce": secrets.token_bytes(NONCE_BYTES)}
        answer = await _exchange(address, secret, body, timeout_s)
        if answer is not None:
            try:
                return alive_from(answer)
            except HealthError as exc:
                log.debug("bad alive answer from %s: %s", format_address(*address), exc)
    return None


async def ask_witness(witness: tuple[str, int], primary: tuple[str, int], vault: str, secret: bytes, *,
                      timeout_s: float, tries: int = 3) -> Seen | None:
    """Ask the witness whether it sees the primary of ``vault`` at ``primary``; None if the witness is silent."""
    # The witness probes with the same timeout and tries: give it the time to.
    for _ in range(tries):
        body = {"type": "see", "vault": vault, "nonce": secrets.token_bytes(NONCE_BYTES),
                "primary": format_address(*primary), "timeout_s": float(timeout_s)}
        answer = await _exchange(witness, secret, body, timeout_s * (tries + 1))
        if answer is None:
            continue
        seen = answer.get("seen")
        alive = answer.get("alive")
        if not isinstance(seen, bool):
            continue
        try:
            return Seen(seen, alive_from({**alive, "vault": vault}) if isinstance(alive, dict) else None)
        except HealthError:
            continue
    return None


async def request_handover(target: tuple[str, int], vault: str, secret: bytes, *, epoch: int, seq: int,
                           timeout_s: float) -> dict | None:
    """Ask the target at ``target`` to take ``vault`` over now (a planned switch): every op up to ``seq``
    of ``epoch`` is acked there. Returns its answer (``accepted``, ``reason``, ``epoch``) or None (silent)."""
    body = {"type": "handover", "vault": vault, "nonce": secrets.token_bytes(NONCE_BYTES), "epoch": epoch,
            "seq": seq}
    return await _exchange(target, secret, body, timeout_s)


async def request_failback(primary: tuple[str, int], vault: str, secret: bytes, *, epoch: int, seq: int,
                           to: str, timeout_s: float) -> dict | None:
    """Ask the primary of ``vault`` (its mount daemon's responder) to hand the vault over to the target whose
    health responder is ``to`` ("HOST:PORT"), which holds everything up to ``seq`` of ``epoch`` (``octofs failback``)."""
    body = {"type": "failback", "vault": vault, "nonce": secrets.token_bytes(NONCE_BYTES), "epoch": epoch,
            "seq": seq, "to": to}
    return await _exchange(primary, secret, body, timeout_s)


# -- the responder ------------------------------------------------------------------------

Lookup = Callable[[str], Alive | None]
Handler = Callable[[dict], Awaitable[dict]]


async def serve_health(host: str, port: int, secret: bytes, lookup: Lookup, *, witness: bool = False,
                       handover: Handler | None = None, failback: Handler | None = None, task_status: trio.TaskStatus[tuple[str, int] | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer authenticated health requests on UDP ``host:port`` until cancelled.

    Args:
        lookup: vault name → what to answer to ``probe`` (None: do not answer for it).
        witness: also answer ``see`` (probe the named primary, say whether it answered).
        handover: answer ``handover`` with what this returns (failover.py: a planned takeover).
        failback: answer ``failback`` with what this returns (the mount daemon: hand the vault back).

    Returns (through ``task_status.started``): the bound address, or None when the
    port could not be bound (then this returns at once, after a WARNING).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        try:
            await sock.bind((host, port))
        except OSError as exc:
            log.warning("health responder is off: cannot bind UDP %s: %s", format_address(host, port),
                        exc.strerror or exc)
            task_status.started(None)
            return
        bound = sock.getsockname()[:2]
        log.info("answering health probes%s on UDP %s", " and witness queries" if witness else "",
                 format_address(*bound))
        task_status.started(bound)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, addr = await sock.recvfrom(MAX_DATAGRAM_BYTES + 1)
                except OSError as exc:
                    log.debug("health socket: %s", exc)
                    continue
                try:
                    body = decode(secret, data)
                except HealthError as exc:
                    log.debug("ignoring a health datagram from %s: %s", addr[0], exc)
                    continue
                if body["type"] == "probe":
                    alive = lookup(body["vault"])
                    if alive is None:
                        continue
                    reply = {"type": "alive", "vault": body["vault"], "nonce": body["nonce"], "role": alive.role,
                             "epoch": alive.epoch, "seq": alive.seq}
                    await _reply(sock, secret, reply, addr)
                elif body["type"] == "see" and witness:
                    nursery.start_soon(_witness, sock, secret, body, addr)
                elif body["type"] == "handover" and handover is not None:
                    nursery.start_soon(_handover, sock, secret, body, addr, handover)
                elif body["type"] == "failback" and failback is not None:
                    nursery.start_soon(_handover, sock, secret, body, addr, failback)


async def _witness(sock, secret: bytes, body: dict, addr) -> None:
    try:
        primary = _addr(str(body.get("primary")))
    except HealthError as exc:
        log.debug("witness query from %s: %s", addr[0], exc)
        return
    timeout_s = body.get("timeout_s")
    timeout_s = min(5.0, max(0.05, float(timeout_s))) if isinstance(timeout_s, (int, float)) else 1.0
    alive = await probe(primary, body["vault"], secret, timeout_s=timeout_s)
    seen = alive is not None and alive.role == "primary"
    log.info("witness: vault %s, primary %s %s (asked by %s)", body["vault"], format_address(*primary),
             "answers" if seen else "does not answer as primary", addr[0])
    reply = {"type": "seen", "vault": body["vault"], "nonce": body["nonce"], "seen": seen,
             "alive": None if alive is None else {"role": alive.role, "epoch": alive.epoch, "seq": alive.seq}}
    await _reply(sock, secret, reply, addr)


async def _handover(sock, secret: bytes, body: dict, addr, handler: Handler) -> None:
    answer = await handler(body)
    after = answer.pop("_after", None)  # to run once the answer is sent (the mount unmounting itself)
    reply = {"type": ANSWER_TYPES[body["type"]], "vault": body["vault"], "nonce": body["nonce"], **answer}
    await _reply(sock, secret, reply, addr)
    if after is not None:
        after()


async def _reply(sock, secret: bytes, reply: dict, addr) -> None:
    try:
        await sock.sendto(encode(secret, reply), addr)
    except OSError as exc:
        log.debug("cannot answer %s: %s", addr[0], exc)


__all__ = ["Alive", "HealthError", "Seen", "ask_witness", "decode", "encode", "probe", "request_failback",
           "request_handover", "serve_health"]
