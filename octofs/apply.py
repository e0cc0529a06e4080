"""apply.py: owns what an op means on disk: ``apply_op`` turns one op into syscalls on a replica dir.

The replayer and the tests' model both call this module, so there is one definition
of "what an op means" (STYLE §2). It is synchronous and imports no trio.

Invariants:

- **Confinement (DESIGN invariant 5).** Whatever op is applied, nothing outside the
  tree under ``root_fd`` changes. ``ops.validate`` runs first (relative bytes paths,
  no empty/``.``/``..`` component, no NUL). Every path is then resolved relative to
  ``root_fd`` one component at a time with ``O_PATH|O_DIRECTORY|O_NOFOLLOW``, so a
  symlink or a non-directory in an intermediate position fails (ENOTDIR, or ELOOP on
  some kernels) instead of being followed. The final syscall is made relative to the
  parent's fd and never follows a symlink in the last component (``O_NOFOLLOW``,
  ``AT_SYMLINK_NOFOLLOW``, ``follow_symlinks=False``). No path string is ever built
  from the replica's location; the only absolute paths used are ``/proc/self/fd/N``
  handles of an fd that was already resolved this way (see ``_fd_handle``).
- Data is only ever written through regular files: a WriteOp/TruncateOp/FsyncOp that
  names a FIFO, socket or device node is refused with OpError before anything opens
  it, because opening a device node reaches its driver, which may lie outside the tree.
- Every fd opened here is closed before ``apply_op`` returns or raises.
- FsyncOp makes its own file or directory durable. Making *everything* before a
  barrier durable (DESIGN invariant 2) is ``barrier()``, which the replayer calls.
- An op carries the primary's *result*, so it is reproduced exactly, independent of
  this process's umask and clock: created objects get exactly ``mode`` (set after
  any chown, because chown clears set-id bits), their owner (when ``chown``), and
  ``mtime_ns``; atime is left alone (``UTIME_OMIT``).

Threat model: the op stream is hostile (a peer may send anything); the replica dir is
not: it has one writer, the replayer, so nothing changes between two syscalls of one
op. Mount points inside the replica dir are the administrator's business.

Applying an op twice (what a replay after a crash may do):

=============== ===========================================================================
op              harmless twice?
=============== ===========================================================================
WriteOp         yes: same bytes at the same offset, same mtime.
TruncateOp      yes.
SetattrOp       yes.
SetxattrOp      yes (create-or-replace).
RemovexattrOp   yes: a missing attribute (ENODATA) counts as removed, since the op's
                result, "this name is absent", holds.
FsyncOp         yes.
CreateOp        tolerated: if ``path`` is already a regular file it is truncated to 0
                and gets the op's mode, owner and mtime again (see ``_create``).
                Anything else at ``path`` raises FileExistsError.
MkdirOp         tolerated if ``path`` is already a directory (its entries are kept; its
                mode, owner and mtime are set again); otherwise FileExistsError.
MknodOp         tolerated if ``path`` already has the same file type (and rdev).
SymlinkOp       tolerated if ``path`` is already a symlink with the same target.
LinkOp          no: the second raises FileExistsError (harmless to ignore when the
                replayer knows it is replaying).
UnlinkOp        no: the second raises FileNotFoundError. Ignoring it is harmless for
                an immediate repeat, but after later ops it could remove a newer file.
RmdirOp         no: as UnlinkOp.
RenameOp        no: the second raises FileNotFoundError (src is gone), or, if src was
                recreated meanwhile, moves the wrong file. RENAME_EXCHANGE applied twice
                swaps back. Only the replayer's acked position makes renames exactly-once.
=============== ===========================================================================
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import NoReturn

from octofs.errors import OpError
from octofs.ops import (
    CreateOp,
    FsyncOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    Op,
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
    validate,
)

__all__ = ["DATA_OPS", "apply_data", "apply_op", "barrier", "create_open", "open_data", "set_mtime"]

# Opening one intermediate directory: O_PATH needs no read permission and opens nothing
# for I/O; O_DIRECTORY|O_NOFOLLOW make a symlink or a file fail instead of being followed.
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A handle on the final component that is never followed and never opened for I/O.
_LEAF_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Opening a regular file to change its data. O_NONBLOCK and O_NOCTTY are belt and braces
# (the type is checked first): they keep a FIFO or tty from blocking or becoming ours.
_DATA_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

# File types a MknodOp may create. Directories and symlinks have their own ops.
_MKNOD_TYPES = frozenset({stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})

_UTIME_OMIT = (1 << 30) - 2  # <sys/stat.h>: leave this timestamp unchanged
_AT_SYMLINK_NOFOLLOW = 0x100  # <fcntl.h>

_NS_PER_S = 1_000_000_000


class _Timespec(ctypes.Structure):
    # struct timespec with the libc's default time_t, which is C long on the platforms
    # whose plain utimensat/futimens symbols we bind (glibc and musl, 64-bit).
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_TimespecPair = _Timespec * 2
_TIME_T_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1

_libc = ctypes.CDLL(None, use_errno=True)


def _bind(name: str, argtypes: list[type]) -> ctypes._CFuncPtr | None:
    """The libc function ``name`` with its prototype, or None if this libc lacks it."""
    fn = getattr(_libc, name, None)
    if fn is not None:
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return fn


_utimensat = _bind(
    "utimensat", [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
)
_futimens = _bind("futimens", [ctypes.c_int, ctypes.POINTER(_Timespec)])
# renameat2 is in glibc since 2.28 and in musl since 1.2.5.
_renameat2 = _bind(
    "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
)
_syncfs = _bind("syncfs", [ctypes.c_int])


AT_FDCWD = -100


def renameat2(src: bytes, dst: bytes, flags: int, *, src_dir_fd: int = AT_FDCWD, dst_dir_fd: int = AT_FDCWD) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE flags; raises OSError.

    A libc without renameat2 cannot express these flags: ENOSYS, never a plain
    rename that would silently replace.
    """
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this libc", src)
    if _renameat2(src_dir_fd, src, dst_dir_fd, dst, flags) != 0:
        _raise_errno(src, dst)


