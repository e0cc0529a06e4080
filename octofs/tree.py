"""tree.py: owns "are these two trees the same?": tree_snapshot, diff_snapshots, assert_trees_equal.

Invariants:
- Content is compared by its bytes (sha256), never by a stat signature: two files
  with the same type, size and mtime but different bytes differ (unlike
  ``filecmp.dircmp``'s shallow default).
- The walk never follows a symlink (lstat, ``O_NOFOLLOW``) and keys are ``bytes``
  relative paths; the root itself is ``b""``.
- Left out on purpose, because a faithful replica cannot or need not reproduce them:
  inode numbers, st_dev, atime, ctime, directory nlink, directory sizes and directory
  mtimes (every create/unlink/rename inside a directory moves its mtime, and ops do
  not carry it). Hard links are compared as groups of paths, not inode numbers.
- Reading every file and directory needs permission: run as root, or keep the trees
  readable by the test's user.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
}

_MAX_DIFF_LINES = 60


class Entry(NamedTuple):
    """What is compared for one path. A tuple, so snapshots compare with ``==``."""

    kind: str
    mode: int  # st_mode & 0o7777
    size: int | None  # None for directories
    sha256: str | None  # regular files only
    target: bytes | None  # symlinks only
    uid: int
    gid: int
    xattrs: tuple[tuple[bytes, bytes], ...]
    links: tuple[bytes, ...] | None  # every path sharing the inode, when nlink > 1
    mtime_ns: int | None  # only when asked for, and never for directories
    rdev: tuple[int, int] | None  # (major, minor) of device nodes


def tree_snapshot(root: Path, *, mtime: bool = False) -> dict[bytes, Entry]:
    """Describe every path under ``root`` (and ``root`` itself, as ``b""``).

    Args:
        root: the directory to walk.
        mtime: also record ``mtime_ns`` of everything but directories.

    Returns:
        relative path (bytes) → Entry.
    """
    root_b = os.fsencode(root)
    raw: dict[bytes, tuple[os.stat_result, bytes | None, str | None]] = {}
    _walk(root_b, b"", raw)

    by_inode: dict[tuple[int, int], list[bytes]] = {}
    for rel, (st, _, _) in raw.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)

    snap: dict[bytes, Entry] = {}
    for rel, (st, target, digest) in raw.items():
        is_dir = stat.S_ISDIR(st.st_mode)
        links = None
        if not is_dir and st.st_nlink > 1:
            links = tuple(sorted(by_inode[(st.st_dev, st.st_ino)]))
        is_dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        snap[rel] = Entry(
            kind=_KINDS.get(stat.S_IFMT(st.st_mode), f"type {stat.S_IFMT(st.st_mode):#o}"),
            mode=stat.S_IMODE(st.st_mode),
            size=None if is_dir else st.st_size,
            sha256=digest,
            target=target,
            uid=st.st_uid,
            gid=st.st_gid,
            xattrs=_xattrs(_join(root_b, rel)),
            links=links,
            mtime_ns=st.st_mtime_ns if mtime and not is_dir else None,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if is_dev else None,
        )
    return snap


def assert_trees_equal(a: Path, b: Path, *, mtime: bool = False) -> None:
    """Assert that the trees under ``a`` and ``b`` are the same (see tree_snapshot).

    Raises:
        AssertionError: with one line per differing path, sorted by path: the path is
            missing in a, missing in b, or which fields differ and how.
    """
    lines = diff_snapshots(tree_snapshot(a, mtime=mtime), tree_snapshot(b, mtime=mtime))
    if lines:
        shown = lines[:_MAX_DIFF_LINES]
        if len(lines) > _MAX_DIFF_LINES:
            shown.append(f"... and {len(lines) - _MAX_DIFF_LINES} more")
        header = f"trees differ ({len(lines)} paths), a={a}, b={b}:"
        raise AssertionError("\n".join([header, *shown]))


def diff_snapshots(a: dict[bytes, Entry], b: dict[bytes, Entry]) -> list[str]:
    """One line per path that differs between two snapshots, sorted by path."""
    lines = []
    for rel in sorted(a.keys() | b.keys()):
        name = _show(rel)
        if rel not in a:
            lines.append(f"{name}: missing in a (b has a {b[rel].kind})")
        elif rel not in b:
            lines.append(f"{name}: missing in b (a has a {a[rel].kind})")
        elif a[rel] != b[rel]:
            fields = [
                f"{field} {_fmt(field, x)} != {_fmt(field, y)}"
                for field, x, y in zip(Entry._fields, a[rel], b[rel], strict=True)
                if x != y
            ]
            lines.append(f"{name}: " + "; ".join(fields))
    return lines


def _walk(root_b: bytes, rel: bytes, out: dict) -> None:
    path = _join(root_b, rel)
    st = os.lstat(path)
    target = digest = None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        digest = _sha256(path)
    out[rel] = (st, target, digest)
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as it:
            names = [entry.name for entry in it]
        for name in names:
            _walk(root_b, name if not rel else rel + b"/" + name, out)


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    # O_NOFOLLOW|O_NONBLOCK: if the file was swapped for a symlink or a FIFO since the
    # lstat, fail (or not block) rather than read something else.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):  # file system without xattrs
            return ()
        raise
    return tuple(
        sorted((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names)
    )


def _join(root_b: bytes, rel: bytes) -> bytes:
    return root_b + b"/" + rel if rel else root_b


def _show(rel: bytes) -> str:
    return "<root>" if not rel else repr(rel)


def _fmt(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return f"{value:#o}"
    if field == "sha256" and isinstance(value, str):
        return value[:12]
    return repr(value)
