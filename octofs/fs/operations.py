"""fs/operations.py: owns the FUSE request handlers of a primary mount.

Invariants:
- Each mutating handler does the backing-dir syscall, then, if it succeeded,
  records the resulting op with ``Recorder.record`` — with no ``await`` between
  the two (DESIGN invariant 1; docs/CONCURRENCY.md §2). A failed syscall is not
  journaled; its errno goes back to the application unchanged.
- The op carries the result as the backing dir shows it after the syscall (final
  mode, owner, mtime), read back with fstat/lstat, so replay is exact.
- An fsync, fdatasync, fsyncdir or a write on an O_SYNC/O_DSYNC file records an
  FsyncOp (a barrier) and returns only once the journal is durable up to it
  (invariant 3).
- The only exception a handler raises is FUSEError. Any other exception is a bug
  and ends the mount (daemon.py logs the traceback).
- Changes to an unlinked-but-open file are applied but not journaled: they cannot
  affect the tree any more. A file that lost the last name the kernel had looked
  up but still has other hard links is not unlinked: ``_keep_journaled`` finds one
  of its remaining names, so its changes go on being journaled.
- Exclusion (vault.yaml ``exclude``, octofs/exclude.py) happens here, at capture:
  the journal holds exactly what targets get, so replaying it yields the backing
  dir minus the excluded paths. A change is journaled under an included name of
  the node (``_jpath``) or not at all; the syscall itself always happens. When a
  rename or link moves something across the boundary, the ops that make the
  target match (a full copy, or a bottom-up removal) are recorded in the same
  stretch without an ``await`` as the syscall (docs/CONCURRENCY.md §2).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from octofs.apply import renameat2
from octofs.errors import JournalError
from octofs.exclude import ExcludeFilter
from octofs.fs.exclusion import ExclusionCapture
from octofs.fs.inodes import ROOT, InodeTable, Node
from octofs.ops import (
    CreateOp,
    FsyncOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    RemovexattrOp,
    RenameOp,
    RmdirOp,
    SetattrOp,
    SetxattrOp,
    SymlinkOp,
    TruncateOp,
    UnlinkOp,
    WriteOp,
)
from octofs.recorder import Recorder
from octofs.threads import run_in_worker

log = logging.getLogger(__name__)

T = TypeVar("T")

# Flags we never pass to the backing open():
# - O_APPEND: the kernel already turned an append into a write at the end offset;
#   on Linux pwrite() on an O_APPEND fd ignores the offset, and the journal must
#   record the offset that was really written.
# - O_DIRECT: pyfuse3's buffers are not aligned, the backing write would fail EINVAL.
# - O_CREAT/O_EXCL/O_NOCTTY: open() of an existing inode; create() handles creation.
_STRIP_FLAGS = os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY
_SYNC_FLAGS = os.O_SYNC | os.O_DSYNC  # O_SYNC includes the O_DSYNC bit on Linux
_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR
_CAPS = b"security.capability"
# An fsync slower than this (the disk is busy) sends the next INLINE_PAUSE fsyncs to worker
# threads instead of running them in the event loop (_sync_both, docs/CONCURRENCY.md §3).
INLINE_FSYNC_MAX_S = 0.02
INLINE_PAUSE = 1000



def _passthrough(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call a backing-dir syscall; map OSError to the same errno for the application."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise FUSEError(exc.errno) from None


class _DirHandle:
    """An open directory: its backing fd (also the FUSE fh) and the listing being read."""

    __slots__ = ("node", "fd", "names")

    def __init__(self, node: Node, fd: int) -> None:
        self.node = node
        self.fd = fd
        self.names: list[bytes] = []


class PassthroughOperations(ExclusionCapture, pyfuse3.Operations):
    """Passes every request through to the backing dir and journals each change.

    Args:
        backing_dir: the real directory (absolute).
        recorder: the journal appender (owns failsafe).
        entry_timeout_s / attr_timeout_s: how long the kernel may cache names (also
            "no such name") and attributes. octofs owns the backing dir, so every change
            reaches it through this mount and the kernel updates its own cache for them;
            each lookup or getattr saved is a round trip (~100 us). 60 s since the inode
            table keeps every node a name still needs (fs/inodes.py; the ENOENT the
            state machine once met with 60 s, docs/PERFORMANCE.md). Nothing else changes
            the backing dir while it is mounted (failover and failback unmount first).
        exclude: vault.yaml ``exclude`` patterns (octofs/exclude.py): matching paths
            work normally here but no op about them is journaled.
        inline_fsync: let a lone fsync block the event loop instead of hopping to a
            worker thread (faster; ``_sync_both``). Off when ``failover.health`` answers
            from this loop: a stalled disk must never silence it into a takeover.

    Attributes:
        failsafe: mirrors ``recorder.failsafe``: True once a change could not be
            journaled; every later change fails with EROFS until remount.
    """

    # Off so that every application write reaches us as a write (and so as one op),
    # and writes to one inode are serialized by the kernel (pyfuse3 general.rst).
    # Measured and decided in docs/CONCURRENCY.md §2 (errors at write() time, nothing
    # acknowledged lives only in the kernel's cache).
    enable_writeback_cache = False
    # No NFS export: "." and ".." lookups are never needed.
    supports_dot_lookup = False
    # On: the kernel enforces POSIX ACLs (read through getxattr) in its permission
    # checks, as a native filesystem does. Off, ACLs set through the mount are stored
    # in the backing dir (and inherited there) but ignored by every access check.
    # Known gap: pyfuse3 does not negotiate FUSE_DONT_MASK, so the kernel applies the
    # umask before create/mkdir/mknod reach us, even below a default ACL (acl(5)
    # says the default ACL replaces the umask there).
    enable_acl = True

    def __init__(
        self,
        backing_dir: bytes,
        recorder: Recorder,
        *,
        entry_timeout_s: float = 60.0,
        attr_timeout_s: float = 60.0,
        exclude: Sequence[str | bytes] = (),
        replicated: Callable[[int], Awaitable[None]] | None = None,
        inline_fsync: bool = True,
    ) -> None:
        super().__init__()
        self._replicated = replicated
        self._inline_fsync = inline_fsync
        self._fsyncs = 0  # fsyncs under way (_sync_both): one alone runs inline
        self._not_inline = 0  # after a slow fsync, this many more go to worker threads
        # Set by fs/mount.py: true while FUSE requests wait to be read (None: unknown).
        self.requests_pending: Callable[[], bool] | None = None
        self._root = os.path.abspath(backing_dir)
        st = os.lstat(self._root)
        self.inodes = InodeTable((st.st_dev, st.st_ino))
        self.recorder = recorder
        self._entry_timeout = entry_timeout_s
        self._attr_timeout = attr_timeout_s
        self._fh_node: dict[int, Node] = {}  # open file: backing fd → node
        self._fh_sync: dict[int, bool] = {}  # open file: backing fd → O_SYNC/O_DSYNC?
        self._dirs: dict[int, _DirHandle] = {}  # open directory: backing fd → handle
        self._is_root_user = os.geteuid() == 0
        self.exclude = ExcludeFilter(exclude)
        self._excluding = bool(self.exclude)  # checked first, so no patterns costs ~nothing
        self._tmp_tag = os.urandom(4).hex().encode()
        self._tmp_serial = 0
        # Run as a trio system task once the kernel's INIT has been answered (fs/mount.py sets it).
        self.after_init: Callable[[], Awaitable[None]] | None = None

    @property
    def failsafe(self) -> bool:
        return self.recorder.failsafe

    def init(self) -> None:
        """FUSE INIT: pyfuse3 calls this just before it replies; ``after_init`` runs after the reply."""
        if self.after_init is not None:
            trio.lowlevel.spawn_system_task(self.after_init)

    # -- helpers ------------------------------------------------------------

    def _abs(self, rel: bytes) -> bytes:
        return self._root + b"/" + rel if rel else self._root

    def _path(self, ino: int) -> bytes:
        """Relative path of a linked inode; ESTALE if the kernel asks about one we do not know."""
        rel = self.inodes.path(ino)
        if rel is None:
            node = self.inodes.get(ino)
            # ENOENT for an unlinked node (it really is gone), ESTALE for a node we never knew.
            raise FUSEError(errno.ENOENT if node is not None else errno.ESTALE)
        return rel

    def _child(self, parent_inode: int, name: bytes) -> bytes:
        base = self._path(parent_inode)
        return base + b"/" + name if base else name

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self._entry_timeout
        a.attr_timeout = self._attr_timeout
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat_node(self, node: Node) -> os.stat_result:
        rel = self.inodes.path(node.ino)
        if rel is None:
            if node.fds:
                return _passthrough(os.fstat, next(iter(node.fds)))
            raise FUSEError(errno.ENOENT)
        return _passthrough(os.lstat, self._abs(rel))

    def _new_entry(self, parent_inode: int, name: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        node = self.inodes.remember(parent_inode, name, st)
        self.inodes.incref(node)
        return self._attrs(node, st)

    def _own_new(self, node: bytes | int, parent_rel: bytes, ctx: pyfuse3.RequestContext,
                 wanted_mode: int | None) -> os.stat_result:
        """Give a just-created node (its backing path, or an fd open on it) the requester's owner,
        restore set-ID bits chown cleared; return its stat.

        The group follows the parent when the parent is set-group-ID (BSD group semantics),
        exactly as the kernel does for a native create. The kernel did the same for our own
        create, so the node already has the parent's group (set-group-ID parent) or ours: if
        that is the requester's group, it is the right one either way and the parent is not
        looked at; if the owner is already right, there is no chown. Not root: no chown at all.
        """
        follow = type(node) is int  # an fd has nothing to follow; a path's last component is never followed
        st = os.stat(node, follow_symlinks=follow)
        if self._is_root_user:
            gid = ctx.gid
            if st.st_gid != gid:
                pst = os.lstat(self._abs(parent_rel))
                if pst.st_mode & stat.S_ISGID:
                    gid = pst.st_gid
            if (st.st_uid, st.st_gid) != (ctx.uid, gid):
                os.chown(node, ctx.uid, gid, follow_symlinks=follow)
                st = os.stat(node, follow_symlinks=follow)
        if wanted_mode is not None and not stat.S_ISLNK(st.st_mode):
            # Only the set-ID bits: other bits may be missing on purpose (a default ACL masks them).
            lost = wanted_mode & ~st.st_mode & (stat.S_ISUID | stat.S_ISGID)
            if lost:  # chown() by root clears set-user/group-ID bits the caller asked for
                os.chmod(node, (st.st_mode | lost) & 0o7777)  # not a symlink: nothing to follow
                st = os.stat(node, follow_symlinks=follow)
        return st

    async def _admit(self) -> None:
        """Before a change's syscall: refuse it in failsafe, or wait while the journal is full.

        This is the only ``await`` a mutating handler may have before its syscall;
        there is none between the syscall and the append (docs/CONCURRENCY.md §2).
        """
        await self.recorder.wait_for_room()
        if self.recorder.failsafe or self.recorder.fenced:
            # EROFS, not EIO: the disk is fine, the vault refuses changes it cannot journal
            # (failsafe) or that another primary, at a higher epoch, now owns (fenced).
            raise FUSEError(errno.EROFS)

    def _record(self, op) -> int:
        try:
            return self.recorder.record(op)
        except JournalError:
            # The recorder went failsafe and logged why (STYLE §7); the application sees EIO.
            raise FUSEError(errno.EIO) from None

    async def _wait_durable(self, seq: int) -> None:
        """Invariant 3: the op is durable in the journal and, if any target is in sync
        mode, acked durably by it (or that target degraded to async after its timeout)."""
        try:
            await self.recorder.wait_durable(seq)
        except JournalError:
            raise FUSEError(errno.EIO) from None
        if self._replicated is not None:
            await self._replicated(seq)

    async def _sync_both(self, sync_backing: Callable[[], None], seq: int) -> None:
        """An application's fsync: the backing file and the journal up to ``seq`` durable and,
        with sync targets, their durable acks (invariant 3).

        Without sync targets: the backing file's fsync, then the journal's, in one go
        (``Recorder.sync_with``). With them, the journal first, so that the op leaves for
        the targets at once, and the backing file's fsync in a worker while they apply it
        (only journal-durable ops are shipped).
        """
        sync_file = functools.partial(_passthrough, sync_backing)
        if self._replicated is not None:
            try:
                await self.recorder.wait_durable(seq, urgent=True)
            except JournalError:
                raise FUSEError(errno.EIO) from None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_in_worker, sync_file)
                    await self._replicated(seq)
            except BaseExceptionGroup as group:  # the backing file's FUSEError, out of the nursery
                fuse_errors = group.subgroup(FUSEError)
                if fuse_errors is None:
                    raise
                first = fuse_errors.exceptions[0]
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            return
        # Inline (in the loop's thread) when nothing else is under way, no other fsync and no
        # request waiting to be read: for one application fsyncing alone, the thread hop costs
        # more than it buys. Otherwise a worker thread, so that other requests are served and
        # concurrent flushes overlap (docs/CONCURRENCY.md §3).
        # A slow disk (an fsync over INLINE_FSYNC_MAX_S) sends the next INLINE_PAUSE fsyncs to
        # worker threads: the loop also answers heartbeats and status, which must not wait long.
        self._fsyncs += 1
        pending = self.requests_pending
        inline = (self._inline_fsync and self._fsyncs == 1 and not self._not_inline
                  and pending is not None and not pending())
        started = time.monotonic()
        try:
            await self.recorder.sync_with(seq, sync_file, inline=inline)
        except JournalError:
            raise FUSEError(errno.EIO) from None
        finally:
            self._fsyncs -= 1
            if time.monotonic() - started > INLINE_FSYNC_MAX_S:
                self._not_inline = INLINE_PAUSE
            elif self._not_inline:
                self._not_inline -= 1

    def _keep_journaled(self, node: Node | None) -> None:
        """``node`` just lost a name; if it has no known name left but is open and still linked, adopt a name.

        The kernel only tells us the names it looked up. A hard-linked file opened
        as ``a`` whose other name ``b`` was never looked up would, after ``unlink a``,
        look unlinked to us and writes through the open fd would reach ``b`` in the
        backing dir without being journaled. The search walks the backing dir in
        the event loop; it only runs for an open file with st_nlink > 0 after its
        last known name went away, which is rare.
        """
        if node is None or node.names or not node.fds:
            return
        try:
            st = os.fstat(next(iter(node.fds)))
            if st.st_nlink == 0:
                return  # really unlinked
            rel = next(self._names_of(st), None)
            if rel is None:
                return
            parent, _, name = rel.rpartition(b"/")
            self.inodes.adopt(node, self._dir_ino(parent), name, (st.st_dev, st.st_ino))
        except OSError as exc:  # the backing dir changed under us: nothing better to do than say so
            log.warning("cannot find the remaining hard link of an open file; its changes "
                        "will not be journaled: %s", exc)

    def _names_of(self, st: os.stat_result) -> Iterator[bytes]:
        """Yield the vault-relative names of the backing file ``st`` (a walk of the whole backing dir)."""
        pending = [b""]
        while pending:
            rel_dir = pending.pop()
            with os.scandir(self._abs(rel_dir)) as it:
                entries = list(it)
            for entry in entries:
                rel = rel_dir + b"/" + entry.name if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(rel)
                elif entry.inode() == st.st_ino:
                    est = os.lstat(entry.path)
                    if (est.st_dev, est.st_ino) == (st.st_dev, st.st_ino):
                        yield rel

    def _dir_ino(self, rel_dir: bytes) -> int:
        """Our inode number for a backing directory, remembering (not increfing) the ones the kernel never saw.

        Nodes remembered here have no kernel lookups; the table keeps them while a
        name is remembered under them (fs/inodes.py drops them with their last child),
        which bounds them by the rare callers.
        """
        ino = ROOT
        if not rel_dir:
            return ino
        done = b""
        for part in rel_dir.split(b"/"):
            done = done + b"/" + part if done else part
            node = self.inodes.entry(ino, part)
            if node is None:
                node = self.inodes.remember(ino, part, os.lstat(self._abs(done)))
            ino = node.ino
        return ino

    # -- lookup and attributes ---------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        rel = self._child(parent_inode, name)
        try:
            st = os.lstat(self._abs(rel))
        except FileNotFoundError:
            # A negative entry (st_ino 0) the kernel may cache for entry_timeout: the name
            # can only appear through this mount, and the kernel drops the negative entry
            # itself when it does. Saves the lookup before every create.
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self._entry_timeout
            return neg
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        return self._new_entry(parent_inode, name, st)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            node = self.inodes.get(ino)
            self.inodes.forget(ino, count)
            if node is not None and node.held_fd is not None and self.inodes.get(ino) is None:
                node.fds.discard(node.held_fd)
                os.close(node.held_fd)
                node.held_fd = None

    async def getattr(self, inode, ctx):
        node = self.inodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return self._attrs(node, self._stat_node(node))

    async def setattr(self, inode, attr, fields, fh, ctx):
        await self._admit()
        node = self.inodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        rel = self.inodes.path(inode)
        self.recorder.intend(rel)
        target = fh if fh is not None and fh in self._fh_node else (self._abs(rel) if rel is not None else None)
        if target is None:
            if not node.fds:
                raise FUSEError(errno.ENOENT)
            target = next(iter(node.fds))
        is_fd = isinstance(target, int)
        st = self._stat_node(node)
        is_link = stat.S_ISLNK(st.st_mode)
        try:
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode and not is_link:
                os.chmod(target, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if is_fd:
                    os.fchown(target, uid, gid)
                else:
                    os.chown(target, uid, gid, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                cur = os.fstat(target) if is_fd else os.lstat(target)
                atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
                if is_fd:
                    os.utime(target, ns=(atime, mtime))
                else:
                    os.utime(target, ns=(atime, mtime), follow_symlinks=False)
        except OSError as exc:
            # Part of the change may have happened (e.g. truncate then EPERM on chown):
            # journal what the backing dir now shows before reporting the error.
            self._record_setattr(self._jpath(node, rel), fields, node)
            raise FUSEError(exc.errno) from None
        st = self._record_setattr(self._jpath(node, rel), fields, node)
        return self._attrs(node, st)

    def _record_setattr(self, rel: bytes | None, fields, node: Node) -> os.stat_result:
        st = self._stat_node(node)
        if rel is None:
            return st
        if fields.update_size:
            self._record(TruncateOp(rel, st.st_size, st.st_mtime_ns))
        owner = fields.update_uid or fields.update_gid
        if fields.update_mode or owner or fields.update_atime or fields.update_mtime:
            is_link = stat.S_ISLNK(st.st_mode)
            self._record(
                SetattrOp(
                    rel,
                    # chown may clear set-ID bits: record the resulting mode too.
                    mode=stat.S_IMODE(st.st_mode) if (fields.update_mode or owner) and not is_link else None,
                    uid=st.st_uid if owner else None,
                    gid=st.st_gid if owner else None,
                    atime_ns=st.st_atime_ns if (fields.update_atime or fields.update_mtime) else None,
                    mtime_ns=st.st_mtime_ns if (fields.update_atime or fields.update_mtime) else None,
                )
            )
        return st

    async def readlink(self, inode, ctx):
        return _passthrough(os.readlink, self._abs(self._path(inode)))

    async def access(self, inode, mode, ctx):
        # Only called without default_permissions; octofs always mounts with it,
        # so this is a plain existence + mode-bit check for completeness.
        node = self.inodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        st = self._stat_node(node)
        if ctx.uid == 0:
            ok = not (mode & os.X_OK) or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        else:
            if ctx.uid == st.st_uid:
                bits = (st.st_mode >> 6) & 7
            elif ctx.gid == st.st_gid:
                bits = (st.st_mode >> 3) & 7
            else:
                bits = st.st_mode & 7
            ok = (mode & bits) == mode
        if not ok:
            raise FUSEError(errno.EACCES)
        return True

    async def statfs(self, ctx):
        sv = _passthrough(os.statvfs, self._root)
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, attr, getattr(sv, attr))
        out.f_namemax = sv.f_namemax
        return out

    # -- creating and removing names ------------------------------------------

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._admit()
        parent_rel = self._path(parent_inode)
        rel = self._child(parent_inode, name)
        self.recorder.intend(rel)
        path = self._abs(rel)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        _passthrough(os.mknod, path, stat.S_IFMT(mode) | perm, rdev)
        st = _passthrough(self._own_new, path, parent_rel, ctx, perm)
        if not self._excluded(rel, False):
            self._record(MknodOp(rel, st.st_mode, st.st_rdev, st.st_uid, st.st_gid, st.st_mtime_ns))
        return self._new_entry(parent_inode, name, st)

    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._admit()
        parent_rel = self._path(parent_inode)
        rel = self._child(parent_inode, name)
        self.recorder.intend(rel)
        path = self._abs(rel)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        _passthrough(os.mkdir, path, perm)
        st = _passthrough(self._own_new, path, parent_rel, ctx, perm)
        if not self._excluded(rel, True):
            self._record(MkdirOp(rel, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns))
        return self._new_entry(parent_inode, name, st)

    async def symlink(self, parent_inode, name, target, ctx):
        await self._admit()
        parent_rel = self._path(parent_inode)
        rel = self._child(parent_inode, name)
        self.recorder.intend(rel)
        path = self._abs(rel)
        _passthrough(os.symlink, target, path)
        st = _passthrough(self._own_new, path, parent_rel, ctx, None)
        if not self._excluded(rel, False):
            self._record(SymlinkOp(rel, target, st.st_uid, st.st_gid, st.st_mtime_ns))
        return self._new_entry(parent_inode, name, st)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._admit()
        src = self._path(inode)
        rel = self._child(new_parent_inode, new_name)
        self.recorder.intend(rel, src)
        # An included name of the source, looked for before the link exists (the
        # search may walk the backing dir and must not find the new name).
        jsrc = self._jpath(self.inodes[inode], src)
        _passthrough(os.link, self._abs(src), self._abs(rel), follow_symlinks=False)
        if not self._excluded(rel, False):
            if jsrc is not None:
                self._record(LinkOp(jsrc, rel))
            else:
                # Every name of the source is excluded: the target has nothing to link
                # to, so the new name arrives as a copy.
                self._capture(f"link {rel!r}", self._emit_copy, rel, (rel,))
        st = _passthrough(os.lstat, self._abs(rel))
        return self._new_entry(new_parent_inode, new_name, st)

    async def unlink(self, parent_inode, name, ctx):
        await self._admit()
        rel = self._child(parent_inode, name)
        self.recorder.intend(rel)
        _passthrough(os.unlink, self._abs(rel))
        if not self._excluded(rel, False):
            self._record(UnlinkOp(rel))
        node = self.inodes.entry(parent_inode, name)
        self.inodes.unlinked(parent_inode, name)
        self._keep_journaled(node)

    async def rmdir(self, parent_inode, name, ctx):
        await self._admit()
        rel = self._child(parent_inode, name)
        self.recorder.intend(rel)
        path = self._abs(rel)
        node = self.inodes.entry(parent_inode, name)
        # A removed directory can still be someone's cwd, which FUSE never opens:
        # hold a backing fd until forget so getattr and opendir keep working on it
        # (nlink 0, empty) as natively. If it cannot be opened, rmdir reports why.
        held = None
        if node is not None:
            try:
                held = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                pass
        try:
            _passthrough(os.rmdir, path)
        except FUSEError:
            if held is not None:
                os.close(held)
            raise
        if not self._excluded(rel, True):
            self._record(RmdirOp(rel))
        self.inodes.unlinked(parent_inode, name)
        if held is not None:
            node.held_fd = held
            node.fds.add(held)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._admit()
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        self.recorder.intend(old, new)
        a_node = self.inodes.entry(parent_inode_old, name_old)
        b_node = self.inodes.entry(parent_inode_new, name_new)
        if flags:
            _passthrough(renameat2, self._abs(old), self._abs(new), flags)
        else:
            _passthrough(os.rename, self._abs(old), self._abs(new))
        try:
            if self._excluding:
                self._capture(f"rename {old!r} -> {new!r}", self._record_rename, old, new, flags, a_node, b_node)
            else:
                self._record(RenameOp(old, new, flags))
        finally:
            # The table follows the backing dir even if journaling failed (failsafe).
            if flags & pyfuse3.RENAME_EXCHANGE:
                self.inodes.exchanged(parent_inode_old, name_old, parent_inode_new, name_new)
            else:
                self.inodes.renamed(parent_inode_old, name_old, parent_inode_new, name_new)
                self._keep_journaled(b_node)

    # -- files ----------------------------------------------------------------

    def _register_fd(self, node: Node, fd: int, flags: int) -> None:
        self._fh_node[fd] = node
        self._fh_sync[fd] = bool(flags & _SYNC_FLAGS)
        node.fds.add(fd)

    async def open(self, inode, flags, ctx):
        node = self.inodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        writing = (flags & _ACCMODE) != os.O_RDONLY
        # Linux truncates on O_TRUNC even for an O_RDONLY open (the kernel already
        # checked write permission), and the backing open() below does the same:
        # so it is journaled whatever the access mode.
        trunc = bool(flags & os.O_TRUNC)
        if writing or trunc:
            await self._admit()
        rel = self._path(inode)
        if trunc:
            self.recorder.intend(rel)
        fd = _passthrough(os.open, self._abs(rel), (flags & ~_STRIP_FLAGS) | os.O_CLOEXEC)
        jrel = self._jpath(node, rel) if trunc else None
        if jrel is not None:
            st = os.fstat(fd)
            self._record(TruncateOp(jrel, 0, st.st_mtime_ns))
        self._register_fd(node, fd, flags)
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._admit()
        parent_rel = self._path(parent_inode)
        rel = self._child(parent_inode, name)
        self.recorder.intend(rel)
        path = self._abs(rel)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        fd = _passthrough(
            os.open, path, (flags & ~_STRIP_FLAGS) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm
        )
        try:
            st = self._own_new(fd, parent_rel, ctx, perm)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise FUSEError(exc.errno) from None
        if not self._excluded(rel, False):
            self._record(CreateOp(rel, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns))
        attrs = self._new_entry(parent_inode, name, st)
        self._register_fd(self.inodes[attrs.st_ino], fd, flags)
        return pyfuse3.FileInfo(fh=fd), attrs

    async def read(self, fh, off, size):
        return _passthrough(os.pread, fh, size, off)

    async def write(self, fh, off, buf):
        await self._admit()
        node = self._fh_node[fh]
        rel = self.inodes.path(node.ino)
        recorder = self.recorder
        recorder.intend(rel)
        # _passthrough and _record inlined: this runs once per application write().
        try:
            n = os.pwrite(fh, buf, off)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        if self._excluding:
            rel = self._jpath(node, rel)
        if rel is not None:
            mtime = os.fstat(fh).st_mtime_ns
            data = buf if n == len(buf) and type(buf) is bytes else bytes(buf[:n])  # pyfuse3 passes bytes
            try:
                seq = recorder.record(WriteOp(rel, off, data, mtime))
            except JournalError:
                raise FUSEError(errno.EIO) from None  # as _record: the recorder went failsafe
            if self._fh_sync[fh]:
                # A write on an O_SYNC/O_DSYNC file is a barrier: durable before it returns.
                seq = self._record(FsyncOp(rel, datasync=True))
                await self._wait_durable(seq)
        return n

    # No flush handler: pyfuse3's default answers ENOSYS, after which the kernel stops
    # sending FLUSH (one round trip per close() saved). Nothing is lost: a FLUSH has
    # nothing to do here, writes reach the backing file before write() returns.

    async def release(self, fh):
        node = self._fh_node.pop(fh, None)
        self._fh_sync.pop(fh, None)
        if node is not None:
            node.fds.discard(fh)
        os.close(fh)

    async def fsync(self, fh, datasync):
        node = self._fh_node[fh]
        rel = self._jpath(node, self.inodes.path(node.ino))
        sync_backing = os.fdatasync if datasync else os.fsync
        if rel is None or self.recorder.failsafe:
            await run_in_worker(_passthrough, sync_backing, fh)
            return
        seq = self._record(FsyncOp(rel, datasync=bool(datasync)))
        await self._sync_both(lambda: sync_backing(fh), seq)

    # -- directories ----------------------------------------------------------

    async def opendir(self, inode, ctx):
        node = self.inodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        # The handle holds a backing fd, as an open directory does natively: listing,
        # fstat, fchmod and fsync keep working after the directory is renamed or
        # removed (a removed one lists empty and has nlink 0).
        rel = self.inodes.path(inode)
        if rel is None and node.fds:  # removed but still reachable: list it through a copy of its fd
            fd = _passthrough(os.dup, next(iter(node.fds)))
        else:
            fd = _passthrough(os.open, self._abs(self._path(inode)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs[fd] = _DirHandle(node, fd)
        node.fds.add(fd)
        return fd

    async def readdir(self, fh, start_id, token):
        handle = self._dirs[fh]
        if start_id == 0:
            # A listing (or a rewinddir) takes a snapshot of the names: entries
            # added or removed while the application reads it are neither
            # repeated nor skipped (POSIX allows either for those).
            # listdir(fd) gives str names; fsencode() turns them back into the exact bytes.
            # "." and ".." come first, as from every native filesystem (code that
            # counts entries to see whether a directory is empty relies on them).
            handle.names = [b".", b"..", *sorted(os.fsencode(n) for n in _passthrough(os.listdir, handle.fd))]
        names = handle.names
        for index in range(start_id, len(names)):
            name = names[index]
            if name in (b".", b".."):
                # The kernel does not link these (no lookup count); only d_ino and d_type reach
                # the application, so the directory's own attributes serve for both.
                node = handle.node
                if name == b".." and node.names:
                    node = self.inodes.get(min(node.names)[0]) or node
                if not pyfuse3.readdir_reply(token, name, self._attrs(node, _passthrough(os.fstat, handle.fd)),
                                             index + 1):
                    return
                continue
            try:
                st = os.lstat(name, dir_fd=handle.fd)
            except FileNotFoundError:
                continue  # removed since the snapshot
            node = self.inodes.remember(handle.node.ino, name, st)
            if not pyfuse3.readdir_reply(token, name, self._attrs(node, st), index + 1):
                self.inodes.drop_if_unreferenced(node)
                return
            self.inodes.incref(node)

    async def releasedir(self, fh):
        handle = self._dirs.pop(fh)
        handle.node.fds.discard(fh)
        os.close(fh)

    async def fsyncdir(self, fh, datasync):
        handle = self._dirs[fh]
        rel = self._jpath(handle.node, self.inodes.path(handle.node.ino))
        if rel is None or self.recorder.failsafe:  # removed or excluded: nothing to journal
            await run_in_worker(_passthrough, os.fsync, fh)
            return
        seq = self._record(FsyncOp(rel, datasync=bool(datasync)))
        await self._sync_both(lambda: os.fsync(fh), seq)

    # -- extended attributes --------------------------------------------------

    def _xattr_target(self, inode: int) -> tuple[bytes | int, dict, bytes | None]:
        """Where an xattr call goes: ``(path or fd, os.*xattr kwargs, rel or None)``.

        An unlinked node that is still open is reached through its fd, as fgetxattr
        and friends reach it natively; its changes are not journaled (rel is None).
        """
        rel = self.inodes.path(inode)
        if rel is not None:
            return self._abs(rel), {"follow_symlinks": False}, rel
        node = self.inodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)  # a node we never knew, as in _path
        if not node.fds:
            raise FUSEError(errno.ENOENT)  # unlinked and not open: really gone, as in _path
        return next(iter(node.fds)), {}, None

    async def setxattr(self, inode, name, value, ctx):
        await self._admit()
        target, kw, rel = self._xattr_target(inode)
        self.recorder.intend(rel)
        self.inodes[inode].no_caps = False  # before the syscall: a failed one may have half-worked
        _passthrough(os.setxattr, target, name, value, **kw)
        if rel is not None and (rel := self._jpath(self.inodes[inode], rel)) is not None:
            self._record(SetxattrOp(rel, name, value))

    async def getxattr(self, inode, name, ctx):
        # The kernel asks for security.capability before every write() (FUSE clears SB_NOSEC,
        # so it cannot remember "none"). octofs owns the backing dir and only setxattr adds
        # one, so a "none" found once is remembered on the node until a setxattr on it.
        caps = name == _CAPS
        if caps and (node := self.inodes.get(inode)) is not None and node.no_caps:
            raise FUSEError(errno.ENODATA)
        target, kw, _ = self._xattr_target(inode)
        try:
            return os.getxattr(target, name, **kw)
        except OSError as exc:
            if caps and exc.errno == errno.ENODATA:
                self.inodes[inode].no_caps = True
            raise FUSEError(exc.errno) from None

    async def listxattr(self, inode, ctx):
        target, kw, _ = self._xattr_target(inode)
        return [os.fsencode(n) for n in _passthrough(os.listxattr, target, **kw)]

    async def removexattr(self, inode, name, ctx):
        await self._admit()
        target, kw, rel = self._xattr_target(inode)
        self.recorder.intend(rel)
        _passthrough(os.removexattr, target, name, **kw)
        if rel is not None and (rel := self._jpath(self.inodes[inode], rel)) is not None:
            self._record(RemovexattrOp(rel, name))


__all__ = ["PassthroughOperations", "ROOT"]
