"""protocol.py: owns the replication wire protocol, sans I/O: frames, messages, authentication proofs.

A frame is ``length u32le`` + a msgpack map (codec.packb) with a ``"t"`` key naming
the message type. docs/FORMAT.md §7 is the spec; this module is its only
implementation.

Invariants:
- ``FrameDecoder`` never returns a partial or malformed message: bytes that are
  not a valid frame of a known type raise ``ProtocolError`` (and the connection
  is then closed by the caller, DESIGN invariant 7). A length above
  ``MAX_FRAME_BYTES`` is refused before anything is buffered for it.
- Op records travel as the journal's record payloads (codec.encode_record); the
  receiver decodes and validates each one with codec.decode_record before use.
- The shared secret never crosses the wire: each side proves it knows it with an
  HMAC-SHA256 over both sides' fresh nonces, the vault id and its own role, so a
  proof cannot be replayed or reflected back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Union

from octofs import codec, compression
from octofs.errors import ProtocolError

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
DEFAULT_PORT = 7070
MAX_FRAME_BYTES = 64 * 2**20
NONCE_BYTES = 32
_LEN = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Hello:
    """primary → target: who I am, which versions I speak, my nonce."""

    versions: tuple[int, ...]
    vault: str
    vault_id: bytes
    epoch: int
    nonce: bytes
    heartbeat_s: float
    # Optional (docs/FORMAT.md §7.11, §7.13): only ask (ProbeInfo, then close); the
    # compressions the primary can send in `zops` frames.
    probe: bool = False
    compress: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Challenge:
    """target → primary: the chosen version, my nonce, my proof of the secret."""

    version: int
    nonce: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    """primary → target: my proof of the secret."""

    proof: bytes


@dataclass(frozen=True, slots=True)
class Welcome:
    """target → primary: authenticated; resume after ``acked_seq``."""

    acked_seq: int
    epoch: int
    owners: bool  # whether the target reproduces file owners (runs as root)
    # Optional (absent = None/False): why the target cannot apply ops until synchronized;
    # the Synchronize it was in the middle of ({"id", "cursor", "seq", "verify"}); whether
    # it ever completed one.
    needs_resync: str | None = None
    sync: dict | None = None
    synced: bool = False
    compress: str | None = None  # optional: the hello's compression this target accepts (§7.13)


@dataclass(frozen=True, slots=True)
class ProbeInfo:
    """target → primary: the answer to a probe Hello (docs/FORMAT.md §7.11); the target closes after it."""

    software: str
    versions: tuple[int, ...]
    version: int
    free_bytes: int
    total_bytes: int
    vault_known: bool
    vault_id_matches: bool
    epoch: int
    applied_seq: int
    needs_resync: str | None
    consistent: bool
    connected: bool


@dataclass(frozen=True, slots=True)
class OpBatch:
    """primary → target: consecutive journal records (codec payloads), seqs ascending."""

    records: tuple[bytes, ...]
    epoch: int = 0  # optional: the sender's epoch (0 = not given); a target refuses a batch below its own


@dataclass(frozen=True, slots=True)
class Ack:
    """target → primary: everything up to ``seq`` is durable on the target."""

    seq: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """primary → target: I am alive; my journal ends at ``last_seq``. Answered with an Ack."""

    time_ns: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Error:
    """either way: the sender closes after this. ``code`` is one of ERROR_CODES."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class SyncBegin:
    """primary → target: a Synchronize starts here in the stream (docs/FORMAT.md §7.6).

    ``reset_seq`` > 0: the target has fallen out of the journal; it takes ``reset_seq``
    as its applied and durable seq (the stream goes on after it) and drops its
    needs-resync mark. ``verify``: only compare; the target stays consistent.
    """

    sync_id: bytes
    reset_seq: int
    verify: bool


@dataclass(frozen=True, slots=True)
class SyncQuery:
    """primary → target: describe these paths as of this point in the stream.

    ``items`` are ``[kind, path]`` with kind ``"list"`` (a directory's entries),
    ``"stat"`` (one entry) or ``"hash"`` (a regular file's block hashes).
    """

    req: int
    block_size: int
    items: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class SyncAnswer:
    """target → primary: the answers to ``req``, in item order, taken after applying ``seq``."""

    req: int
    seq: int
    results: tuple
    # Optional: paths of ops the target skipped since its last answer (its tree was not what
    # they expected: a Synchronize is under way); the primary compares them again.
    skipped: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Repair:
    """primary → target: ops that set paths to the primary's state, applied right after record ``seq - 1``."""

    records: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SyncCheckpoint:
    """primary → target: every path before ``cursor`` (walk order) is verified; persist it (with the applied seq)."""

    sync_id: bytes
    cursor: bytes