def _raise_errno(filename: bytes | None = None, filename2: bytes | None = None) -> NoReturn:
    """Raise the OSError (subclass) for the errno a ctypes call left behind."""
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), filename, None, filename2)


# -- public API --------------------------------------------------------------


def apply_op(root_fd: int, op: Op, *, chown: bool | None = None) -> None:
    """Apply one op to the replica dir open as ``root_fd``.

    Args:
        root_fd: a directory fd of the replica dir (``O_RDONLY|O_DIRECTORY`` or
            ``O_PATH|O_DIRECTORY``). It is not closed.
        op: the op, as captured on the primary (its result, not its request).
        chown: reproduce owners (uid/gid) from the op. ``None`` means "only when
            running as root", because only root may give files away.

    Raises:
        OpError: the op is malformed (``ops.validate``), would escape the replica
            dir, or names a file of a kind it cannot apply to (data ops on a FIFO,
            socket or device; a MknodOp for a directory or symlink).
        OSError: the syscall failed (ENOENT, EEXIST, ENOTDIR/ELOOP for a symlink in
            the path, ENOSPC, ...). The replica may be left as the failed syscall left
            it; the replayer decides what that means.
    """
    validate(op)
    handler = _HANDLERS[type(op)]
    if isinstance(op, (RenameOp, LinkOp)):
        handler(root_fd, op, chown)
        return
    try:
        parent_fd, name = open_parent(root_fd, op.path)
    except (FileNotFoundError, NotADirectoryError):
        if isinstance(op, RemoveTreeOp):
            return  # no parent directory: the path is absent, which is the op's result
        raise
    except OSError as exc:
        if isinstance(op, RemoveTreeOp) and exc.errno == errno.ELOOP:
            return  # a symlink where a parent directory would be: the path is absent
        raise
    try:
        handler(parent_fd, name, op, chown)
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)


def barrier(root_fd: int) -> None:
    """Make everything applied so far under ``root_fd`` durable.

    Uses ``syncfs(2)``, which flushes the replica's file system only (and, since
    Linux 5.8, reports writeback errors). Falls back to ``sync(2)`` where the libc
    has no ``syncfs``.

    Args:
        root_fd: a directory fd of the replica dir (``O_PATH`` fds are accepted).

    Raises:
        OSError: syncfs reported an error (e.g. EIO from earlier writeback).
    """
    if _syncfs is None:
        os.sync()
        return
    if _syncfs(root_fd) == 0:
        return
    if ctypes.get_errno() != errno.EBADF:
        _raise_errno()
    # EBADF: root_fd is an O_PATH fd, which syncfs refuses; open the same directory
    # for reading (``.`` relative to it, a name of our own, not from an op).
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        if _syncfs(fd) != 0:
            _raise_errno()
    finally:
        os.close(fd)


