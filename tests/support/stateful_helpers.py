"""Helpers for the stateful mount test: an incrementally replayed replica, emptying a tree through a mount.

The mount in ``tests/stateful/test_mount_stateful.py`` is reused across Hypothesis
examples, so the journal keeps growing. ``IncrementalReplica`` keeps a replica dir
in step with it by applying only the records it has not applied yet, and can be
reset (emptied, root copied, journal skipped to its end) after an example that
failed left it diverged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from octofs.apply import apply_op
from octofs.journal import JournalReader, list_segments
from octofs.ops import Record, WriteOp

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_AT_FDCWD = -100


def renameat2(src: bytes, dst: bytes, flags: int, *, dir_fd: int | None = None) -> None:
    """renameat2(2) with ``flags`` (RENAME_NOREPLACE, RENAME_EXCHANGE), both paths relative to ``dir_fd``."""
    fd = _AT_FDCWD if dir_fd is None else dir_fd
    if _libc.renameat2(fd, src, fd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def _fs_ids() -> tuple[int, int]:
    """This thread's filesystem uid and gid (the 4th field of Uid:/Gid: in /proc/thread-self/status)."""
    ids = {}
    with open("/proc/thread-self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Uid", "Gid"):
                ids[key] = int(rest.split()[3])
    return ids["Uid"], ids["Gid"]


@contextlib.contextmanager
def fs_identity(uid: int, gid: int) -> Iterator[None]:
    """Make this thread's file system calls as ``uid``/``gid`` (setfsuid/setfsgid), then return to root.

    Only the calling thread changes (unlike seteuid, which glibc applies to every thread), and
    a non-zero fsuid drops the file capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, ...),
    so the kernel checks permissions and kills set-ID bits as for that user. FUSE requests carry
    the fsuid. Path walks check every directory from ``/`` as that user: use ``dir_fd=`` calls
    relative to a directory opened beforehand when the path crosses root-only directories.
    Supplementary groups stay root's.
    """
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        assert _fs_ids() == (uid, gid), f"setfsuid/setfsgid({uid}, {gid}) did not take: {_fs_ids()}"
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)
        assert _fs_ids() == (old_uid, old_gid), "could not return to the previous fsuid/fsgid"


def show_record(rec: Record) -> str:
    """One line per record, with write data shortened."""
    op = rec.op
    if isinstance(op, WriteOp) and len(op.data) > 24:
        text = (f"WriteOp(path={op.path!r}, offset={op.offset}, data=<{len(op.data)} bytes "
                f"{op.data[:12]!r}...>, mtime_ns={op.mtime_ns})")
    else:
        text = repr(op)
    return f"{rec.seq:6d} {text}"


class IncrementalReplica:
    """A replica dir kept in step with a journal that other examples also append to.

    Args:
        journal_dir: the vault's ``journal/`` directory.
        replica: an existing, empty directory.
    """

    def __init__(self, journal_dir: Path, replica: Path) -> None:
        self.journal_dir = journal_dir
        self.path = replica
        self.root_fd = os.open(replica, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._reader = JournalReader(journal_dir)
        self.next_seq = 1

    def close(self) -> None:
        os.close(self.root_fd)

    def catch_up(self) -> list[Record]:
        """Apply every record not applied yet; return them."""
        applied = []
        for rec in self._reader.records(start_seq=self.next_seq):
            try:
                apply_op(self.root_fd, rec.op)
            except Exception as exc:
                raise AssertionError(f"replaying seq {rec.seq} failed: {exc!r}\n{show_record(rec)}") from exc
            self.next_seq = rec.seq + 1
            applied.append(rec)
        return applied

    def records_since(self, seq: int) -> list[Record]:
        """The journal's records from ``seq`` on (read again; nothing is applied)."""
        return list(JournalReader(self.journal_dir).records(start_seq=seq))

    def skip_to_end(self) -> None:
        segs = list_segments(self.journal_dir)
        if segs and self.next_seq < segs[0].first_seq:  # dropped since (the target acked them)
            self.next_seq = segs[0].first_seq
        for rec in self._reader.records(start_seq=self.next_seq):
            self.next_seq = rec.seq + 1

    def reset_like(self, root: Path) -> None:
        """Empty the replica, give its root ``root``'s mode, owner and xattrs, and skip the journal to its end.

        Only for recovering from an example that already failed: ``root`` must be an empty tree.
        """
        for name in os.listdir(self.path):
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        st = os.lstat(root)
        os.chown(self.path, st.st_uid, st.st_gid)
        os.chmod(self.path, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(self.path):
            os.removexattr(self.path, name)
        for name in os.listxattr(root):
            os.setxattr(self.path, name, os.getxattr(root, name))
        self.skip_to_end()


def empty_tree(root: Path, *, root_mode: int = 0o755) -> None:
    """Remove everything below ``root`` (never following symlinks) and reset root's mode, owner and xattrs.

    Used on the mount point, so every removal goes through the mount and is journaled.
    """
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b, topdown=False, followlinks=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):  # os.walk lists a symlink to a directory among dirnames
                os.unlink(p)
            else:
                os.rmdir(p)
    st = os.lstat(root_b)
    if (st.st_uid, st.st_gid) != (0, 0):
        os.chown(root_b, 0, 0)
    if stat.S_IMODE(st.st_mode) != root_mode:
        os.chmod(root_b, root_mode)
    for name in os.listxattr(root_b):
        os.removexattr(root_b, name)
    leftover = os.listdir(root_b)
    assert not leftover, f"could not empty {root}: {leftover}"
