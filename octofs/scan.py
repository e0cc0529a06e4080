"""scan.py: owns what Synchronize compares: one path's metadata, a directory's listing, a file's block hashes.

Both sides use it: the target on its replica dir, the primary on its backing dir,
so that "what is compared" has one definition (STYLE §2). It is synchronous and
imports no trio.

Invariants:
- **Confinement (DESIGN invariant 5).** Paths come from the wire on the target. Every
  look-up walks from ``root_fd`` one component at a time with ``O_NOFOLLOW`` (via
  ``apply``'s resolution rules: ``ops.check_path`` first), never follows a symlink,
  and never opens anything but directories and regular files for reading
  (``O_NONBLOCK``, so a FIFO swapped in cannot block; device nodes are never opened).
- A path that is absent, or not of the expected kind, is reported as ``None``,
  never as an error: differences are the normal case here.
- Hashes are BLAKE2b with a 16-byte digest per ``block_size`` block; the last block
  may be short. Equal hashes are taken as equal content (a 128-bit collision between
  two versions of one block is not a practical concern; this is not an adversarial
  setting: both sides are authenticated).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

from octofs.apply import open_parent
from octofs.ops import check_path

T = TypeVar("T")

BLOCK_SIZE = 64 * 1024
DIGEST_BYTES = 16
MAX_BLOCK_SIZE = 16 * 2**20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class EntryInfo(NamedTuple):
    """What Synchronize knows of one directory entry (docs/FORMAT.md §7, sync frames)."""

    name: bytes
    fmt: int  # stat.S_IFMT bits
    mode: int  # permission bits (0o7777)
    uid: int
    gid: int
    size: int  # regular files; 0 otherwise
    mtime_ns: int  # regular files and symlinks; 0 for the rest (directory mtimes are not compared)
    nlink: int
    ino: int
    rdev: int  # device nodes; 0 otherwise
    link: bytes | None  # symlink target
    xattrs: tuple[tuple[bytes, bytes], ...]  # sorted (name, value)


# -- resolution ------------------------------------------------------------------------


@contextlib.contextmanager
def _located(root_fd: int, path: bytes) -> Iterator[tuple[int, bytes] | None]:
    """``(parent fd, last component)`` of ``path`` resolved confined (apply.open_parent), or None when a
    parent is missing or not a directory. The parent fd is closed on exit."""
    check_path(path, allow_root=True)
    try:
        fd, name = open_parent(root_fd, path)
    except OSError as exc:
        if exc.errno in _MISSING:
            yield None
            return
        raise
    try:
        yield fd, name
    finally:
        if fd != root_fd:
            os.close(fd)


def _absent_is_none(fn: Callable[[], T]) -> T | None:
    """``fn()``, or None if it failed because the path is not there (any more)."""
    try:
        return fn()
    except OSError as exc:
        if exc.errno in _MISSING:
            return None
        raise


def _info(dir_fd: int, name: bytes, st: os.stat_result) -> EntryInfo:
    fmt = stat.S_IFMT(st.st_mode)
    link = os.readlink(name, dir_fd=dir_fd) if fmt == stat.S_IFLNK else None
    if isinstance(link, str):  # cannot happen for a bytes name; keep the type honest
        link = os.fsencode(link)
    return EntryInfo(
        name=name if name != b"." else b"",
        fmt=fmt,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if fmt == stat.S_IFREG else 0,
        mtime_ns=st.st_mtime_ns if fmt in (stat.S_IFREG, stat.S_IFLNK) else 0,
        nlink=st.st_nlink,
        ino=st.st_ino,
        rdev=st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0,
        link=link,
        xattrs=_xattrs(dir_fd, name),
    )


def _xattrs(dir_fd: int, name: bytes) -> tuple[tuple[bytes, bytes], ...]:
    # An O_PATH fd and its /proc/self/fd handle: the inode itself, even a symlink's,
    # without opening it for I/O (see apply._fd_handle).
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        handle = f"/proc/self/fd/{fd}"
        try:
            names = os.listxattr(handle)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return ()
            raise
        out = []
        for n in names:
            try:
                out.append((os.fsencode(n), os.getxattr(handle, n)))
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # removed meanwhile
                    raise
        return tuple(sorted(out))
    finally:
        os.close(fd)


# -- what each side reports ---------------------------------------------------------------


def stat_path(root_fd: int, path: bytes) -> EntryInfo | None:
    """The entry at ``path`` (``b""`` is the vault root), or None if it is absent."""
    with _located(root_fd, path) as loc:
        if loc is None:
            return None
        fd, name = loc
        st = _absent_is_none(lambda: os.stat(name, dir_fd=fd, follow_symlinks=False))
        return None if st is None else _absent_is_none(lambda: _info(fd, name, st))


def lstat(root_fd: int, path: bytes) -> os.stat_result | None:
    """``lstat`` of ``path`` (``b""`` is the root), resolved confined; None if absent."""
    with _located(root_fd, path) as loc:
        if loc is None:
            return None
        fd, name = loc
        return _absent_is_none(lambda: os.stat(name, dir_fd=fd, follow_symlinks=False))


def readlink(root_fd: int, path: bytes) -> bytes | None:
    """The target of the symlink ``path``, or None if it is not one."""
    with _located(root_fd, path) as loc:
        if loc is None:
            return None
        fd, name = loc
        try:
            return os.fsencode(os.readlink(name, dir_fd=fd))
        except OSError as exc:
            if exc.errno in (*_MISSING, errno.EINVAL):
                return None
            raise


def list_dir(root_fd: int, path: bytes) -> list[EntryInfo] | None:
    """Every entry of the directory ``path``, sorted by name; None if it is not a directory."""
    with _located(root_fd, path) as loc:
        if loc is None:
            return None
        pfd, name = loc
        dfd = _absent_is_none(lambda: os.open(name, _DIR_FLAGS, dir_fd=pfd))
    if dfd is None:
        return None
    try:
        out = []
        for child in sorted(os.fsencode(n) for n in os.listdir(dfd)):
            st = _absent_is_none(lambda c=child: os.stat(c, dir_fd=dfd, follow_symlinks=False))
            info = None if st is None else _absent_is_none(lambda c=child, st=st: _info(dfd, c, st))
            if info is not None:  # else removed meanwhile: not listed
                out.append(info)
        return out
    finally:
        os.close(dfd)


def file_hashes(root_fd: int, path: bytes, block_size: int = BLOCK_SIZE) -> tuple[int, int, bytes] | None:
    """``(size, inode, digests)`` of the regular file ``path``; None if it is not one.

    ``digests`` is the concatenation of one ``DIGEST_BYTES`` digest per block: block ``i`` is bytes
    ``i * block_size`` up to the next multiple, or to the end of the file as read. A file that grows
    while it is read (an application appending) keeps its blocks aligned: a short read is topped up
    from the same block before the next one starts, and ``size`` is where reading ended.
    """
    fd = open_regular(root_fd, path)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        out = bytearray()
        offset = 0
        while True:
            data = os.pread(fd, block_size, offset)
            if not data:
                break
            while len(data) < block_size:  # the end of the file, or it grew since: fill the block
                more = os.pread(fd, block_size - len(data), offset + len(data))
                if not more:
                    break
                data += more
            out += hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()
            offset += len(data)
            if len(data) < block_size:
                break
        return offset, st.st_ino, bytes(out)
    finally:
        os.close(fd)


def open_regular(root_fd: int, path: bytes) -> int | None:
    """An fd of the regular file ``path`` open for reading, or None (absent or not a regular file)."""
    with _located(root_fd, path) as loc:
        if loc is None:
            return None
        pfd, name = loc
        st = _absent_is_none(lambda: os.stat(name, dir_fd=pfd, follow_symlinks=False))
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        fd = _absent_is_none(lambda: os.open(name, _READ_FLAGS, dir_fd=pfd))
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
            os.close(fd)
            return None
        return fd


# -- comparing ------------------------------------------------------------------------------


def differences(primary: EntryInfo, target: EntryInfo, *, owners: bool) -> list[str]:
    """The fields in which ``target`` differs from ``primary`` (content aside).

    ``"type"`` means the target's entry must be replaced as a whole (other type,
    other symlink target, other device number); the rest can be fixed in place.
    Owners are compared only when the target reproduces them (it runs as root).
    """
    if primary.fmt != target.fmt or primary.link != target.link or primary.rdev != target.rdev:
        return ["type"]
    out = []
    if primary.fmt != stat.S_IFLNK and primary.mode != target.mode:
        out.append("mode")
    if owners and (primary.uid, primary.gid) != (target.uid, target.gid):
        out.append("owner")
    if primary.size != target.size:
        out.append("size")
    if primary.mtime_ns != target.mtime_ns:
        out.append("mtime")
    if primary.xattrs != target.xattrs:
        out.append("xattrs")
    return out


def kind_name(fmt: int) -> str:
    return {
        stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "socket", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk",
    }.get(fmt, f"type {fmt:#o}")


# -- wire form -------------------------------------------------------------------------------


def entry_to_wire(e: EntryInfo) -> list:
    return [e.name, e.fmt, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.nlink, e.ino, e.rdev, e.link,
            [list(x) for x in e.xattrs]]


def entry_from_wire(v: object) -> EntryInfo:
    """Decode and check one entry; raises ValueError on anything malformed."""
    if not isinstance(v, list) or len(v) != 12:
        raise ValueError("an entry must be a list of 12 fields")
    name, fmt, mode, uid, gid, size, mtime, nlink, ino, rdev, link, xattrs = v
    if not isinstance(name, bytes) or (name and (b"/" in name or b"\0" in name or name in (b".", b".."))):
        raise ValueError(f"bad entry name {name!r}")
    ints = (fmt, mode, uid, gid, size, mtime, nlink, ino, rdev)
    if not all(type(i) is int for i in ints) or min(fmt, mode, size, nlink, ino, rdev) < 0:
        raise ValueError("entry fields must be integers (sizes non-negative)")
    if link is not None and not isinstance(link, bytes):
        raise ValueError("symlink target must be binary")
    if not isinstance(xattrs, list) or not all(
        isinstance(x, list) and len(x) == 2 and isinstance(x[0], bytes) and isinstance(x[1], bytes) for x in xattrs
    ):
        raise ValueError("xattrs must be a list of [name, value] binaries")
    return EntryInfo(name, fmt, mode, uid, gid, size, mtime, nlink, ino, rdev, link,
                     tuple((x[0], x[1]) for x in xattrs))


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


__all__ = [
    "BLOCK_SIZE",
    "DIGEST_BYTES",
    "EntryInfo",
    "differences",
    "entry_from_wire",
    "entry_to_wire",
    "file_hashes",
    "join",
    "kind_name",
    "list_dir",
    "lstat",
    "open_regular",
    "readlink",
    "stat_path",
]