# -- resolution ----------------------------------------------------------------


def open_parent(root_fd: int, path: bytes) -> tuple[int, bytes]:
    """Return ``(fd of path's parent directory, last component)``, resolved confined (module docstring).

    The caller closes the fd unless it is ``root_fd``. The vault root (``b""``) is
    ``(root_fd, b".")``.
    """
    if not path:
        return root_fd, b"."
    parts = path.split(b"/")
    for part in parts:
        # ops.validate already refuses these; checking again here keeps the walk safe
        # on its own, should a caller ever reach it without validate.
        if part in (b"", b".", b"..") or b"\0" in part:
            raise OpError(reason=f"path {path!r} escapes the replica dir")
    name = parts.pop()
    fd = root_fd
    try:
        for part in parts:
            old, fd = fd, os.open(part, _WALK_FLAGS, dir_fd=fd)
            if old != root_fd:
                os.close(old)
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd, name


def _fd_handle(fd: int) -> str:
    """A path naming exactly the inode that ``fd`` (an O_PATH fd) holds.

    Following the /proc/self/fd magic link re-resolves no name and does not follow
    the target further if it is a symlink (the kernel jumps straight to the fd's
    path). It is the only way to chmod or set an xattr on an O_PATH fd (fchmod and
    f*xattr refuse O_PATH fds with EBADF) without opening the file for I/O, which
    would need read permission and, for a device node, would reach its driver.
    glibc's fchmodat(AT_SYMLINK_NOFOLLOW) does the same. Needs /proc mounted.
    """
    return f"/proc/self/fd/{fd}"


# -- timestamps ----------------------------------------------------------------


def _timespecs(atime_ns: int | None, mtime_ns: int | None) -> _TimespecPair:
    times = _TimespecPair()
    for ts, ns in zip(times, (atime_ns, mtime_ns), strict=True):
        if ns is None:
            ts.tv_sec, ts.tv_nsec = 0, _UTIME_OMIT
            continue
        sec, nsec = divmod(ns, _NS_PER_S)  # floor: pre-1970 times get 0 <= nsec < 1e9
        if not -_TIME_T_MAX - 1 <= sec <= _TIME_T_MAX:
            # ctypes would silently wrap the value.
            raise OpError(reason=f"timestamp {ns} ns does not fit in time_t")
        ts.tv_sec, ts.tv_nsec = sec, nsec
    return times


