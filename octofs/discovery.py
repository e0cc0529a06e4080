"""discovery.py: owns the discovery datagrams (`octofs discover`): query and answer, encoded and checked.

Sans-I/O: bytes in, values out; the UDP sockets live in beacon.py (the target's
responder) and cli/discover_cmd.py (the query). docs/FORMAT.md §9 is the spec.

Invariants:
- A datagram is one msgpack map (codec.packb/unpackb, so codec stays the only
  importer of msgpack) with ``magic`` = ``"octofs-discover"``, ``v`` = 1 and
  ``type`` = ``"query"`` or ``"answer"``. Unknown keys are ignored, so a later
  version can add fields; a different ``v`` is refused.
- ``decode_query``/``decode_answer`` return a checked value or raise
  ``DiscoveryError``; they never return garbage and never raise anything else,
  whatever bytes arrive (a LAN is not trusted).
- Nothing in an answer is derived from the shared secret: the fingerprint is a
  random id of the target root (beacon.target_fingerprint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from octofs import codec

MAGIC = "octofs-discover"
VERSION = 1
# UDP port of discovery (the replication port's number, over UDP: one number for a firewall rule).
PORT = 7070
# Organization-local scope (RFC 2365): routers at the site's edge do not forward it.
MULTICAST_GROUP = "239.255.70.70"
MAX_DATAGRAM_BYTES = 1024
NONCE_BYTES = 8

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{32}\Z")
_VERSION_RE = re.compile(r"[0-9A-Za-z.+!_-]{1,32}\Z")
_HOST_RE = re.compile(r"[0-9A-Za-z.:_%-]{0,255}\Z")
MAX_PROTOCOLS = 16


class DiscoveryError(ValueError):
    """A datagram that is not a valid discovery query or answer (the reason is the message)."""


@dataclass(frozen=True)
class Query:
    """``octofs discover`` asking who is there.

    Attributes:
        nonce: random bytes that every answer echoes, so the client keeps only
            answers to its own query.
    """

    nonce: bytes


@dataclass(frozen=True)
class Answer:
    """One target's reply.

    Attributes:
        nonce: the query's nonce.
        name: the target's name (SERVE.yaml ``name``, default its host name).
        host: the replication listen host, or ``""`` when it listens on every
            address; then the client uses the address the answer came from.
        port: the replication TCP port.
        version: octofs version of the target.
        protocols: wire protocol versions it speaks (FORMAT §7).
        fingerprint: 32 hex digits: a random id of the target root, stable
            across restarts (persisted in ``ROOT/.octofs/fingerprint``).
    """

    nonce: bytes
    name: str
    host: str
    port: int
    version: str
    protocols: tuple[int, ...]
    fingerprint: str

    def address(self, source_ip: str) -> str:
        """``host:port`` to put in vault.yaml; ``source_ip`` is where the datagram came from."""
        host = self.host or source_ip
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def encode_query(query: Query) -> bytes:
    return codec.packb({"magic": MAGIC, "v": VERSION, "type": "query", "nonce": query.nonce})


def encode_answer(answer: Answer) -> bytes:
    data = codec.packb({
        "magic": MAGIC, "v": VERSION, "type": "answer", "nonce": answer.nonce, "name": answer.name,
        "host": answer.host, "port": answer.port, "version": answer.version,
        "protocols": list(answer.protocols), "fingerprint": answer.fingerprint,
    })
    if len(data) > MAX_DATAGRAM_BYTES:  # cannot happen with checked fields; a bug if it does
        raise ValueError(f"answer of {len(data)} bytes is over {MAX_DATAGRAM_BYTES}")
    return data


def decode_query(data: bytes) -> Query:
    """Raises DiscoveryError."""
    doc = _decode(data, "query")
    return Query(nonce=_nonce(doc))


def decode_answer(data: bytes) -> Answer:
    """Raises DiscoveryError."""
    doc = _decode(data, "answer")
    name = _field(doc, "name", str)
    if not _NAME_RE.match(name):
        raise DiscoveryError(f"bad name {name[:80]!r}")
    host = _field(doc, "host", str)
    if not _HOST_RE.match(host):
        raise DiscoveryError(f"bad host {host[:80]!r}")
    port = _field(doc, "port", int)
    if not 1 <= port <= 65535:
        raise DiscoveryError(f"bad port {port}")
    version = _field(doc, "version", str)
    if not _VERSION_RE.match(version):
        raise DiscoveryError(f"bad version {version[:80]!r}")
    protocols = _field(doc, "protocols", list)
    if not 1 <= len(protocols) <= MAX_PROTOCOLS or not all(
            type(p) is int and 1 <= p < 2**16 for p in protocols):
        raise DiscoveryError("bad protocols: expected 1 to 16 integers from 1 to 65535")
    fingerprint = _field(doc, "fingerprint", str)
    if not _FINGERPRINT_RE.match(fingerprint):
        raise DiscoveryError(f"bad fingerprint {fingerprint[:80]!r}")
    return Answer(nonce=_nonce(doc), name=name, host=host, port=port, version=version,
                  protocols=tuple(protocols), fingerprint=fingerprint)


def _decode(data: bytes, kind: str) -> dict[str, Any]:
    if len(data) > MAX_DATAGRAM_BYTES:
        raise DiscoveryError(f"{len(data)} bytes, over {MAX_DATAGRAM_BYTES}")
    try:
        doc = codec.unpackb(bytes(data))
    except codec.CodecError as exc:
        raise DiscoveryError(str(exc)) from None
    if not isinstance(doc, dict):
        raise DiscoveryError(f"expected a map, got {type(doc).__name__}")
    if doc.get("magic") != MAGIC:
        raise DiscoveryError("not an octofs discovery datagram (magic)")
    if doc.get("v") != VERSION or type(doc.get("v")) is not int:
        raise DiscoveryError(f"unsupported discovery version {doc.get('v')!r} (this side speaks {VERSION})")
    if doc.get("type") != kind:
        raise DiscoveryError(f"expected a {kind}, got type {doc.get('type')!r}")
    return doc


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if type(value) is not kind:
        raise DiscoveryError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _nonce(doc: dict[str, Any]) -> bytes:
    nonce = _field(doc, "nonce", bytes)
    if len(nonce) != NONCE_BYTES:
        raise DiscoveryError(f"nonce: expected {NONCE_BYTES} bytes, got {len(nonce)}")
    return nonce


__all__ = [
    "MAX_DATAGRAM_BYTES", "MULTICAST_GROUP", "PORT", "Answer", "DiscoveryError", "Query",
    "decode_answer", "decode_query", "encode_answer", "encode_query",
]
