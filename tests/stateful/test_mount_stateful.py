"""Random operation sequences through a real mount; the journal replays to the backing dir (issue 2,
done-means 2), and a real target converges to it byte for byte after ``--wait-synced`` (issue 3, done-means 1).

One ``octofs mount`` subprocess, replicating to one ``octofs serve`` on 127.0.0.1, serves every Hypothesis example (blocking file I/O
on the mount is safe: the daemon is another process). The rules make real
syscalls on the mount: writes at random offsets (some large enough to be split into
several FUSE writes, some with O_APPEND or O_SYNC, some through a shared mmap, some
with copy_file_range), truncates up and down, renames over existing names and
renameat2 NOREPLACE/EXCHANGE, hard links, symlinks (some pointing out of the
mount), FIFOs, xattrs and POSIX ACLs, chmod/chown/utime, fsync, and files and
directories kept open across steps: written, truncated, chmodded, fsynced after
their name was unlinked or renamed. Some rules run as another user (setfsuid), so
the kernel's own side effects (set-ID bits killed on write, permission errors)
go through the daemon too. A rule makes the kernel forget every unused dentry and
inode (``vm.drop_caches``), as memory pressure does, so the inode table also meets
FORGETs of directories whose names stay in use below them. A syscall that fails is
part of the behaviour, not a test failure.

Checks:
- after every step (``mount_matches_backing``): the mount and the backing dir show
  the same tree, mtimes of non-directories included (it is a passthrough);
- after every step (``inode_numbers_follow_backing``): the mount shows one ``st_ino``
  per backing file, the same for all its hard links, never one for two files;
- ``sync_and_compare`` (a rule) and ``teardown``: a replica kept in step with the
  journal (only new records are applied, with ``apply_op``) equals the backing dir:
  content, type, mode, size, owner, symlink targets, hard-link groups, xattrs, mtimes.

Teardown closes the example's fds, compares, then empties the tree through the
mount (never behind its back) and compares again, so the next example starts from
an empty tree on both sides.

Paths go through the mount the way an application's would, symlinks included; a
path that would resolve outside the mount (a symlink to ``..``) is skipped, as
that is not a vault change.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from octofs.errors import JournalError
from octofs.ops import RENAME_EXCHANGE, RENAME_NOREPLACE
from tests.support.daemons import MountHandle, mounted, serving, write_vault_yaml
from tests.support.fuse import is_octofs_mounted
from tests.support.stateful_helpers import IncrementalReplica, empty_tree, fs_identity, renameat2, show_record
from tests.support.trees import diff_snapshots, tree_snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

IS_ROOT = os.geteuid() == 0

NAMES = (b"a", b"b", b"c", b"d")
MAX_DEPTH = 3
SEED_FILES = (b"b", b"a/c", b"a/b/c")
MNT_ABS = b"<mnt>"  # replaced by an absolute path into the mount
SYMLINK_TARGETS = (b"a", b"b", b"c", b"a/b", b"b/c", b"../a", b"..", b".", b"nowhere", b"/nonexistent/x", MNT_ABS)
MODES = (0o644, 0o600, 0o755, 0o000, 0o640, 0o4755, 0o2755, 0o1777, 0o7777)
XATTR_NAMES = (b"user.a", b"user.b") + ((b"trusted.t",) if IS_ROOT else ())
# POSIX ACLs are xattrs too; the kernel enforces them (enable_acl), setting an access ACL
# changes the mode, and a default ACL is inherited by what is created below.
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
OWNERS = (None, 0, 1000, 4242)
# Some rules run as another user (setfsuid, this thread only), so that the kernel's own
# side effects reach the daemon too: set-ID bits killed on write/truncate, permission errors.
OTHER = (1000, 1000)
users = st.sampled_from([None, None, None, OTHER]) if IS_ROOT else st.just(None)
times_ns = st.integers(-(2**40), 2**61) | st.integers(0, 2**31) | st.sampled_from([0, -1, 10**18 + 123456789])

fresh_paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=MAX_DEPTH).map(b"/".join)
offsets = st.integers(0, 5000) | st.sampled_from([0, 4095, 4096, 131071, 131072, 300_000])
sizes = st.integers(0, 6000) | st.sampled_from([0, 1, 4096, 200_000])


def _big(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# Mostly small; now and then big enough to be split into several FUSE writes (max_write 128 KiB).
datas = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.builds(_big, st.integers(100_000, 300_000), st.integers(0, 2**32)),
)

OPEN_MODES = {
    "rw": os.O_RDWR,
    "w": os.O_WRONLY,
    "append": os.O_RDWR | os.O_APPEND,
    "trunc": os.O_RDWR | os.O_TRUNC,
    "creat": os.O_RDWR | os.O_CREAT,
    "sync": os.O_RDWR | os.O_SYNC,
    "ro": os.O_RDONLY,
    "dir": os.O_RDONLY | os.O_DIRECTORY,  # an open directory: fsync, fchmod, xattrs after rename/rmdir
}


_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF
perms = st.integers(0, 7)


@st.composite
def acl_values(draw) -> bytes:
    """A valid ACL in the system.posix_acl_* xattr format (version 2), now and then garbage (EINVAL)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=12))
    named_users = draw(st.lists(st.sampled_from([1000, 4242]), unique=True, max_size=2))
    named_groups = draw(st.lists(st.sampled_from([1000, 4242]), unique=True, max_size=1))
    entries = [(_ACL_USER_OBJ, draw(perms), _ACL_NO_ID)]
    entries += [(_ACL_USER, draw(perms), uid) for uid in sorted(named_users)]
    entries.append((_ACL_GROUP_OBJ, draw(perms), _ACL_NO_ID))
    entries += [(_ACL_GROUP, draw(perms), gid) for gid in sorted(named_groups)]
    if named_users or named_groups or draw(st.booleans()):
        entries.append((_ACL_MASK, draw(perms), _ACL_NO_ID))
    entries.append((_ACL_OTHER, draw(perms), _ACL_NO_ID))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