@dataclass(frozen=True, slots=True)
class SyncEnd:
    """primary → target: the Synchronize is complete; the target is consistent from here on."""

    sync_id: bytes
    differences: int


Message = Union[Hello, Challenge, Auth, Welcome, OpBatch, Ack, Heartbeat, Error, SyncBegin, SyncQuery, SyncAnswer,
                Repair, SyncCheckpoint, SyncEnd, ProbeInfo]

# "bye": the primary stops cleanly (an unmount), not a failure: a failover watcher must not take over.
ERROR_CODES = frozenset({"version", "auth", "vault_id", "epoch", "busy", "protocol", "apply", "internal", "bye"})

# type tag ↔ class, and each field's expected Python type (for decoding).
_TYPES: dict[str, type] = {
    "hello": Hello,
    "challenge": Challenge,
    "auth": Auth,
    "welcome": Welcome,
    "ops": OpBatch,
    "ack": Ack,
    "hb": Heartbeat,
    "error": Error,
    "sync_begin": SyncBegin,
    "sync_query": SyncQuery,
    "sync_answer": SyncAnswer,
    "repair": Repair,
    "sync_checkpoint": SyncCheckpoint,
    "sync_end": SyncEnd,
    "probe_info": ProbeInfo,
}
_TAGS = {cls: tag for tag, cls in _TYPES.items()}
_FIELDS: dict[type, dict[str, tuple[type, ...]]] = {
    Hello: {"versions": (list,), "vault": (str,), "vault_id": (bytes,), "epoch": (int,), "nonce": (bytes,),
            "heartbeat_s": (int, float), "probe": (bool,), "compress": (list,)},
    Challenge: {"version": (int,), "nonce": (bytes,), "proof": (bytes,)},
    Auth: {"proof": (bytes,)},
    Welcome: {"acked_seq": (int,), "epoch": (int,), "owners": (bool,), "needs_resync": (str, type(None)),
              "sync": (dict, type(None)), "synced": (bool,), "compress": (str, type(None))},
    OpBatch: {"records": (list,), "epoch": (int,)},
    Ack: {"seq": (int,)},
    Heartbeat: {"time_ns": (int,), "last_seq": (int,)},
    Error: {"code": (str,), "message": (str,)},
    SyncBegin: {"sync_id": (bytes,), "reset_seq": (int,), "verify": (bool,)},
    SyncQuery: {"req": (int,), "block_size": (int,), "items": (list,)},
    SyncAnswer: {"req": (int,), "seq": (int,), "results": (list,), "skipped": (list,)},
    Repair: {"records": (list,)},
    SyncCheckpoint: {"sync_id": (bytes,), "cursor": (bytes,)},
    SyncEnd: {"sync_id": (bytes,), "differences": (int,)},
    ProbeInfo: {"software": (str,), "versions": (list,), "version": (int,), "free_bytes": (int,),
                "total_bytes": (int,), "vault_known": (bool,), "vault_id_matches": (bool,), "epoch": (int,),
                "applied_seq": (int,), "needs_resync": (str, type(None)), "consistent": (bool,),
                "connected": (bool,)},
}
# Fields a peer may leave out (it predates them): absent means the dataclass default.
_OPTIONAL: dict[type, frozenset[str]] = {Welcome: frozenset({"needs_resync", "sync", "synced", "compress"}),
                                         SyncAnswer: frozenset({"skipped"}), OpBatch: frozenset({"epoch"}),
                                         Hello: frozenset({"probe", "compress"})}


