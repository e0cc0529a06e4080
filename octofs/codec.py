"""codec.py: owns the msgpack encoding of ops and records; the only module that imports msgpack.

Invariants:
- ``decode_record(encode_record(rec)) == rec`` for every valid record.
- ``encode_record`` validates the op first, so it never produces a payload that ``decode_record`` would refuse
  (a journal must not hold a record that cannot be read back).
- ``decode_record`` returns a validated ``Record`` or raises ``OpError``; it never returns garbage, whatever
  bytes it is given.
- The map keys and op type codes are the ones in docs/FORMAT.md §4; changing the meaning of one needs a new
  ``JOURNAL_FORMAT_VERSION``.

msgpack options (one place for all of them, so the journal and the wire protocol agree):

Packing (``packb``):
- ``use_bin_type=True``: ``bytes`` become msgpack *bin* and ``str`` becomes msgpack *str*. Without it msgpack packs
  bytes as the old "raw" type, indistinguishable from text, and paths (bytes, maybe not UTF-8) could come back as
  ``str`` or fail to decode.
- ``datetime=False`` (the default, stated): no timestamp extension types are produced; times are plain int ns.
- no ``default=`` hook: anything that is not None, bool, int, float, str, bytes, list, tuple or dict raises
  ``TypeError`` instead of being silently converted.

Unpacking (``unpackb``):
- ``raw=False``: msgpack *str* is decoded as UTF-8 into ``str`` (map keys are always str) and *bin* stays ``bytes``.
  Invalid UTF-8 raises instead of producing mojibake.
- ``strict_map_key=True``: map keys may only be str or bytes. This refuses e.g. maps keyed by huge ints or nested
  containers, which are never valid here.
- ``max_bin_len=MAX_BIN_BYTES`` (16 MiB, the largest write or xattr value accepted), ``max_str_len=MAX_STR_BYTES``,
  ``max_array_len=MAX_ARRAY_LEN``, ``max_map_len=MAX_MAP_LEN``: a length field that claims more is refused before
  anything is allocated. These bound what a hostile peer can make us allocate per frame (Invariant 7).
- ``max_ext_len=0``: extension types (including msgpack's timestamp) are never valid in octofs data; any ext
  value is refused.
- ``use_list=True`` (the default, stated): arrays decode as lists.
- trailing bytes after the first object are an error (``unpackb`` raises ``ExtraData``): one payload, one object.

Every failure of ``unpackb`` is reported as ``CodecError`` (a ``ValueError``), whatever msgpack raised; callers
wrap it in their own layer's error (``OpError`` here, ``ProtocolError`` in protocol.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import msgpack

from octofs.errors import OpError
from octofs.ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    CreateOp,
    FsyncOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    Op,
    Record,
    RemoveTreeOp,
    RemovexattrOp,
    RenameOp,
    RmdirOp,
    SetattrOp,
    SetxattrOp,
    SymlinkOp,
    TruncateOp,
    UnlinkOp,
    WriteOp,
    check_path,
    validate,
)

log = logging.getLogger(__name__)

# One Packer for every encode (packb builds a new one per call); same options as packb().
_PACKER = msgpack.Packer(use_bin_type=True, datetime=False)
# Paths already found valid by check_path (non-root), so that the hot ops (a write, an
# fsync, a truncate: one per FUSE request) do not split and scan the same path each time.
# Bounded: cleared when full.
_GOOD_PATHS: set[bytes] = set()
_GOOD_PATHS_MAX = 4096

MAX_BIN_BYTES = 16 * 2**20
MAX_STR_BYTES = 64 * 2**10
MAX_ARRAY_LEN = 2**16
MAX_MAP_LEN = 2**10
# Largest encoded record payload: one bin at the limit plus room for keys, a path and the ints.
MAX_PAYLOAD_BYTES = MAX_BIN_BYTES + 64 * 2**10

_U64_MAX = 2**64 - 1


class CodecError(ValueError):
    """Bytes that are not one well-formed msgpack object within octofs's limits."""