def _set_times_at(parent_fd: int, name: bytes, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utimensat(AT_SYMLINK_NOFOLLOW); a None time is left unchanged (UTIME_OMIT)."""
    if atime_ns is None and mtime_ns is None:
        return
    if _utimensat(parent_fd, name, _timespecs(atime_ns, mtime_ns), _AT_SYMLINK_NOFOLLOW) != 0:
        _raise_errno(name)


def _set_mtime_fd(fd: int, mtime_ns: int, name: bytes) -> None:
    if _futimens(fd, _timespecs(None, mtime_ns)) != 0:
        _raise_errno(name)


# The mtimes _timespecs accepts (its seconds fit in time_t), checked without building one.
_MTIME_NS_MIN = (-_TIME_T_MAX - 1) * _NS_PER_S
_MTIME_NS_END = (_TIME_T_MAX + 1) * _NS_PER_S


# -- attributes ------------------------------------------------------------------


def _want_chown(chown: bool | None) -> bool:
    return os.geteuid() == 0 if chown is None else chown


def _check_mode(mode: int, op: Op) -> None:
    if mode > 0o7777:
        raise OpError(reason=f"{type(op).__name__}.mode {mode:#o} has bits beyond 0o7777")


def _chmod_nofollow(parent_fd: int, name: bytes, mode: int) -> None:
    """chmod ``name`` itself; a symlink is skipped (Linux has no lchmod; its mode is fixed)."""
    fd = os.open(name, _LEAF_FLAGS, dir_fd=parent_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return
        os.chmod(_fd_handle(fd), mode)
    finally:
        os.close(fd)


def _set_owner_mode_mtime_at(
    parent_fd: int, name: bytes, uid: int, gid: int, mode: int | None, mtime_ns: int, chown: bool | None
) -> None:
    """The finishing touches of a new node that cannot be opened for I/O (mknod, symlink)."""
    if _want_chown(chown):
        os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
    if mode is not None:  # after chown, which clears set-id bits
        _chmod_nofollow(parent_fd, name, mode)
    _set_times_at(parent_fd, name, None, mtime_ns)


def _set_owner_mode_mtime_fd(fd: int, name: bytes, op: CreateOp | MkdirOp, chown: bool | None) -> None:
    if _want_chown(chown):
        os.fchown(fd, op.uid, op.gid)
    os.fchmod(fd, op.mode)  # after fchown, which clears set-id bits
    _set_mtime_fd(fd, op.mtime_ns, name)


def _open_regular(parent_fd: int, name: bytes, op: Op, extra_flags: int = 0) -> int:
    """Open an existing regular file for writing, refusing every other kind before opening it."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    _require_regular(st.st_mode, name, op, allow_dir=False)
    return os.open(name, _DATA_FLAGS | extra_flags, dir_fd=parent_fd)


def _require_regular(st_mode: int, name: bytes, op: Op, *, allow_dir: bool) -> None:
    if stat.S_ISREG(st_mode) or (allow_dir and stat.S_ISDIR(st_mode)):
        return
    if stat.S_ISDIR(st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), name)
    if stat.S_ISLNK(st_mode):
        # What open(O_NOFOLLOW) reports for a symlink; the link is never followed.
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
    # A primary never journals data ops on FIFOs, sockets or devices (the kernel serves
    # those, FUSE never sees the I/O), so such an op is bogus, and opening a device
    # node would reach outside the tree.
    raise OpError(reason=f"{type(op).__name__} on {name!r}, which is not a regular file")


# -- handlers ----------------------------------------------------------------------


def _create(parent_fd: int, name: bytes, op: CreateOp, chown: bool | None) -> None:
    os.close(_create_fd(parent_fd, name, op, chown))


def _create_fd(parent_fd: int, name: bytes, op: CreateOp, chown: bool | None) -> int:
    """Apply a CreateOp; return the new file's fd, open for writing (the caller closes it)."""
    _check_mode(op.mode, op)
    try:
        # 0o600 until fchmod: never more open than the final mode while half-made.
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent_fd)
    except FileExistsError:
        # A primary journals CreateOp only for a name that did not exist, so an
        # existing regular file here means the op is being replayed. Truncating it in
        # place (rather than unlink + create) reproduces the op's result, an empty
        # file with this mode/owner/mtime, and keeps the inode, so hard links made by
        # later ops that will be replayed too stay grouped. Anything else (a
        # directory, a symlink, which O_NOFOLLOW never follows) is a real conflict.
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise
        fd = os.open(name, _DATA_FLAGS | os.O_TRUNC, dir_fd=parent_fd)
    try:
        _set_owner_mode_mtime_fd(fd, name, op, chown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mkdir(parent_fd: int, name: bytes, op: MkdirOp, chown: bool | None) -> None:
    _check_mode(op.mode, op)
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        _set_owner_mode_mtime_fd(fd, name, op, chown)
    finally:
        os.close(fd)


def _mknod(parent_fd: int, name: bytes, op: MknodOp, chown: bool | None) -> None:
    kind = stat.S_IFMT(op.mode)
    if kind not in _MKNOD_TYPES or op.mode & ~(stat.S_IFMT(op.mode) | 0o7777):
        raise OpError(reason=f"MknodOp.mode {op.mode:#o} is not a file, FIFO, socket or device")
    is_dev = kind in (stat.S_IFCHR, stat.S_IFBLK)
    try:
        os.mknod(name, kind | 0o600, op.rdev if is_dev else 0, dir_fd=parent_fd)
    except FileExistsError:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_IFMT(st.st_mode) != kind or (is_dev and st.st_rdev != op.rdev):
            raise
    _set_owner_mode_mtime_at(parent_fd, name, op.uid, op.gid, stat.S_IMODE(op.mode), op.mtime_ns, chown)


def _symlink(parent_fd: int, name: bytes, op: SymlinkOp, chown: bool | None) -> None:
    if b"\0" in op.target:
        raise OpError(reason=f"NUL byte in symlink target {op.target!r}")
    try:
        os.symlink(op.target, name, dir_fd=parent_fd)
    except FileExistsError:
        try:
            same = os.readlink(name, dir_fd=parent_fd) == op.target
        except OSError:  # EINVAL: not a symlink
            same = False
        if not same:
            raise
    # No mode: symlink permissions are always 0o777 on Linux.
    _set_owner_mode_mtime_at(parent_fd, name, op.uid, op.gid, None, op.mtime_ns, chown)


def _unlink(parent_fd: int, name: bytes, op: UnlinkOp, chown: bool | None) -> None:
    os.unlink(name, dir_fd=parent_fd)


def _rmdir(parent_fd: int, name: bytes, op: RmdirOp, chown: bool | None) -> None:
    os.rmdir(name, dir_fd=parent_fd)


def _write(parent_fd: int, name: bytes, op: WriteOp, chown: bool | None) -> None:
    fd = _open_regular(parent_fd, name, op)
    try:
        _pwrite_all(fd, op, name)
        _set_mtime_fd(fd, op.mtime_ns, name)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, op: WriteOp, name: bytes) -> None:
    view = memoryview(op.data)
    offset = op.offset
    while view:  # pwrite may write less than asked (signals, quotas)
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # cannot happen for a regular file; never loop forever
            raise OSError(errno.EIO, "pwrite wrote nothing", name)
        view = view[n:]
        offset += n