def encode(msg: Message) -> bytes:
    """One frame: length prefix + msgpack map."""
    cls = type(msg)
    # The two frames of every op batch (one per commit in a write + fsync stream): built directly,
    # the same bytes as the generic loop below.
    if cls is Ack:
        payload = codec.packb({"t": "ack", "seq": msg.seq})
        return _LEN.pack(len(payload)) + payload
    if cls is OpBatch:
        payload = codec.packb({"t": "ops", "records": list(msg.records), "epoch": msg.epoch})
        if len(payload) > MAX_FRAME_BYTES:
            raise ValueError(f"frame of {len(payload)} bytes exceeds MAX_FRAME_BYTES")
        return _LEN.pack(len(payload)) + payload
    body: dict[str, object] = {"t": _TAGS[cls]}
    for name in _FIELDS[type(msg)]:
        value = getattr(msg, name)
        if value is None and name in _OPTIONAL.get(type(msg), ()):
            continue
        body[name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
    payload = codec.packb(body)
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(payload)} bytes exceeds MAX_FRAME_BYTES")
    return _LEN.pack(len(payload)) + payload


def encode_zops(codec_name: str, data: bytes, epoch: int = 0) -> bytes:
    """A `zops` frame (§7.13): ``data`` is the compressed msgpack array of record payloads."""
    body: dict = {"t": "zops", "codec": codec_name, "data": data}
    if epoch:
        body["epoch"] = epoch
    payload = codec.packb(body)
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(payload)} bytes exceeds MAX_FRAME_BYTES")
    return _LEN.pack(len(payload)) + payload


def pack_records(records: list[bytes] | tuple[bytes, ...]) -> bytes:
    """The msgpack array of record payloads that a `zops` frame compresses."""
    return codec.packb(list(records))


def _decode_zops(body: dict, peer: str, accepted: str | None) -> OpBatch:
    name, data = body.get("codec"), body.get("data")
    if not isinstance(name, str) or not isinstance(data, bytes):
        raise ProtocolError(peer=peer, reason="zops: codec must be a string and data binary")
    if accepted is None or name != accepted:
        raise ProtocolError(peer=peer, reason=f"zops: compression {name!r} was not agreed in the handshake")
    try:
        raw = compression.decompress(name, data, MAX_FRAME_BYTES)
        records = codec.unpackb(raw)
    except (ValueError, codec.CodecError) as exc:
        raise ProtocolError(peer=peer, reason=f"zops: {exc}") from None
    if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
        raise ProtocolError(peer=peer, reason="zops: the data must be an array of binary records")
    epoch = body.get("epoch", 0)
    if type(epoch) is not int or epoch < 0:
        raise ProtocolError(peer=peer, reason="zops: epoch must be a non-negative integer")
    return OpBatch(tuple(records), epoch)