def packb(obj: Any) -> bytes:
    """Pack ``obj`` with octofs's msgpack settings (see the module docstring).

    Raises:
        TypeError: ``obj`` holds a value msgpack cannot represent.
        OverflowError: an int outside −2**63 … 2**64−1.
    """
    return msgpack.packb(obj, use_bin_type=True, datetime=False)


def unpackb(data: bytes) -> Any:
    """Unpack exactly one msgpack object with octofs's settings and limits (see the module docstring).

    Raises:
        CodecError: truncated, malformed, over a limit, invalid UTF-8 in a str, a disallowed map key,
            an ext type, or trailing bytes.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_BIN_BYTES,
            max_str_len=MAX_STR_BYTES,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        # msgpack's errors are all ValueError/UnpackException subclasses (FormatError, StackError,
        # ExtraData, OutOfData, UnicodeDecodeError, limit errors). TypeError is deliberately not caught:
        # it would mean we passed something that is not bytes, a bug.
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise CodecError(f"not valid msgpack ({detail})") from exc


# -- op type table (docs/FORMAT.md §4) ----------------------------------------

OP_CODES: dict[type, int] = {
    CreateOp: 1,
    MkdirOp: 2,
    MknodOp: 3,
    SymlinkOp: 4,
    LinkOp: 5,
    UnlinkOp: 6,
    RmdirOp: 7,
    RenameOp: 8,
    WriteOp: 9,
    TruncateOp: 10,
    SetattrOp: 11,
    SetxattrOp: 12,
    RemovexattrOp: 13,
    FsyncOp: 14,
    RemoveTreeOp: 15,
}

OP_NAMES: dict[type, str] = {
    CreateOp: "create",
    MkdirOp: "mkdir",
    MknodOp: "mknod",
    SymlinkOp: "symlink",
    LinkOp: "link",
    UnlinkOp: "unlink",
    RmdirOp: "rmdir",
    RenameOp: "rename",
    WriteOp: "write",
    TruncateOp: "truncate",
    SetattrOp: "setattr",
    SetxattrOp: "setxattr",
    RemovexattrOp: "removexattr",
    FsyncOp: "fsync",
    RemoveTreeOp: "removetree",
}

# Encoders build the whole payload map directly (no dataclasses.asdict: this runs once per FUSE write).
# Key order follows docs/FORMAT.md §4.


def _enc_create(s: int, w: int, op: CreateOp) -> dict:
    return {"s": s, "w": w, "t": 1, "p": op.path, "m": op.mode, "u": op.uid, "g": op.gid, "mt": op.mtime_ns}


def _enc_mkdir(s: int, w: int, op: MkdirOp) -> dict:
    return {"s": s, "w": w, "t": 2, "p": op.path, "m": op.mode, "u": op.uid, "g": op.gid, "mt": op.mtime_ns}


def _enc_mknod(s: int, w: int, op: MknodOp) -> dict:
    return {
        "s": s, "w": w, "t": 3, "p": op.path, "m": op.mode, "u": op.uid, "g": op.gid, "mt": op.mtime_ns,
        "rd": op.rdev,
    }  # fmt: skip


def _enc_symlink(s: int, w: int, op: SymlinkOp) -> dict:
    return {"s": s, "w": w, "t": 4, "p": op.path, "u": op.uid, "g": op.gid, "mt": op.mtime_ns, "l": op.target}


def _enc_link(s: int, w: int, op: LinkOp) -> dict:
    return {"s": s, "w": w, "t": 5, "src": op.src, "p": op.path}


def _enc_unlink(s: int, w: int, op: UnlinkOp) -> dict:
    return {"s": s, "w": w, "t": 6, "p": op.path}


def _enc_rmdir(s: int, w: int, op: RmdirOp) -> dict:
    return {"s": s, "w": w, "t": 7, "p": op.path}


def _enc_rename(s: int, w: int, op: RenameOp) -> dict:
    return {"s": s, "w": w, "t": 8, "src": op.src, "p": op.path, "f": op.flags}


def _enc_write(s: int, w: int, op: WriteOp) -> dict:
    return {"s": s, "w": w, "t": 9, "p": op.path, "o": op.offset, "d": op.data, "mt": op.mtime_ns}


def _enc_truncate(s: int, w: int, op: TruncateOp) -> dict:
    return {"s": s, "w": w, "t": 10, "p": op.path, "sz": op.size, "mt": op.mtime_ns}


def _enc_setattr(s: int, w: int, op: SetattrOp) -> dict:
    d = {"s": s, "w": w, "t": 11, "p": op.path}
    # "Unchanged" (None) is written as an absent key (docs/FORMAT.md §4).
    if op.mode is not None:
        d["m"] = op.mode
    if op.uid is not None:
        d["u"] = op.uid
    if op.gid is not None:
        d["g"] = op.gid
    if op.atime_ns is not None:
        d["at"] = op.atime_ns
    if op.mtime_ns is not None:
        d["mt"] = op.mtime_ns
    return d


def _enc_setxattr(s: int, w: int, op: SetxattrOp) -> dict:
    return {"s": s, "w": w, "t": 12, "p": op.path, "n": op.name, "v": op.value}


def _enc_removexattr(s: int, w: int, op: RemovexattrOp) -> dict:
    return {"s": s, "w": w, "t": 13, "p": op.path, "n": op.name}


def _enc_fsync(s: int, w: int, op: FsyncOp) -> dict:
    return {"s": s, "w": w, "t": 14, "p": op.path, "ds": op.datasync}


def _enc_removetree(s: int, w: int, op: RemoveTreeOp) -> dict:
    return {"s": s, "w": w, "t": 15, "p": op.path}


_ENCODERS: dict[type, Callable[[int, int, Any], dict]] = {
    CreateOp: _enc_create,
    MkdirOp: _enc_mkdir,
    MknodOp: _enc_mknod,
    SymlinkOp: _enc_symlink,
    LinkOp: _enc_link,
    UnlinkOp: _enc_unlink,
    RmdirOp: _enc_rmdir,
    RenameOp: _enc_rename,
    WriteOp: _enc_write,
    TruncateOp: _enc_truncate,
    SetattrOp: _enc_setattr,
    SetxattrOp: _enc_setxattr,
    RemovexattrOp: _enc_removexattr,
    FsyncOp: _enc_fsync,
    RemoveTreeOp: _enc_removetree,
}

# Decoders index the map directly; a missing required key raises KeyError, turned into OpError below.
# Optional keys use .get with the dataclass default. The resulting op is then run through ops.validate,
# which checks every type (bytes vs str, int vs bool/float/None, non-negative sizes, path rules).
_DECODERS: dict[int, Callable[[dict], Op]] = {
    1: lambda m: CreateOp(m["p"], m["m"], m["u"], m["g"], m["mt"]),
    2: lambda m: MkdirOp(m["p"], m["m"], m["u"], m["g"], m["mt"]),
    3: lambda m: MknodOp(m["p"], m["m"], m["rd"], m["u"], m["g"], m["mt"]),
    4: lambda m: SymlinkOp(m["p"], m["l"], m["u"], m["g"], m["mt"]),
    5: lambda m: LinkOp(m["src"], m["p"]),
    6: lambda m: UnlinkOp(m["p"]),
    7: lambda m: RmdirOp(m["p"]),
    8: lambda m: RenameOp(m["src"], m["p"], m.get("f", 0)),
    9: lambda m: WriteOp(m["p"], m["o"], m["d"], m["mt"]),
    10: lambda m: TruncateOp(m["p"], m["sz"], m["mt"]),
    11: lambda m: SetattrOp(m["p"], m.get("m"), m.get("u"), m.get("g"), m.get("at"), m.get("mt")),
    12: lambda m: SetxattrOp(m["p"], m["n"], m["v"]),
    13: lambda m: RemovexattrOp(m["p"], m["n"]),
    14: lambda m: FsyncOp(m["p"], m.get("ds", False)),
    15: lambda m: RemoveTreeOp(m["p"]),
}

def op_code(op: Op) -> int:
    """The op type code of ``op`` (docs/FORMAT.md §4)."""
    return OP_CODES[type(op)]


def op_name(op: Op) -> str:
    """The short lower-case name of ``op``'s type, as used in docs, logs and ``dump-journal``."""
    return OP_NAMES[type(op)]