# An xattr (name, value): mostly plain user/trusted ones, sometimes an ACL.
xattr_items = st.one_of(
    st.tuples(st.sampled_from(XATTR_NAMES), st.binary(max_size=40)),
    st.tuples(st.sampled_from(XATTR_NAMES), st.binary(max_size=40)),
    st.tuples(st.sampled_from(ACL_NAMES), acl_values()),
)


def _child(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


@dataclass(eq=False)
class OpenFile:
    """A file descriptor the example keeps open across steps."""

    fd: int
    path: bytes  # the name it was opened by (moved along by rename_open)
    how: str

    def __repr__(self) -> str:  # shown in Hypothesis' step listing
        return f"OpenFile({self.path!r}, {self.how})"


class MountDied(BaseException):
    """The mount daemon exited. A BaseException, so that Hypothesis does not try to shrink
    (every later example would fail at once, and it would report a FlakyStrategyDefinition)."""


class Harness:
    """What outlives one example: the mount, the replica and the fds to close."""

    def __init__(self, handle: MountHandle, replica: Path, target_dir: Path) -> None:
        self.handle = handle
        self.target_dir = target_dir  # the target's copy of the vault (octofs serve on 127.0.0.1)
        self.mnt = handle.mnt
        self.mnt_b = os.fsencode(os.path.realpath(handle.mnt))
        self.backing = handle.backing
        self.replica = IncrementalReplica(handle.journal_dir, replica)
        # The mount root, for *at() calls as OTHER (pytest's temp dirs above the mount are 0700).
        self.root_fd = os.open(handle.mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.open_fds: set[int] = set()
        self.examples = 0

    def check_alive(self) -> None:
        """Stop the run (with the daemon's last log lines) if the mount daemon died: the rules
        would go on changing the bare mount point directory instead."""
        code = self.handle.proc.poll()
        if code is None and is_octofs_mounted(self.mnt):
            return
        lines = self.handle.log_path.read_text(errors="replace").splitlines()
        raise MountDied(f"the mount daemon is gone (exit code {code}) in example {self.examples}; "
                        "its log ends:\n" + "\n".join(lines[-40:]))

    def close_fds(self) -> None:
        while self.open_fds:
            fd = self.open_fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass

    def begin_example(self) -> int:
        """Make sure the example starts from an empty tree on both sides; return the first seq it may write."""
        self.examples += 1
        self.check_alive()
        self.close_fds()
        if os.listdir(self.mnt) or os.listxattr(self.mnt):
            empty_tree(self.mnt)  # a teardown that did not finish
        try:
            self.replica.catch_up()
            ok = not diff_snapshots(tree_snapshot(self.backing, mtime=True),
                                    tree_snapshot(self.replica.path, mtime=True))
        except (AssertionError, JournalError):
            # JournalError: a failed example skipped the last catch-up and the records it
            # left have since been dropped from the journal (acked by the target).
            ok = False
        if not ok:  # an earlier example failed and left the replica diverged
            self.replica.reset_like(self.backing)
        return self.replica.next_seq


class MountMachine(RuleBasedStateMachine):
    # As in test_apply_model: paths that exist or once did, and the regular files and
    # directories among them at creation; seeded so that no bundle starts empty.
    paths = Bundle("paths")
    files = Bundle("files")
    dirs = Bundle("dirs")
    tagged = Bundle("tagged")  # (path, xattr name) that was set
    fds = Bundle("fds")  # OpenFile
    # A new name inside something that exists (or existed), mostly a directory: far
    # likelier to succeed than a random path, so the trees grow past the top level.
    new_paths = st.builds(
        _child, st.one_of(dirs, dirs, paths, st.just(b""), st.just(b"")), st.sampled_from(NAMES)
    ).filter(lambda p: p.count(b"/") < MAX_DEPTH)
    any_new = st.one_of(new_paths, new_paths, new_paths, fresh_paths)

    def __init__(self, h: Harness) -> None:
        super().__init__()
        self.h = h
        self.mnt = h.mnt_b
        self.first_seq = h.begin_example()

    # -- helpers ------------------------------------------------------------------------

    def _p(self, rel: bytes) -> bytes:
        return self.mnt + b"/" + rel if rel else self.mnt

    @staticmethod
    def _as(user: tuple[int, int] | None) -> contextlib.AbstractContextManager:
        return fs_identity(*user) if user else contextlib.nullcontext()

    @property
    def _rfd(self) -> int:
        return self.h.root_fd

    def _inside(self, rel: bytes, *, follow: bool) -> bool:
        """Does ``rel`` on the mount resolve (following the last symlink or not) to something inside it?"""
        full = self._p(rel)
        if follow or not rel:
            real = os.path.realpath(full)
        else:
            head, _, name = full.rpartition(b"/")
            real = os.path.realpath(head) + b"/" + name
        return real == self.mnt or real.startswith(self.mnt + b"/")

    def _open(self, rel: bytes, flags: int, mode: int = 0o644, user: tuple[int, int] | None = None) -> int | None:
        """Open a regular file on the mount (never blocking on a FIFO); None if that fails or it is not regular."""
        try:
            with self._as(user):
                fd = os.open(rel or b".", flags | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=self._rfd)
        except OSError:
            return None
        if not (stat.S_ISREG(os.fstat(fd).st_mode) or flags & os.O_DIRECTORY):
            os.close(fd)
            return None
        return fd

    def _compare_replica(self, when: str) -> None:
        # Replication (issue 3): after the barrier, the target's copy is the backing dir.
        self.h.handle.wait_synced(60)
        target_lines = diff_snapshots(tree_snapshot(self.h.backing, mtime=True),
                                      tree_snapshot(self.h.target_dir, mtime=True))
        if target_lines:
            raise AssertionError(f"{when}: after --wait-synced the target differs (a=backing, b=target):\n"
                                 + "\n".join(target_lines[:60]))
        self.h.replica.catch_up()
        lines = diff_snapshots(tree_snapshot(self.h.backing, mtime=True),
                               tree_snapshot(self.h.replica.path, mtime=True))
        if lines:
            recs = self.h.replica.records_since(self.first_seq)
            shown = [show_record(r) for r in recs[-80:]]
            raise AssertionError(
                f"{when}: the journal does not replay to the backing dir (a=backing, b=replica):\n"
                + "\n".join(lines[:60])
                + f"\njournal of this example (seq {self.first_seq}..; last {len(shown)} of {len(recs)}):\n"
                + "\n".join(shown)
            )

    @initialize(target=paths, data=st.lists(datas, min_size=3, max_size=3))
    def seed(self, data: list[bytes]):
        """a/ and a/b/ (directories), b, a/c, a/b/c (files with some bytes), made through the mount."""
        os.mkdir(self._p(b"a"), 0o755)
        os.mkdir(self._p(b"a/b"), 0o755)
        for rel, content in zip(SEED_FILES, data, strict=True):
            fd = os.open(self._p(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
        return multiple(b"a", b"a/b", *SEED_FILES)

    @initialize(target=files)
    def seed_files(self):
        return multiple(*SEED_FILES)

    @initialize(target=dirs)
    def seed_dirs(self):
        return multiple(b"a", b"a/b")

    # -- rules that create a name ------------------------------------------------------------

    @rule(targets=(paths, files), path=any_new, mode=st.sampled_from(MODES), user=users)
    def create(self, path: bytes, mode: int, user: tuple[int, int] | None):
        if not self._inside(path, follow=False):
            return multiple()
        try:
            with self._as(user):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=self._rfd))
        except OSError:
            return multiple()
        return path

    @rule(targets=(paths, dirs), path=any_new, mode=st.sampled_from(MODES), user=users)
    def mkdir(self, path: bytes, mode: int, user: tuple[int, int] | None):
        if not self._inside(path, follow=False):
            return multiple()
        try:
            with self._as(user):
                os.mkdir(path, mode, dir_fd=self._rfd)
        except OSError:
            return multiple()
        return path

    @rule(target=paths, path=any_new, mode=st.sampled_from(MODES))
    def mkfifo(self, path: bytes, mode: int):
        if not self._inside(path, follow=False):
            return multiple()
        try:
            os.mkfifo(self._p(path), mode)
        except OSError:
            return multiple()
        return path

    @rule(target=paths, path=any_new, link_target=st.sampled_from(SYMLINK_TARGETS))
    def symlink(self, path: bytes, link_target: bytes):
        if not self._inside(path, follow=False):
            return multiple()
        if link_target == MNT_ABS:
            link_target = self.mnt + b"/a"
        try:
            os.symlink(link_target, self._p(path))
        except OSError:
            return multiple()
        return path

    @rule(target=paths, src=files | paths, dst=st.one_of(any_new, any_new, paths))
    def link(self, src: bytes, dst: bytes):
        if not (self._inside(src, follow=False) and self._inside(dst, follow=False)):
            return multiple()
        try:
            os.link(self._p(src), self._p(dst), follow_symlinks=False)
        except OSError:
            return multiple()
        return dst

    @rule(
        target=paths,
        src=paths | files,
        dst=any_new | paths | files,
        flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
        user=users,
    )
    def rename(self, src: bytes, dst: bytes, flags: int, user: tuple[int, int] | None):
        if not (self._inside(src, follow=False) and self._inside(dst, follow=False)):
            return multiple()
        try:
            with self._as(user):
                if flags:
                    renameat2(src, dst, flags, dir_fd=self._rfd)
                else:
                    os.rename(src, dst, src_dir_fd=self._rfd, dst_dir_fd=self._rfd)
        except OSError:
            return multiple()
        return dst

    # -- rules that change or remove by path ---------------------------------------------------

    @rule(path=st.one_of(files, files, files, paths), offset=offsets, data=datas, user=users)
    def write(self, path: bytes, offset: int, data: bytes, user: tuple[int, int] | None) -> None:
        if not self._inside(path, follow=True):
            return
        fd = self._open(path, os.O_WRONLY, user=user)
        if fd is None:
            return
        try:
            with self._as(user):
                assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)

    @rule(path=st.one_of(files, files, paths), size=sizes, user=users)
    def truncate(self, path: bytes, size: int, user: tuple[int, int] | None) -> None:
        if not self._inside(path, follow=True):
            return
        if user is None:
            try:
                os.truncate(self._p(path), size)  # truncate(2): a setattr without a file handle
            except OSError:
                pass
            return
        fd = self._open(path, os.O_WRONLY, user=user)
        if fd is None:
            return
        try:
            with self._as(user):
                os.ftruncate(fd, size)
        except OSError:
            pass
        finally:
            os.close(fd)

    @rule(path=st.one_of(files, files, paths), offset=st.integers(0, 10_000), data=st.binary(min_size=1, max_size=200))
    def mmap_write(self, path: bytes, offset: int, data: bytes) -> None:
        """Change bytes through a shared mapping; msync makes the kernel send them as writes."""
        if not self._inside(path, follow=True):
            return
        fd = self._open(path, os.O_RDWR)
        if fd is None:
            return
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            offset %= size
            chunk = data[: size - offset]
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[offset : offset + len(chunk)] = chunk
                m.flush()
        finally:
            os.close(fd)

    @rule(src=st.one_of(files, paths), dst=st.one_of(files, files, paths), src_off=st.integers(0, 3000),
          dst_off=offsets, count=st.integers(0, 4000))
    def copy_range(self, src: bytes, dst: bytes, src_off: int, dst_off: int, count: int) -> None:
        """copy_file_range(2) between two files on the mount (the kernel turns it into reads and writes)."""
        if not (self._inside(src, follow=True) and self._inside(dst, follow=True)):
            return
        fin = self._open(src, os.O_RDONLY)
        if fin is None:
            return
        try:
            fout = self._open(dst, os.O_WRONLY)
            if fout is None:
                return
            try:
                os.copy_file_range(fin, fout, count, src_off, dst_off)
            except OSError:
                pass
            finally:
                os.close(fout)
        finally:
            os.close(fin)

    @rule(path=paths | fresh_paths, user=users)
    def unlink(self, path: bytes, user: tuple[int, int] | None) -> None:
        if not self._inside(path, follow=False):
            return
        try:
            with self._as(user):
                os.unlink(path, dir_fd=self._rfd)
        except OSError:
            pass

    @rule(path=dirs | paths)
    def rmdir(self, path: bytes) -> None:
        if not self._inside(path, follow=False):
            return
        try:
            os.rmdir(self._p(path))
        except OSError:
            pass

    @rule(
        target=tagged,
        path=paths | fresh_paths | st.just(b""),
        follow=st.booleans(),
        item=xattr_items,
    )
    def setxattr(self, path: bytes, follow: bool, item: tuple[bytes, bytes]):
        name, value = item
        if not self._inside(path, follow=follow):
            return multiple()
        try:
            os.setxattr(self._p(path), name, value, follow_symlinks=follow)
        except OSError:
            return multiple()
        return (path, name)

    @rule(tag=tagged, follow=st.booleans())
    def removexattr(self, tag: tuple[bytes, bytes], follow: bool) -> None:
        path, name = tag
        if not self._inside(path, follow=follow):
            return
        try:
            os.removexattr(self._p(path), name, follow_symlinks=follow)
        except OSError:
            pass

    @rule(path=paths | fresh_paths | st.just(b""), mode=st.sampled_from(MODES), user=users)
    def chmod(self, path: bytes, mode: int, user: tuple[int, int] | None) -> None:
        if not self._inside(path, follow=True):
            return
        try:
            with self._as(user):
                os.chmod(path or b".", mode, dir_fd=self._rfd)
        except OSError:
            pass

    @precondition(lambda self: IS_ROOT)
    @rule(
        path=paths | fresh_paths | st.just(b""),
        follow=st.booleans(),
        uid=st.sampled_from(OWNERS),
        gid=st.sampled_from(OWNERS),
    )
    def chown(self, path: bytes, follow: bool, uid: int | None, gid: int | None) -> None:
        if not self._inside(path, follow=follow):
            return
        try:
            os.chown(self._p(path), -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=follow)
        except OSError:
            pass

    @rule(path=paths | fresh_paths | st.just(b""), follow=st.booleans(), atime=times_ns, mtime=times_ns,
          which=st.sampled_from(["both", "mtime", "now"]), user=users)
    def utime(self, path: bytes, follow: bool, atime: int, mtime: int, which: str,
              user: tuple[int, int] | None) -> None:
        if not self._inside(path, follow=follow):
            return
        p, kw = path or b".", {"follow_symlinks": follow, "dir_fd": self._rfd}
        try:
            with self._as(user):
                if which == "both":
                    os.utime(p, ns=(atime, mtime), **kw)
                elif which == "mtime":
                    os.utime(p, ns=(os.stat(p, **kw).st_atime_ns, mtime), **kw)
                else:
                    os.utime(p, **kw)  # UTIME_NOW: allowed to anyone who may write the file
        except (OSError, OverflowError):
            pass

    @rule(path=paths | st.just(b""), datasync=st.booleans())
    def fsync(self, path: bytes, datasync: bool) -> None:
        if not self._inside(path, follow=True):
            return
        try:
            fd = os.open(self._p(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- rules on file descriptors kept open across steps ---------------------------------------

    @rule(target=fds, path=st.one_of(files, files, paths, dirs, new_paths), how=st.sampled_from(sorted(OPEN_MODES)),
          user=users)
    def open_file(self, path: bytes, how: str, user: tuple[int, int] | None):
        if not self._inside(path, follow=True):
            return multiple()
        fd = self._open(path, OPEN_MODES[how], user=user)
        if fd is None:
            return multiple()
        self.h.open_fds.add(fd)
        return OpenFile(fd, path, how)

    @rule(f=consumes(fds))
    def close_file(self, f: OpenFile) -> None:
        self.h.open_fds.discard(f.fd)
        os.close(f.fd)

    @rule(f=fds, offset=offsets, data=datas)
    def fd_write(self, f: OpenFile, offset: int, data: bytes) -> None:
        try:
            if f.how == "append":
                n = os.write(f.fd, data)
            else:
                n = os.pwrite(f.fd, data, offset)
        except OSError as exc:
            assert f.how in ("ro", "dir") and exc.errno in (errno.EBADF, errno.EISDIR), exc
            return
        assert n == len(data)

    @rule(f=fds, size=sizes)
    def fd_truncate(self, f: OpenFile, size: int) -> None:
        try:
            os.ftruncate(f.fd, size)
        except OSError:
            pass

    @rule(f=fds, datasync=st.booleans())
    def fd_fsync(self, f: OpenFile, datasync: bool) -> None:  # fsyncdir for a directory
        (os.fdatasync if datasync else os.fsync)(f.fd)

    @rule(f=fds, mode=st.sampled_from(MODES))
    def fd_chmod(self, f: OpenFile, mode: int) -> None:
        os.fchmod(f.fd, mode)

    @rule(f=fds, item=xattr_items, remove=st.booleans())
    def fd_xattr(self, f: OpenFile, item: tuple[bytes, bytes], remove: bool) -> None:
        name, value = item
        try:
            if remove:
                os.removexattr(f.fd, name)
            else:
                os.setxattr(f.fd, name, value)
        except OSError:
            pass

    @rule(f=fds, mtime=times_ns)
    def fd_utime(self, f: OpenFile, mtime: int) -> None:
        try:
            os.utime(f.fd, ns=(mtime, mtime))
        except (OSError, OverflowError):
            pass

    @rule(f=fds)
    def unlink_open(self, f: OpenFile) -> None:
        """Remove the name an open file was opened by (later fd rules then write to an unlinked file)."""
        if not self._inside(f.path, follow=False):
            return
        try:
            (os.rmdir if f.how == "dir" else os.unlink)(self._p(f.path))
        except OSError:
            pass

    @rule(f=fds, dst=any_new | paths | files, flags=st.sampled_from([0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename_open(self, f: OpenFile, dst: bytes, flags: int) -> None:
        """Rename (over something, or exchange) the name an open file was opened by."""
        if not (self._inside(f.path, follow=False) and self._inside(dst, follow=False)):
            return
        try:
            if flags:
                renameat2(self._p(f.path), self._p(dst), flags)
            else:
                os.rename(self._p(f.path), self._p(dst))
        except OSError:
            return
        f.path = dst

    # -- the kernel's side ------------------------------------------------------------------------

    @precondition(lambda self: IS_ROOT)
    @rule(now=st.integers(0, 3))
    def kernel_forgets(self, now: int) -> None:
        """The kernel reclaims every unused dentry and inode (a FORGET each), as memory pressure
        does bit by bit: directories are forgotten while names below them stay in use (issue 6).
        Global (drops the whole machine's dentry cache), so a quarter of the draws only."""
        if now == 0:
            Path("/proc/sys/vm/drop_caches").write_text("2\n")

    # -- checks ---------------------------------------------------------------------------------

    @rule()
    def sync_and_compare(self) -> None:
        self._compare_replica("sync_and_compare")

    @invariant()
    def mount_matches_backing(self) -> None:
        self.h.check_alive()
        # Keep the replica close behind: once the target has acked a segment the daemon
        # drops it, and a replica that had not read it yet could not catch up any more.
        self.h.replica.catch_up()
        lines = diff_snapshots(tree_snapshot(self.h.backing, mtime=True), tree_snapshot(self.h.mnt, mtime=True))
        assert not lines, "the mount and the backing dir differ (a=backing, b=mount):\n" + "\n".join(lines[:60])

    @invariant()
    def inode_numbers_follow_backing(self) -> None:
        """One ``st_ino`` per backing file on the mount: hard links agree, even after the kernel
        forgot them (``kernel_forgets``), and two files never share one (fs/inodes.py)."""
        by_file: dict[tuple[int, int], tuple[int, str]] = {}
        by_ino: dict[int, tuple[tuple[int, int], str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.h.backing):
            for name in dirnames + filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), self.h.backing)
                b, m = os.lstat(os.path.join(self.h.backing, rel)), os.lstat(os.path.join(self.h.mnt, rel))
                key = (b.st_dev, b.st_ino)
                first_ino, first_rel = by_file.setdefault(key, (m.st_ino, rel))
                assert first_ino == m.st_ino, f"links {first_rel} and {rel}: st_ino {first_ino} != {m.st_ino}"
                first_key, first_rel = by_ino.setdefault(m.st_ino, (key, rel))
                assert first_key == key, f"{first_rel} and {rel} are two files with one st_ino {m.st_ino}"

    def teardown(self) -> None:
        self.h.check_alive()
        passed = False
        try:
            self.h.close_fds()
            self._compare_replica("end of example")
            passed = True
        finally:
            try:
                empty_tree(self.h.mnt)
            except OSError:
                self.h.check_alive()  # MountDied, if that is why
                raise
            if passed:
                self._compare_replica("after emptying the tree through the mount")


def _settings() -> settings:
    """An example costs about 0.2 s (two tree walks per step), so 100 x 50 steps take about 25 s on 2 cores.

    CI (``CI=true``) derandomizes, so a red run is reproducible; elsewhere the example
    database keeps failures, and ``print_blob`` prints a ``@reproduce_failure`` line.
    OCTOFS_STATEFUL_EXAMPLES / OCTOFS_STATEFUL_STEPS turn it up for a long soak.
    """
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return settings(
        max_examples=int(os.environ.get("OCTOFS_STATEFUL_EXAMPLES", "100")),
        stateful_step_count=int(os.environ.get("OCTOFS_STATEFUL_STEPS", "50")),
        deadline=None,
        derandomize=ci,
        database=None if ci else settings.default.database,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    replica = tmp_path / "replica"
    replica.mkdir(mode=0o755)
    secret = tmp_path / "secret"
    secret.write_text("stateful-test-secret\n")
    with serving(tmp_path / "target", secret) as target, mounted(write_vault_yaml(tmp_path, extra={
        "secret_file": str(secret), "targets": [{"name": "t", "address": target.address_str}],
    })) as handle:
        h = Harness(handle, replica, tmp_path / "target" / "vault")
        try:
            yield h
        finally:
            h.close_fds()
            h.replica.close()
            os.close(h.root_fd)  # before the unmount: it holds the mount busy
    assert handle.proc.returncode == 0, f"the mount daemon exited with {handle.proc.returncode}"
    bad = [line for line in handle.log_path.read_text(errors="replace").splitlines()
           if any(level in line for level in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))]
    assert not bad, "the mount daemon logged problems:\n" + "\n".join(bad[:40])


def test_mount_stateful(harness: Harness) -> None:
    run_state_machine_as_test(lambda: MountMachine(harness), settings=_settings())
    assert harness.examples >= 2