def _truncate(parent_fd: int, name: bytes, op: TruncateOp, chown: bool | None) -> None:
    fd = _open_regular(parent_fd, name, op)
    try:
        os.ftruncate(fd, op.size)
        _set_mtime_fd(fd, op.mtime_ns, name)
    finally:
        os.close(fd)


# -- data ops through an fd the caller keeps open (replica.py: a run of data ops on one file) --------

DATA_OPS = (WriteOp, TruncateOp)


def open_data(root_fd: int, op: WriteOp | TruncateOp) -> int:
    """Open ``op.path`` for a data op exactly as ``apply_op`` does; the caller closes the fd.

    The same steps as ``_write``/``_truncate``: ``validate``, the confined walk (``open_parent``),
    a regular file only (``_open_regular``: stat without following, then ``_DATA_FLAGS``, which
    include ``O_NOFOLLOW``). Nothing is written. Raises what ``apply_op`` raises for the same op.
    """
    validate(op)
    parent_fd, name = open_parent(root_fd, op.path)
    try:
        return _open_regular(parent_fd, name, op)
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)


def create_open(root_fd: int, op: CreateOp, *, chown: bool | None = None) -> int:
    """Apply a CreateOp exactly as ``apply_op`` does, but return the new file's fd instead of closing it.

    The fd is open for writing (``O_WRONLY``, opened with ``O_NOFOLLOW`` on the file this op just
    created or, replayed, truncated: a regular file), so it may serve as ``open_data``'s fd for
    data ops on ``op.path`` that follow. The caller closes it. Raises what ``apply_op`` raises.
    """
    validate(op)
    parent_fd, name = open_parent(root_fd, op.path)
    try:
        return _create_fd(parent_fd, name, op, chown)
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)


def apply_data(fd: int, op: WriteOp | TruncateOp) -> None:
    """Apply a data op's bytes or size to ``fd`` (from ``open_data`` for ``op.path``), mtime left alone.

    The caller sets the mtime (``set_mtime``) before anything else can see the file. The op is
    checked as ``validate`` would (its path was, by ``open_data``), including an mtime that
    ``set_mtime`` could not express, so a bad op fails here, where ``apply_op`` would fail it.
    """
    if type(op) is WriteOp:
        ok = type(op.offset) is int and op.offset >= 0 and type(op.data) is bytes
    else:
        ok = type(op) is TruncateOp and type(op.size) is int and op.size >= 0
    if not (ok and type(op.mtime_ns) is int):
        validate(op)  # raises, or accepts what the quick check does not know (an int subclass)
    if not _MTIME_NS_MIN <= op.mtime_ns < _MTIME_NS_END:
        raise OpError(reason=f"timestamp {op.mtime_ns} ns does not fit in time_t")
    if type(op) is WriteOp:
        _pwrite_all(fd, op, op.path)
    else:
        os.ftruncate(fd, op.size)