def _is_int(value: object) -> bool:
    return type(value) is int  # excludes bool, which is an int subclass


def encode_record(rec: Record) -> bytes:
    """Encode ``rec`` as a record payload (a msgpack map, docs/FORMAT.md §4).

    Args:
        rec: the record; its op is validated with ``ops.validate`` first.

    Returns:
        The payload bytes (without the record frame, which journal.py adds).

    Raises:
        OpError: the op is invalid, the seq or time is out of range, or the payload would exceed
            ``MAX_PAYLOAD_BYTES``.
    """
    return encode_payload(rec.seq, rec.time_ns, rec.op)


def encode_payload(seq: int, time_ns: int, op: Op) -> bytes:
    """``encode_record(Record(seq, time_ns, op))``, the same bytes, without building the Record.

    For the journal's append, once per FUSE request: a frozen dataclass costs ≈ 0.9 µs to build.

    Raises:
        The same errors as ``encode_record``.
    """
    encoder = _ENCODERS.get(type(op))
    if encoder is None:
        raise OpError(reason=f"unknown op type {type(op).__name__}")
    if not _valid_hot(op):
        validate(op)
    if type(seq) is not int or not 1 <= seq <= _U64_MAX:  # type() is: excludes bool
        raise OpError(reason=f"seq must be an integer in 1..2**64-1, got {seq!r}")
    if type(time_ns) is not int:
        raise OpError(reason=f"time_ns must be an integer, got {time_ns!r}")
    try:
        payload = _PACKER.pack(encoder(seq, time_ns, op))
    except (OverflowError, TypeError, ValueError) as exc:
        raise OpError(reason=f"cannot encode {type(op).__name__}: {exc}") from exc
    if len(payload) > MAX_BIN_BYTES:
        # Rare, so checked only here: every bytes field must fit the decoder's max_bin_len too.
        _check_bin_lengths(op)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise OpError(reason=f"encoded record is {len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
    return payload


def _good_path(path: object) -> bool:
    """check_path(path) without the root, remembered; False (never raises) if it is not valid."""
    if path in _GOOD_PATHS:
        return True
    try:
        check_path(path)
    except OpError:
        return False
    if len(_GOOD_PATHS) >= _GOOD_PATHS_MAX:
        _GOOD_PATHS.clear()
    _GOOD_PATHS.add(path)
    return True


def _valid_hot(op: Op) -> bool:
    """The checks of ``ops.validate`` for the ops of the per-request path, done quickly.

    True: ``op`` is valid. False: it may not be, and ``validate`` must decide (and say why).
    """
    t = type(op)
    if t is WriteOp:
        return (type(op.path) is bytes and _good_path(op.path) and type(op.offset) is int and op.offset >= 0
                and type(op.data) is bytes and type(op.mtime_ns) is int)
    if t is FsyncOp:
        return type(op.path) is bytes and (op.path == b"" or _good_path(op.path)) and type(op.datasync) is bool
    if t is TruncateOp:
        return (type(op.path) is bytes and _good_path(op.path) and type(op.size) is int and op.size >= 0
                and type(op.mtime_ns) is int)
    check = _COLD_CHECKS.get(t)
    return check is not None and check(op)


# The same for the other ops captured from the mount (a create, an unlink, a rename...: one per
# request too), which ``validate`` checks field by field through ``dataclasses.fields`` in 3–6 µs.


def _path(p: object) -> bool:
    return type(p) is bytes and _good_path(p)


def _path_or_root(p: object) -> bool:
    return type(p) is bytes and (p == b"" or _good_path(p))


def _owned(op: CreateOp | MkdirOp | MknodOp) -> bool:
    return (_path(op.path) and type(op.mode) is int and op.mode >= 0 and type(op.uid) is int
            and type(op.gid) is int and type(op.mtime_ns) is int)


def _mknod_ok(op: MknodOp) -> bool:
    return _owned(op) and type(op.rdev) is int and op.rdev >= 0


def _symlink_ok(op: SymlinkOp) -> bool:
    return (_path(op.path) and type(op.target) is bytes and type(op.uid) is int and type(op.gid) is int
            and type(op.mtime_ns) is int)


def _setattr_ok(op: SetattrOp) -> bool:
    mode = op.mode
    return (_path_or_root(op.path) and (mode is None or (type(mode) is int and mode >= 0))
            and all(v is None or type(v) is int for v in (op.uid, op.gid, op.atime_ns, op.mtime_ns)))


def _xattr_name_ok(name: object) -> bool:
    return type(name) is bytes and name != b"" and b"\0" not in name


_COLD_CHECKS: dict[type, Callable[[Any], bool]] = {
    CreateOp: _owned,
    MkdirOp: _owned,
    MknodOp: _mknod_ok,
    SymlinkOp: _symlink_ok,
    LinkOp: lambda op: _path(op.src) and _path(op.path),
    UnlinkOp: lambda op: _path(op.path),
    RmdirOp: lambda op: _path(op.path),
    RenameOp: lambda op: _path(op.src) and _path(op.path) and type(op.flags) is int
                         and op.flags in (0, RENAME_NOREPLACE, RENAME_EXCHANGE),
    SetattrOp: _setattr_ok,
    SetxattrOp: lambda op: _path_or_root(op.path) and _xattr_name_ok(op.name) and type(op.value) is bytes,
    RemovexattrOp: lambda op: _path_or_root(op.path) and _xattr_name_ok(op.name),
}


def _check_bin_lengths(op: Op) -> None:
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        if isinstance(value, bytes) and len(value) > MAX_BIN_BYTES:
            raise OpError(reason=f"{type(op).__name__}.{f.name} is longer than {MAX_BIN_BYTES} bytes")


def decode_record(payload: bytes) -> Record:
    """Decode and validate a record payload.

    Args:
        payload: exactly one msgpack map as written by ``encode_record``. Unknown keys are ignored.

    Returns:
        The record, with an op that passed ``ops.validate``.

    Raises:
        OpError: anything else: not msgpack, not a map, a missing key, an unknown op type code, a value of the
            wrong type or range, or an op that fails validation.
    """
    try:
        m = unpackb(payload)
    except CodecError as exc:
        raise OpError(reason=f"record payload is {exc}") from exc
    if type(m) is not dict:
        raise OpError(reason=f"record payload is a msgpack {type(m).__name__}, not a map")
    try:
        seq = m["s"]
        time_ns = m["w"]
        code = m["t"]
    except KeyError as exc:
        raise OpError(reason=f"record payload has no {exc.args[0]!r} key") from None
    if not _is_int(seq) or seq < 1:
        raise OpError(reason=f"record seq must be a positive integer, got {seq!r}")
    if not _is_int(time_ns):
        raise OpError(reason=f"record time must be an integer, got {time_ns!r}")
    decoder = _DECODERS.get(code) if _is_int(code) else None
    if decoder is None:
        raise OpError(reason=f"unknown op type code {code!r} in record seq {seq}")
    try:
        op = decoder(m)
    except KeyError as exc:
        raise OpError(reason=f"record seq {seq} (op type {code}) has no {exc.args[0]!r} key") from None
    if not _valid_hot(op):  # the same checks, quickly (a target decodes every op it applies)
        validate(op)
    return Record(seq, time_ns, op)
