"""ops.py: owns the op types, the captured changes that the journal stores and targets replay.

Invariants:
- An op is a frozen dataclass with only plain values (ints, bytes, bools, None).
- Every path is vault-relative ``bytes``: no leading ``/``, no empty, ``.`` or ``..``
  component, no NUL byte. The vault root itself is ``b""`` and is accepted only
  where ``ROOT_OK`` says so (you cannot create, remove or rename the root).
- An op carries the *result* of the change on the primary, not the request: a
  create carries the final mode and owner, a write carries the file's mtime after
  the write. Replaying it therefore reproduces the primary's state exactly and
  does not depend on the target's clock or umask.

``validate(op)`` enforces the path rules; apply.py calls it before touching disk,
codec.py calls it after decoding, so a peer can never smuggle a bad path through.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NewType, Union

from octofs.errors import OpError

Seq = NewType("Seq", int)
Epoch = NewType("Epoch", int)

# renameat2(2) flags, identical to the kernel's and to pyfuse3.RENAME_*.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


@dataclass(frozen=True, slots=True)
class CreateOp:
    """A new, empty regular file."""

    path: bytes
    mode: int  # permission bits only (0o7777)
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class MkdirOp:
    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class MknodOp:
    """A FIFO, socket or device node; ``mode`` includes the file type bits."""

    path: bytes
    mode: int
    rdev: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class SymlinkOp:
    path: bytes
    target: bytes  # stored verbatim; never resolved by octofs
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class LinkOp:
    """A new hard link ``path`` to the existing file ``src``."""

    src: bytes
    path: bytes


@dataclass(frozen=True, slots=True)
class UnlinkOp:
    path: bytes


@dataclass(frozen=True, slots=True)
class RmdirOp:
    path: bytes


@dataclass(frozen=True, slots=True)
class RenameOp:
    src: bytes
    path: bytes  # destination
    flags: int = 0  # 0, RENAME_NOREPLACE or RENAME_EXCHANGE


@dataclass(frozen=True, slots=True)
class WriteOp:
    path: bytes
    offset: int
    data: bytes
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class TruncateOp:
    path: bytes
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class SetattrOp:
    """chmod / chown / utimens. ``None`` means "leave unchanged"."""

    path: bytes
    mode: int | None = None  # permission bits only
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class SetxattrOp:
    path: bytes
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class RemovexattrOp:
    path: bytes
    name: bytes


@dataclass(frozen=True, slots=True)
class RemoveTreeOp:
    """Remove ``path`` and everything under it; already absent is fine.

    Never captured from the mount: Synchronize sends it to delete what a target has
    and the primary has not (a repair, docs/FORMAT.md §8). Symlinks are removed,
    never followed.
    """

    path: bytes


@dataclass(frozen=True, slots=True)
class FsyncOp:
    """A barrier: the application made ``path`` durable (fsync, fdatasync, O_SYNC write).

    A target makes everything before it durable before applying anything after it.
    """

    path: bytes
    datasync: bool = False


Op = Union[
    CreateOp,
    MkdirOp,
    MknodOp,
    SymlinkOp,
    LinkOp,
    UnlinkOp,
    RmdirOp,
    RenameOp,
    WriteOp,
    TruncateOp,
    SetattrOp,
    SetxattrOp,
    RemovexattrOp,
    FsyncOp,
    RemoveTreeOp,
]

OP_TYPES: tuple[type, ...] = (
    CreateOp,
    MkdirOp,
    MknodOp,
    SymlinkOp,
    LinkOp,
    UnlinkOp,
    RmdirOp,
    RenameOp,
    WriteOp,
    TruncateOp,
    SetattrOp,
    SetxattrOp,
    RemovexattrOp,
    FsyncOp,
    RemoveTreeOp,
)

# Ops that Synchronize sends to a target but that are never captured from the mount
# (so never in a journal): they repair, they do not record.
REPAIR_ONLY: frozenset[type] = frozenset({RemoveTreeOp})

# Ops whose ``path`` may be the vault root (b"").
ROOT_OK: frozenset[type] = frozenset({SetattrOp, SetxattrOp, RemovexattrOp, FsyncOp})


@dataclass(frozen=True, slots=True)
class Record:
    """One journaled op with its position and the primary's wall-clock time."""

    seq: int
    time_ns: int
    op: Op


def check_path(path: object, *, allow_root: bool = False) -> bytes:
    """Return ``path`` if it is a safe vault-relative path, else raise OpError."""
    if not isinstance(path, bytes):
        raise OpError(reason=f"path must be bytes, got {type(path).__name__}")
    if path == b"":
        if allow_root:
            return path
        raise OpError(reason="empty path (the vault root cannot be the subject of this op)")
    if len(path) > MAX_PATH_BYTES:
        raise OpError(reason=f"path longer than {MAX_PATH_BYTES} bytes")
    if b"\0" in path:
        raise OpError(reason=f"NUL byte in path {path!r}")
    if path.startswith(b"/"):
        raise OpError(reason=f"absolute path {path!r}")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise OpError(reason=f"path {path!r} has an empty, '.' or '..' component")
        if len(part) > MAX_NAME_BYTES:
            raise OpError(reason=f"path {path!r} has a component longer than {MAX_NAME_BYTES} bytes")
    return path


def validate(op: Op) -> Op:
    """Check every path field of ``op`` (and basic field types); return ``op`` or raise OpError."""
    if type(op) not in OP_TYPES:
        raise OpError(reason=f"unknown op type {type(op).__name__}")
    allow_root = type(op) in ROOT_OK
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        if f.name in ("path", "src"):
            check_path(value, allow_root=allow_root and f.name == "path")
        elif f.name in ("target", "data", "value", "name"):
            if not isinstance(value, bytes):
                raise OpError(reason=f"{type(op).__name__}.{f.name} must be bytes")
        elif f.name == "datasync":
            if not isinstance(value, bool):
                raise OpError(reason=f"{type(op).__name__}.{f.name} must be a bool")
        else:
            if value is None and f.default is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise OpError(reason=f"{type(op).__name__}.{f.name} must be an integer")
            if f.name in ("offset", "size", "mode", "rdev") and value < 0:
                raise OpError(reason=f"{type(op).__name__}.{f.name} must not be negative")
    if isinstance(op, (SetxattrOp, RemovexattrOp)) and (not op.name or b"\0" in op.name):
        raise OpError(reason=f"bad xattr name {op.name!r}")
    if isinstance(op, RenameOp) and op.flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
        raise OpError(reason=f"unknown rename flags {op.flags}")
    return op


def op_paths(op: Op) -> tuple[bytes, ...]:
    """Every vault path an op touches (source first)."""
    if isinstance(op, (LinkOp, RenameOp)):
        return (op.src, op.path)
    return (op.path,)
