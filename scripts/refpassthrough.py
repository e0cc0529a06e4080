"""refpassthrough: a reference pure-Python pyfuse3 passthrough for scripts/bench (issue 6).

    python scripts/refpassthrough.py SRC MNT [--ready-file F] [--no-allow-other]

Mounts SRC on MNT and serves in the foreground until SIGTERM/SIGINT or an unmount.
It passes every request straight to SRC and does nothing else: no journal, no
shipping, nothing recorded. What it measures is what any Python FUSE file system
pays on this machine for the round trips alone, so scripts/bench reads octofs
against it ("octofs/pt") as well as against the native directory.

It is deliberately configured like an octofs mount wherever the kernel's
behaviour depends on it (octofs/fs/mount.py, octofs/fs/operations.py):
  * -o default_permissions (+ allow_other unless --no-allow-other), FUSE ACLs on;
  * no writeback cache: every write() reaches the daemon as a WRITE;
  * entry and attribute timeouts of 1 s, negative lookups cached as long;
  * keep_cache on every open (pyfuse3's default); no FLUSH handler (ENOSYS once,
    then the kernel stops sending it);
  * the mount's read-ahead raised to 1 MiB after INIT (as root);
  * fsync/fdatasync/fsyncdir really reach the backing file, in a worker thread
    (one thread hop, so the loop keeps serving other requests meanwhile), as octofs's;
    ``--fsync-in-loop`` makes them block the loop instead (not used by the bench).

Design (my own, not taken from pyfuse3's example): every inode the kernel knows is
held as an ``O_PATH`` fd on the backing object, and every syscall is made
relative to such fds (``*at`` calls, or ``/proc/self/fd/N`` where Linux has no
``*at`` form). No paths are stored, so renames and unlinks need no bookkeeping
and cannot leave a stale path behind. A node lives while the kernel holds
lookups on it (lookup/create/mkdir/... and each READDIRPLUS entry add one,
FORGET removes them).

Not handled (not needed by the bench): "." and ".." in listings, utime and
xattrs on symlinks (EPERM / no xattrs), file locks (the kernel keeps them
locally), the setgid-directory rule for new nodes when not running as root.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import json
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio
from pyfuse3 import FUSEError

TIMEOUT_S = 60.0  # entry and attr timeouts: octofs's defaults
READ_AHEAD_KB = 1024  # octofs/fs/mount.py READ_AHEAD_KB
# Never passed to the backing open(): the kernel already computed append offsets; O_DIRECT
# would need aligned buffers; creation is create()'s job.
STRIP = os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY
AT_EMPTY_PATH = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _fchown_empty(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): works on an O_PATH fd, symlinks included."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH))


def _renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddir, old, newdir, new, ctypes.c_uint(flags)))


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


async def in_worker(fn, *args):
    """Run a blocking call in a worker thread (one hop, no limiter) and return its result."""
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def done(result) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(fn, *args), done)
    return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


def oserror_to_fuse(handler):
    """Every handler answers an OSError from the backing dir with the same errno."""

    @functools.wraps(handler)
    async def wrapped(*args):
        try:
            return await handler(*args)
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    return wrapped


class Node:
    __slots__ = ("fd", "key", "lookups", "symlink")

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd = fd
        self.key = (st.st_dev, st.st_ino)
        self.lookups = 0
        self.symlink = stat.S_ISLNK(st.st_mode)


class RefPassthrough(pyfuse3.Operations):
    """Plain passthrough to ``src``; see the module docstring."""

    enable_writeback_cache = False
    supports_dot_lookup = False
    enable_acl = True

    def __init__(self, src: str, mnt: str, ready_file: str | None, *, fsync_in_loop: bool = False) -> None:
        super().__init__()
        self.src, self.mnt, self.ready_file = src, mnt, ready_file
        root_fd = os.open(src, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root = Node(root_fd, os.fstat(root_fd))
        root.lookups = 1  # never forgotten
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self.by_key: dict[tuple[int, int], int] = {root.key: pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.dirs: dict[int, list[bytes]] = {}  # open directory fd -> names listed at start_id 0
        self.as_root = os.geteuid() == 0
        self.fsync_in_loop = fsync_in_loop

    # -- start-up --------------------------------------------------------------------------------

    def init(self) -> None:
        # Called just before pyfuse3 answers INIT; the task runs after the answer, when the
        # kernel has set the mount's read-ahead (which INIT can only lower).
        trio.lowlevel.spawn_system_task(self._after_init)

    async def _after_init(self) -> None:
        try:
            # A stat of our own mount must not block the loop that answers it: a thread.
            st = await trio.to_thread.run_sync(os.stat, self.mnt)
            Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb").write_text(
                f"{READ_AHEAD_KB}\n")
        except OSError as exc:
            print(f"refpassthrough: cannot raise the read-ahead: {exc}", file=sys.stderr)
        if self.ready_file:
            tmp = self.ready_file + ".tmp"
            Path(tmp).write_text(json.dumps({"pid": os.getpid(), "mountpoint": self.mnt}) + "\n")
            os.replace(tmp, self.ready_file)

    # -- nodes -----------------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _attrs(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = TIMEOUT_S
        a.attr_timeout = TIMEOUT_S
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_rdev, a.st_size, a.st_blksize, a.st_blocks = st.st_rdev, st.st_size, st.st_blksize, st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _entry(self, parent_fd: int, name: bytes) -> tuple[int, os.stat_result]:
        """Add one kernel lookup to the node at ``name`` in ``parent_fd`` (opening it if new)."""
        st = os.lstat(name, dir_fd=parent_fd)
        ino = self.by_key.get((st.st_dev, st.st_ino))
        if ino is None:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            st = os.fstat(fd)  # the object really opened (the name may have changed since lstat)
            ino = self.by_key.get((st.st_dev, st.st_ino))
            if ino is None:
                ino, self.next_ino = self.next_ino, self.next_ino + 1
                self.nodes[ino] = Node(fd, st)
                self.by_key[(st.st_dev, st.st_ino)] = ino
            else:
                os.close(fd)
        self.nodes[ino].lookups += 1
        return ino, st

    def _unref(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == pyfuse3.ROOT_INODE:
            return
        node.lookups -= n
        if node.lookups <= 0:
            del self.nodes[ino]
            del self.by_key[node.key]
            os.close(node.fd)

    def _new_owner(self, parent_fd: int, name: bytes, ctx, *, fd: int | None = None) -> None:
        """A node root created for another user gets that user as owner (as natively)."""
        if not self.as_root:
            return
        pst = os.fstat(parent_fd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        if fd is not None:
            os.fchown(fd, ctx.uid, gid)
        else:
            os.chown(name, ctx.uid, gid, dir_fd=parent_fd, follow_symlinks=False)

    async def _sync(self, fn, fd: int) -> None:
        if self.fsync_in_loop:
            fn(fd)  # blocks every other request meanwhile; one thread hop less per fsync
        else:
            await in_worker(fn, fd)

    # -- names -----------------------------------------------------------------------------------

    @oserror_to_fuse
    async def lookup(self, parent_inode, name, ctx):
        try:
            ino, st = self._entry(self._node(parent_inode).fd, name)
        except FileNotFoundError:
            neg = pyfuse3.EntryAttributes()  # cached "no such name", as octofs does
            neg.st_ino = 0
            neg.entry_timeout = TIMEOUT_S
            return neg
        return self._attrs(ino, st)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self._unref(ino, n)

    @oserror_to_fuse
    async def getattr(self, inode, ctx):
        return self._attrs(inode, os.fstat(self._node(inode).fd))

    @oserror_to_fuse
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        path = _proc(node.fd)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode and not node.symlink:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            _fchown_empty(node.fd, attr.st_uid if fields.update_uid else -1,
                          attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            if node.symlink:
                raise FUSEError(errno.EPERM)  # no utimensat on an O_PATH symlink fd (not needed here)
            cur = os.fstat(node.fd)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns))
        return self._attrs(inode, os.fstat(node.fd))

    @oserror_to_fuse
    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink("", dir_fd=self._node(inode).fd))  # readlinkat(fd, "")

    @oserror_to_fuse
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        pfd = self._node(parent_inode).fd
        os.mknod(name, stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask), rdev, dir_fd=pfd)
        self._new_owner(pfd, name, ctx)
        return self._attrs(*self._entry(pfd, name))

    @oserror_to_fuse
    async def mkdir(self, parent_inode, name, mode, ctx):
        pfd = self._node(parent_inode).fd
        os.mkdir(name, stat.S_IMODE(mode) & ~ctx.umask, dir_fd=pfd)
        self._new_owner(pfd, name, ctx)
        return self._attrs(*self._entry(pfd, name))

    @oserror_to_fuse
    async def symlink(self, parent_inode, name, target, ctx):
        pfd = self._node(parent_inode).fd
        os.symlink(target, name, dir_fd=pfd)
        self._new_owner(pfd, name, ctx)
        return self._attrs(*self._entry(pfd, name))

    @oserror_to_fuse
    async def link(self, inode, new_parent_inode, new_name, ctx):
        pfd = self._node(new_parent_inode).fd
        os.link(_proc(self._node(inode).fd), new_name, dst_dir_fd=pfd, follow_symlinks=True)
        return self._attrs(*self._entry(pfd, new_name))

    @oserror_to_fuse
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(name, dir_fd=self._node(parent_inode).fd)

    @oserror_to_fuse
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(name, dir_fd=self._node(parent_inode).fd)

    @oserror_to_fuse
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old_fd, new_fd = self._node(parent_inode_old).fd, self._node(parent_inode_new).fd
        if flags:
            _renameat2(old_fd, name_old, new_fd, name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=old_fd, dst_dir_fd=new_fd)

    @oserror_to_fuse
    async def statfs(self, ctx):
        sv = os.statvfs(self.src)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                  "f_namemax"):
            setattr(out, f, getattr(sv, f))
        return out

    # -- files -----------------------------------------------------------------------------------

    @oserror_to_fuse
    async def open(self, inode, flags, ctx):
        fd = os.open(_proc(self._node(inode).fd), (flags & ~STRIP) | os.O_CLOEXEC)
        return pyfuse3.FileInfo(fh=fd)  # keep_cache: pyfuse3's default, as octofs

    @oserror_to_fuse
    async def create(self, parent_inode, name, mode, flags, ctx):
        pfd = self._node(parent_inode).fd
        perm = stat.S_IMODE(mode) & ~ctx.umask
        fd = os.open(name, (flags & ~STRIP) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm, dir_fd=pfd)
        try:
            self._new_owner(pfd, name, ctx, fd=fd)
            if perm & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, perm)  # root's chown cleared the set-ID bits the caller asked for
            ino, st = self._entry(pfd, name)
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=fd), self._attrs(ino, st)

    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    # No flush(): pyfuse3's default answers ENOSYS and the kernel stops sending FLUSH (as octofs).

    async def release(self, fh):
        os.close(fh)

    @oserror_to_fuse
    async def fsync(self, fh, datasync):
        await self._sync(os.fdatasync if datasync else os.fsync, fh)

    # -- directories -----------------------------------------------------------------------------

    @oserror_to_fuse
    async def opendir(self, inode, ctx):
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._node(inode).fd)
        self.dirs[fd] = []
        return fd

    @oserror_to_fuse
    async def readdir(self, fh, start_id, token):
        if start_id == 0:  # a snapshot per listing: nothing repeated or skipped while it is read
            self.dirs[fh] = [os.fsencode(n) for n in os.listdir(fh)]
        names = self.dirs[fh]
        for i in range(start_id, len(names)):
            try:
                ino, st = self._entry(fh, names[i])
            except FileNotFoundError:
                continue  # removed since the snapshot
            if not pyfuse3.readdir_reply(token, names[i], self._attrs(ino, st), i + 1):
                self._unref(ino, 1)  # not sent: the kernel holds no lookup for it
                return
            # sent as a READDIRPLUS entry: the kernel now holds the lookup _entry counted

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)
        os.close(fh)

    @oserror_to_fuse
    async def fsyncdir(self, fh, datasync):
        await self._sync(os.fsync, fh)

    # -- extended attributes: plain passthrough (none on symlinks) ---------------------------------

    @oserror_to_fuse
    async def getxattr(self, inode, name, ctx):
        node = self._node(inode)
        if node.symlink:
            raise FUSEError(errno.ENODATA)
        return os.getxattr(_proc(node.fd), name)

    @oserror_to_fuse
    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        return [] if node.symlink else [os.fsencode(n) for n in os.listxattr(_proc(node.fd))]

    @oserror_to_fuse
    async def setxattr(self, inode, name, value, ctx):
        node = self._node(inode)
        if node.symlink:
            raise FUSEError(errno.EPERM)
        os.setxattr(_proc(node.fd), name, value)

    @oserror_to_fuse
    async def removexattr(self, inode, name, ctx):
        node = self._node(inode)
        if node.symlink:
            raise FUSEError(errno.EPERM)
        os.removexattr(_proc(node.fd), name)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()  # returns on unmount or terminate()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="backing directory")
    ap.add_argument("mnt", help="mountpoint")
    ap.add_argument("--ready-file", help="written (JSON: pid, mountpoint) once the mount serves requests")
    ap.add_argument("--allow-other", action=argparse.BooleanOptionalAction, default=True,
                    help="let other users in (default on, as the bench's octofs mounts)")
    ap.add_argument("--fsync-in-loop", action="store_true",
                    help="fsync in the event loop instead of a worker thread (faster for one writer, "
                         "stalls all other requests; octofs uses a worker thread)")
    args = ap.parse_args(argv)
    src, mnt = os.path.abspath(args.src), os.path.abspath(args.mnt)
    os.umask(0)  # the caller's umask arrives in ctx.umask and is applied per request
    ops = RefPassthrough(src, mnt, args.ready_file and os.path.abspath(args.ready_file),
                         fsync_in_loop=args.fsync_in_loop)
    options = {"fsname=" + src, "subtype=refpassthrough", "default_permissions"}
    if args.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mnt, options)
    except RuntimeError as exc:
        print(f"refpassthrough: cannot mount {mnt}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