def decode_payload(payload: bytes, peer: str = "peer", *, compress: str | None = None) -> Message:
    """Decode one frame's payload (without its length prefix) into a message.

    ``compress``: the compression agreed in the handshake; a `zops` frame in it is
    returned as the OpBatch it holds, any other `zops` frame is a protocol violation.
    """
    try:
        body = codec.unpackb(payload)
    except codec.CodecError as exc:
        raise ProtocolError(peer=peer, reason=f"undecodable frame: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(peer=peer, reason="frame is not a map")
    tag = body.get("t")
    # The hot frames first: a well-formed `ops` or `ack` is built at once; anything else about
    # them (a missing or ill-typed field) goes on to the generic checks, which name the fault.
    if tag == "ops":
        records, epoch = body.get("records"), body.get("epoch", 0)
        if type(records) is list and type(epoch) is int and epoch >= 0 and all(type(r) is bytes for r in records):
            return OpBatch(tuple(records), epoch)
    elif tag == "ack":
        seq = body.get("seq")
        if type(seq) is int and seq >= 0:
            return Ack(seq)
    elif tag == "zops":
        return _decode_zops(body, peer, compress)
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(peer=peer, reason=f"unknown message type {tag!r}")
    kwargs = {}
    for name, types in _FIELDS[cls].items():
        if name not in body:
            if name in _OPTIONAL.get(cls, ()):
                continue
            raise ProtocolError(peer=peer, reason=f"{tag}: missing field {name!r}")
        value = body[name]
        # bool is an int subclass: only accept it where a bool is expected.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(peer=peer, reason=f"{tag}: field {name!r} has type {type(value).__name__}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ProtocolError(peer=peer, reason=f"{tag}: field {name!r} is negative")
        kwargs[name] = value
    # Unknown keys are ignored: a newer peer may add fields (docs/FORMAT.md §7).
    if cls is Hello:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in kwargs["versions"]):
            raise ProtocolError(peer=peer, reason="hello: versions must be integers")
        kwargs["versions"] = tuple(kwargs["versions"])
        if len(kwargs["vault_id"]) != 16 or len(kwargs["nonce"]) != NONCE_BYTES:
            raise ProtocolError(peer=peer, reason="hello: bad vault_id or nonce length")
        compress = kwargs.get("compress", [])
        if not all(isinstance(c, str) for c in compress):
            raise ProtocolError(peer=peer, reason="hello: compress must be an array of strings")
        kwargs["compress"] = tuple(compress)
    elif cls is ProbeInfo:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in kwargs["versions"]):
            raise ProtocolError(peer=peer, reason="probe_info: versions must be integers")
        kwargs["versions"] = tuple(kwargs["versions"])
    elif cls is Challenge:
        if len(kwargs["nonce"]) != NONCE_BYTES:
            raise ProtocolError(peer=peer, reason="challenge: bad nonce length")
    elif cls in (OpBatch, Repair):
        if not all(isinstance(r, bytes) for r in kwargs["records"]):
            raise ProtocolError(peer=peer, reason=f"{tag}: records must be binary")
        kwargs["records"] = tuple(kwargs["records"])
    elif cls is SyncQuery:
        items = kwargs["items"]
        if not all(isinstance(i, list) and len(i) == 2 and i[0] in ("list", "stat", "hash") and isinstance(i[1], bytes)
                   for i in items):
            raise ProtocolError(peer=peer, reason="sync_query: items must be [list|stat|hash, path]")
        if not 4096 <= kwargs["block_size"] <= 16 * 2**20:
            raise ProtocolError(peer=peer, reason="sync_query: block_size out of range")
        kwargs["items"] = tuple((k, p) for k, p in items)
    elif cls is SyncAnswer:
        kwargs["results"] = tuple(kwargs["results"])
        skipped = kwargs.get("skipped", [])
        if not all(isinstance(p, bytes) for p in skipped):
            raise ProtocolError(peer=peer, reason="sync_answer: skipped paths must be binary")
        kwargs["skipped"] = tuple(skipped)
    elif cls in (SyncBegin, SyncCheckpoint, SyncEnd):
        if len(kwargs["sync_id"]) != 16:
            raise ProtocolError(peer=peer, reason=f"{tag}: sync_id must be 16 bytes")
    return cls(**kwargs)


class FrameDecoder:
    """Incremental frame decoder: feed bytes, take whole messages out.

    Args:
        peer: a name for error messages.
        max_frame_bytes: the largest frame accepted.
    """

    def __init__(self, peer: str = "peer", max_frame_bytes: int = MAX_FRAME_BYTES,
                 compress: str | None = None) -> None:
        self._buf = bytearray()
        self._peer = peer
        self._max = max_frame_bytes
        self.compress = compress  # the compression agreed in the handshake (zops frames), or None

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> Message | None:
        """The next whole message, or None if more bytes are needed. Raises ProtocolError."""
        if len(self._buf) < _LEN.size:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > self._max:
            raise ProtocolError(peer=self._peer, reason=f"frame length {length} exceeds the limit of {self._max}")
        if len(self._buf) < _LEN.size + length:
            return None
        payload = bytes(self._buf[_LEN.size : _LEN.size + length])
        del self._buf[: _LEN.size + length]
        return decode_payload(payload, self._peer, compress=self.compress)


# -- authentication ------------------------------------------------------------


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _proof(secret: bytes, role: bytes, own_nonce: bytes, other_nonce: bytes, vault_id: bytes) -> bytes:
    return hmac.new(secret, b"octofs-v1|" + role + b"|" + own_nonce + other_nonce + vault_id, hashlib.sha256).digest()


def target_proof(secret: bytes, primary_nonce: bytes, target_nonce: bytes, vault_id: bytes) -> bytes:
    """What the target sends in Challenge: bound to the primary's fresh nonce."""
    return _proof(secret, b"target", target_nonce, primary_nonce, vault_id)


def primary_proof(secret: bytes, primary_nonce: bytes, target_nonce: bytes, vault_id: bytes) -> bytes:
    """What the primary sends in Auth: bound to the target's fresh nonce."""
    return _proof(secret, b"primary", primary_nonce, target_nonce, vault_id)


def proofs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def choose_version(offered: tuple[int, ...]) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None