def set_mtime(fd: int, mtime_ns: int, path: bytes) -> None:
    """Set the mtime of the file open as ``fd`` (atime unchanged); ``path`` names it in errors."""
    _set_mtime_fd(fd, mtime_ns, path)


def _setattr(parent_fd: int, name: bytes, op: SetattrOp, chown: bool | None) -> None:
    if (op.uid is not None or op.gid is not None) and _want_chown(chown):
        uid = -1 if op.uid is None else op.uid
        gid = -1 if op.gid is None else op.gid
        os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
    if op.mode is not None:  # after chown, which clears set-id bits
        _check_mode(op.mode, op)
        _chmod_nofollow(parent_fd, name, op.mode)
    _set_times_at(parent_fd, name, op.atime_ns, op.mtime_ns)


def _setxattr(parent_fd: int, name: bytes, op: SetxattrOp, chown: bool | None) -> None:
    fd = os.open(name, _LEAF_FLAGS, dir_fd=parent_fd)
    try:
        os.setxattr(_fd_handle(fd), op.name, op.value)
    finally:
        os.close(fd)


def _removexattr(parent_fd: int, name: bytes, op: RemovexattrOp, chown: bool | None) -> None:
    fd = os.open(name, _LEAF_FLAGS, dir_fd=parent_fd)
    try:
        os.removexattr(_fd_handle(fd), op.name)
    except OSError as exc:
        # ENODATA: the attribute is already absent, which is this op's result (so a
        # replayed RemovexattrOp is harmless).
        if exc.errno != errno.ENODATA:
            raise
    finally:
        os.close(fd)


def _fsync(parent_fd: int, name: bytes, op: FsyncOp, chown: bool | None) -> None:
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    _require_regular(st.st_mode, name, op, allow_dir=True)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if stat.S_ISDIR(st.st_mode):
        flags |= os.O_DIRECTORY
    fd = os.open(name, flags, dir_fd=parent_fd)
    try:
        if op.datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def _rename(root_fd: int, op: RenameOp, chown: bool | None) -> None:
    src_fd, src_name = open_parent(root_fd, op.src)
    try:
        dst_fd, dst_name = open_parent(root_fd, op.path)
        try:
            if op.flags == 0:
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            else:
                try:
                    renameat2(src_name, dst_name, op.flags, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                except OSError as exc:  # name the vault paths, not the last components
                    raise type(exc)(exc.errno, exc.strerror, op.src, None, op.path) from None
        finally:
            if dst_fd != root_fd:
                os.close(dst_fd)
    finally:
        if src_fd != root_fd:
            os.close(src_fd)


def _link(root_fd: int, op: LinkOp, chown: bool | None) -> None:
    src_fd, src_name = open_parent(root_fd, op.src)
    try:
        dst_fd, dst_name = open_parent(root_fd, op.path)
        try:
            # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW links a symlink
            # itself, as link(2) on the primary did.
            os.link(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        finally:
            if dst_fd != root_fd:
                os.close(dst_fd)
    finally:
        if src_fd != root_fd:
            os.close(src_fd)


def _remove_tree(parent_fd: int, name: bytes, op: RemoveTreeOp, chown: bool | None) -> None:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # already absent: the op's result holds
    if stat.S_ISDIR(st.st_mode):
        _empty_dir(parent_fd, name)
        os.rmdir(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)


def _empty_dir(parent_fd: int, name: bytes) -> None:
    """Remove everything inside the directory ``name`` (never following a symlink)."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        for child in os.listdir(fd):
            child_b = os.fsencode(child)
            st = os.stat(child_b, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _empty_dir(fd, child_b)
                os.rmdir(child_b, dir_fd=fd)
            else:
                os.unlink(child_b, dir_fd=fd)
    finally:
        os.close(fd)


_HANDLERS = {
    CreateOp: _create,
    MkdirOp: _mkdir,
    MknodOp: _mknod,
    SymlinkOp: _symlink,
    LinkOp: _link,
    UnlinkOp: _unlink,
    RmdirOp: _rmdir,
    RenameOp: _rename,
    WriteOp: _write,
    TruncateOp: _truncate,
    SetattrOp: _setattr,
    SetxattrOp: _setxattr,
    RemovexattrOp: _removexattr,
    FsyncOp: _fsync,
    RemoveTreeOp: _remove_tree,
}
