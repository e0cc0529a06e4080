"""octofs/apply.py: each op's effect on a replica dir, idempotency, errors, and confinement."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from octofs import apply as apply_mod
from octofs.apply import apply_op, barrier, create_open
from octofs.errors import OpError
from octofs.ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
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
from tests.support.trees import tree_snapshot

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mknod of devices, trusted.* xattrs)")

T1 = 1_500_000_000_000_000_001
T2 = 1_600_000_000_999_999_999


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(root_fd: int, op, **kw) -> None:
    """apply_op, checking that it closes every fd it opened, whether it succeeds or raises."""
    before = _fd_count()
    try:
        apply_op(root_fd, op, **kw)
    finally:
        assert _fd_count() == before, "apply_op leaked an fd"


@pytest.fixture
def replica(tmp_path: Path) -> Path:
    r = tmp_path / "replica"
    r.mkdir()
    return r


@pytest.fixture
def root_fd(replica: Path):
    fd = os.open(replica, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.fixture
def strict_umask():
    """A umask that would strip most bits, to show apply_op does not depend on it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


# -- create / mkdir / mknod / symlink ---------------------------------------------------


def test_create_exact_mode_owner_mtime(replica, root_fd, strict_umask):
    run(root_fd, CreateOp(b"f", 0o666, 0, 0, T1))
    s = os.lstat(replica / "f")
    assert stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o666
    assert s.st_size == 0 and s.st_mtime_ns == T1


@needs_root
def test_create_owner_and_setuid_survive_chown(replica, root_fd):
    # chown clears set-id bits, so the mode must be set after it.
    run(root_fd, CreateOp(b"f", 0o6755, 1234, 5678, T1))
    s = os.lstat(replica / "f")
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (1234, 5678, 0o6755)


def test_create_without_chown_keeps_our_owner(replica, root_fd):
    run(root_fd, CreateOp(b"f", 0o644, 1234, 5678, T1), chown=False)
    s = os.lstat(replica / "f")
    assert (s.st_uid, s.st_gid) == (os.geteuid(), os.getegid())


def test_create_twice_truncates_and_reapplies(replica, root_fd):
    op = CreateOp(b"f", 0o640, os.geteuid(), os.getegid(), T1)
    run(root_fd, op)
    os.link(replica / "f", replica / "g")
    (replica / "f").write_bytes(b"later data")
    os.chmod(replica / "f", 0o777)
    run(root_fd, op)
    s = os.lstat(replica / "f")
    assert (s.st_size, stat.S_IMODE(s.st_mode), s.st_mtime_ns) == (0, 0o640, T1)
    assert s.st_ino == os.lstat(replica / "g").st_ino  # truncated in place: links stay grouped


def test_create_over_dir_or_symlink_fails(replica, root_fd):
    (replica / "d").mkdir()
    (replica / "t").write_bytes(b"keep")
    os.symlink("t", replica / "s")
    with pytest.raises(FileExistsError):
        run(root_fd, CreateOp(b"d", 0o644, 0, 0, T1))
    with pytest.raises(FileExistsError):
        run(root_fd, CreateOp(b"s", 0o644, 0, 0, T1))
    assert (replica / "t").read_bytes() == b"keep"


def test_create_in_missing_dir(root_fd):
    with pytest.raises(FileNotFoundError):
        run(root_fd, CreateOp(b"no/f", 0o644, 0, 0, T1))


def test_create_open_is_apply_op_with_the_fd_kept(replica, root_fd, tmp_path):
    """create_open: the same result as apply_op (first time and replayed), an fd for writing the
    new file, the parent resolved confined; only its own fd is left open, and only on success."""
    (replica / "d").mkdir()
    op = CreateOp(b"d/f", 0o444, os.geteuid(), os.getegid(), T1)
    before = _fd_count()
    for data in (b"first", b"replayed"):
        fd = create_open(root_fd, op)
        try:
            assert _fd_count() == before + 1
            s = os.fstat(fd)
            assert (s.st_size, stat.S_IMODE(s.st_mode), s.st_mtime_ns) == (0, 0o444, T1)
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        assert (replica / "d/f").read_bytes() == data
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, replica / "s")
    for path, exc in ((b"s/f", OSError), (b"d", FileExistsError), (b"../f", OpError)):
        with pytest.raises(exc):
            create_open(root_fd, CreateOp(path, 0o644, 0, 0, T1))
    assert _fd_count() == before and os.listdir(outside) == []


@pytest.mark.parametrize("mode", [0o755, 0o700, 0o1777, 0o2750])
def test_mkdir(replica, root_fd, strict_umask, mode):
    run(root_fd, MkdirOp(b"d", mode, os.geteuid(), os.getegid(), T1))
    s = os.lstat(replica / "d")
    assert stat.S_ISDIR(s.st_mode) and stat.S_IMODE(s.st_mode) == mode and s.st_mtime_ns == T1


@needs_root
def test_mkdir_owner(replica, root_fd):
    run(root_fd, MkdirOp(b"d", 0o755, 42, 43, T1))
    assert (os.lstat(replica / "d").st_uid, os.lstat(replica / "d").st_gid) == (42, 43)


def test_mkdir_twice_keeps_entries(replica, root_fd):
    op = MkdirOp(b"d", 0o750, os.geteuid(), os.getegid(), T1)
    run(root_fd, op)
    (replica / "d" / "x").write_bytes(b"x")
    os.chmod(replica / "d", 0o700)
    run(root_fd, op)
    assert stat.S_IMODE(os.lstat(replica / "d").st_mode) == 0o750
    assert (replica / "d" / "x").read_bytes() == b"x"
    (replica / "f").write_bytes(b"")
    with pytest.raises(FileExistsError):
        run(root_fd, MkdirOp(b"f", 0o750, 0, 0, T1))


def test_mknod_fifo(replica, root_fd, strict_umask):
    op = MknodOp(b"p", stat.S_IFIFO | 0o664, 0, os.geteuid(), os.getegid(), T1)
    run(root_fd, op)
    s = os.lstat(replica / "p")
    assert stat.S_ISFIFO(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o664 and s.st_mtime_ns == T1
    run(root_fd, op)  # same type already there: tolerated
    with pytest.raises(FileExistsError):
        run(root_fd, MknodOp(b"p", stat.S_IFSOCK | 0o664, 0, 0, 0, T1))


@needs_root
def test_mknod_char_device(replica, root_fd):
    run(root_fd, MknodOp(b"null", stat.S_IFCHR | 0o620, os.makedev(1, 3), 7, 8, T1))
    s = os.lstat(replica / "null")
    assert stat.S_ISCHR(s.st_mode) and s.st_rdev == os.makedev(1, 3)
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns) == (0o620, 7, 8, T1)


@pytest.mark.parametrize("mode", [stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777, 0o644, stat.S_IFIFO | 0o1000000])
def test_mknod_refuses_other_types(root_fd, mode):
    with pytest.raises(OpError):
        run(root_fd, MknodOp(b"x", mode, 0, 0, 0, T1))


def test_symlink_verbatim_never_resolved(replica, root_fd):
    target = b"../../\xff\xfenot-utf8/../etc/passwd"
    run(root_fd, SymlinkOp(b"s", target, os.geteuid(), os.getegid(), T1))
    assert os.readlink(os.fsencode(replica / "s")) == target
    assert os.lstat(replica / "s").st_mtime_ns == T1
    run(root_fd, SymlinkOp(b"s", target, os.geteuid(), os.getegid(), T2))  # same target: tolerated
    assert os.lstat(replica / "s").st_mtime_ns == T2
    with pytest.raises(FileExistsError):
        run(root_fd, SymlinkOp(b"s", b"other", 0, 0, T1))
    with pytest.raises(OpError):
        run(root_fd, SymlinkOp(b"n", b"a\0b", 0, 0, T1))


@needs_root
def test_symlink_owner_is_the_links(replica, root_fd):
    (replica / "t").write_bytes(b"")
    run(root_fd, SymlinkOp(b"s", b"t", 11, 12, T1))
    assert (os.lstat(replica / "s").st_uid, os.lstat(replica / "s").st_gid) == (11, 12)
    assert os.lstat(replica / "t").st_uid == 0


# -- link / unlink / rmdir / rename -------------------------------------------------------


def test_link(replica, root_fd):
    (replica / "d").mkdir()
    (replica / "f").write_bytes(b"x")
    run(root_fd, LinkOp(b"f", b"d/g"))
    assert os.lstat(replica / "f").st_ino == os.lstat(replica / "d" / "g").st_ino
    with pytest.raises(FileExistsError):  # not idempotent
        run(root_fd, LinkOp(b"f", b"d/g"))


def test_link_to_symlink_links_the_symlink(replica, root_fd):
    (replica / "t").write_bytes(b"")
    os.symlink("t", replica / "s")
    run(root_fd, LinkOp(b"s", b"h"))
    assert os.path.islink(replica / "h")
    assert os.lstat(replica / "h").st_ino == os.lstat(replica / "s").st_ino
    assert os.lstat(replica / "t").st_nlink == 1


def test_unlink_and_rmdir(replica, root_fd):
    (replica / "d").mkdir()
    (replica / "d" / "f").write_bytes(b"")
    os.symlink("d", replica / "s")
    run(root_fd, UnlinkOp(b"s"))  # the symlink, not what it names
    assert not os.path.lexists(replica / "s") and (replica / "d" / "f").exists()
    with pytest.raises(OSError) as e:
        run(root_fd, RmdirOp(b"d"))
    assert e.value.errno == errno.ENOTEMPTY
    run(root_fd, UnlinkOp(b"d/f"))
    with pytest.raises(FileNotFoundError):  # not idempotent
        run(root_fd, UnlinkOp(b"d/f"))
    with pytest.raises(IsADirectoryError):
        run(root_fd, UnlinkOp(b"d"))
    run(root_fd, RmdirOp(b"d"))
    assert list(replica.iterdir()) == []


def test_rename_replaces(replica, root_fd):
    (replica / "a").write_bytes(b"A")
    (replica / "d").mkdir()
    (replica / "d" / "b").write_bytes(b"B")
    run(root_fd, RenameOp(b"a", b"d/b"))
    assert (replica / "d" / "b").read_bytes() == b"A" and not (replica / "a").exists()
    with pytest.raises(FileNotFoundError):  # not idempotent
        run(root_fd, RenameOp(b"a", b"d/b"))


def test_rename_noreplace(replica, root_fd):
    (replica / "a").write_bytes(b"A")
    (replica / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        run(root_fd, RenameOp(b"a", b"b", RENAME_NOREPLACE))
    assert (replica / "a").read_bytes() == b"A" and (replica / "b").read_bytes() == b"B"
    run(root_fd, RenameOp(b"a", b"c", RENAME_NOREPLACE))
    assert (replica / "c").read_bytes() == b"A" and not (replica / "a").exists()


def test_rename_exchange_file_and_dir(replica, root_fd):
    (replica / "f").write_bytes(b"F")
    (replica / "d").mkdir()
    (replica / "d" / "inner").write_bytes(b"I")
    run(root_fd, RenameOp(b"f", b"d", RENAME_EXCHANGE))
    assert (replica / "d").read_bytes() == b"F"
    assert (replica / "f" / "inner").read_bytes() == b"I"
    run(root_fd, RenameOp(b"f", b"d", RENAME_EXCHANGE))  # twice swaps back
    assert (replica / "f").read_bytes() == b"F"
    with pytest.raises(FileNotFoundError):  # exchange needs both to exist
        run(root_fd, RenameOp(b"f", b"missing", RENAME_EXCHANGE))


def test_rename_exchange_across_dirs(replica, root_fd):
    (replica / "x").mkdir()
    (replica / "y").mkdir()
    (replica / "x" / "a").write_bytes(b"A")
    os.symlink("dangling", replica / "y" / "b")
    run(root_fd, RenameOp(b"x/a", b"y/b", RENAME_EXCHANGE))
    assert os.readlink(replica / "x" / "a") == "dangling"
    assert (replica / "y" / "b").read_bytes() == b"A"


def test_rename_dir_into_itself(replica, root_fd):
    (replica / "d").mkdir()
    with pytest.raises(OSError) as e:
        run(root_fd, RenameOp(b"d", b"d/e"))
    assert e.value.errno == errno.EINVAL


def test_rename_between_hard_links_is_a_noop(replica, root_fd):
    """rename(2): when src and dst are links to one inode, nothing happens and src stays."""
    (replica / "a").write_bytes(b"x")
    os.link(replica / "a", replica / "b")
    run(root_fd, RenameOp(b"a", b"b"))
    assert (replica / "a").exists() and (replica / "b").exists()


# -- data ---------------------------------------------------------------------------------


def test_write(replica, root_fd):
    (replica / "f").write_bytes(b"0123456789")
    run(root_fd, WriteOp(b"f", 2, b"ab", T1))
    assert (replica / "f").read_bytes() == b"01ab456789"
    run(root_fd, WriteOp(b"f", 12, b"\0zz", T2))  # past EOF: a hole of zeros
    assert (replica / "f").read_bytes() == b"01ab456789\0\0\0zz"
    assert os.lstat(replica / "f").st_mtime_ns == T2
    run(root_fd, WriteOp(b"f", 12, b"\0zz", T2))  # twice: harmless
    assert (replica / "f").read_bytes() == b"01ab456789\0\0\0zz"


def test_write_empty_sets_only_mtime(replica, root_fd):
    (replica / "f").write_bytes(b"abc")
    run(root_fd, WriteOp(b"f", 100, b"", T1))
    assert (replica / "f").read_bytes() == b"abc" and os.lstat(replica / "f").st_mtime_ns == T1


def test_write_keeps_atime(replica, root_fd):
    (replica / "f").write_bytes(b"abc")
    os.utime(replica / "f", ns=(T1, T1))
    run(root_fd, WriteOp(b"f", 0, b"x", T2))
    s = os.lstat(replica / "f")
    assert (s.st_atime_ns, s.st_mtime_ns) == (T1, T2)


def test_write_large(replica, root_fd):
    (replica / "f").write_bytes(b"")
    data = os.urandom(3 << 20)
    run(root_fd, WriteOp(b"f", 5, data, T1))
    assert (replica / "f").read_bytes() == b"\0" * 5 + data


def test_write_wrong_kinds(replica, root_fd):
    (replica / "d").mkdir()
    (replica / "t").write_bytes(b"t")
    os.symlink("t", replica / "s")
    os.mkfifo(replica / "p")
    with pytest.raises(IsADirectoryError):
        run(root_fd, WriteOp(b"d", 0, b"x", T1))
    with pytest.raises(OSError) as e:
        run(root_fd, WriteOp(b"s", 0, b"x", T1))
    assert e.value.errno == errno.ELOOP
    with pytest.raises(OpError):  # and does not block on the FIFO
        run(root_fd, WriteOp(b"p", 0, b"x", T1))
    with pytest.raises(OpError):
        run(root_fd, TruncateOp(b"p", 0, T1))
    with pytest.raises(FileNotFoundError):
        run(root_fd, WriteOp(b"missing", 0, b"x", T1))
    assert (replica / "t").read_bytes() == b"t"


@needs_root
def test_write_to_device_node_refused(replica, root_fd):
    os.mknod(replica / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(OpError):
        run(root_fd, WriteOp(b"null", 0, b"x", T1))
    with pytest.raises(OpError):
        run(root_fd, FsyncOp(b"null"))


def test_truncate(replica, root_fd):
    (replica / "f").write_bytes(b"0123456789")
    run(root_fd, TruncateOp(b"f", 4, T1))
    assert (replica / "f").read_bytes() == b"0123" and os.lstat(replica / "f").st_mtime_ns == T1
    run(root_fd, TruncateOp(b"f", 6, T2))
    assert (replica / "f").read_bytes() == b"0123\0\0" and os.lstat(replica / "f").st_mtime_ns == T2
    run(root_fd, TruncateOp(b"f", 6, T2))
    assert (replica / "f").read_bytes() == b"0123\0\0"


# -- attributes -----------------------------------------------------------------------------


def test_setattr_mode_only(replica, root_fd, strict_umask):
    (replica / "f").write_bytes(b"")
    os.utime(replica / "f", ns=(T1, T1))
    run(root_fd, SetattrOp(b"f", mode=0o4751))
    s = os.lstat(replica / "f")
    assert stat.S_IMODE(s.st_mode) == 0o4751 and (s.st_atime_ns, s.st_mtime_ns) == (T1, T1)


def test_setattr_times_separately(replica, root_fd):
    (replica / "f").write_bytes(b"")
    os.utime(replica / "f", ns=(T1, T1))
    run(root_fd, SetattrOp(b"f", mtime_ns=T2))
    s = os.lstat(replica / "f")
    assert (s.st_atime_ns, s.st_mtime_ns) == (T1, T2)
    run(root_fd, SetattrOp(b"f", atime_ns=T2 + 1))
    s = os.lstat(replica / "f")
    assert (s.st_atime_ns, s.st_mtime_ns) == (T2 + 1, T2)


def test_setattr_pre_epoch_mtime(replica, root_fd):
    (replica / "f").write_bytes(b"")
    run(root_fd, SetattrOp(b"f", mtime_ns=-1_500_000_001))
    assert os.lstat(replica / "f").st_mtime_ns == -1_500_000_001


def test_setattr_time_out_of_range(replica, root_fd):
    (replica / "f").write_bytes(b"")
    with pytest.raises(OpError):
        run(root_fd, SetattrOp(b"f", mtime_ns=2**64 * 10**9))


def test_setattr_on_symlink_touches_only_the_link(replica, root_fd):
    (replica / "t").write_bytes(b"")
    os.chmod(replica / "t", 0o600)
    os.utime(replica / "t", ns=(T1, T1))
    os.symlink("t", replica / "s")
    run(root_fd, SetattrOp(b"s", mode=0o777, mtime_ns=T2))  # mode skipped: symlinks have none
    t = os.lstat(replica / "t")
    assert stat.S_IMODE(t.st_mode) == 0o600 and t.st_mtime_ns == T1
    assert os.lstat(replica / "s").st_mtime_ns == T2


@needs_root
def test_setattr_owner(replica, root_fd):
    (replica / "f").write_bytes(b"")
    run(root_fd, SetattrOp(b"f", uid=100))
    assert (os.lstat(replica / "f").st_uid, os.lstat(replica / "f").st_gid) == (100, 0)
    run(root_fd, SetattrOp(b"f", gid=200))
    assert (os.lstat(replica / "f").st_uid, os.lstat(replica / "f").st_gid) == (100, 200)
    run(root_fd, SetattrOp(b"f", uid=300, gid=400), chown=False)
    assert os.lstat(replica / "f").st_uid == 100


def test_setattr_root(replica, root_fd):
    run(root_fd, SetattrOp(b"", mode=0o751, mtime_ns=T1))
    s = os.lstat(replica)
    assert stat.S_IMODE(s.st_mode) == 0o751 and s.st_mtime_ns == T1


def test_setattr_bad_mode(replica, root_fd):
    (replica / "f").write_bytes(b"")
    with pytest.raises(OpError):
        run(root_fd, SetattrOp(b"f", mode=0o100644))


def test_xattrs(replica, root_fd):
    (replica / "f").write_bytes(b"")
    (replica / "d").mkdir()
    value = b"\0binary\xff" * 10
    run(root_fd, SetxattrOp(b"f", b"user.a", value))
    run(root_fd, SetxattrOp(b"f", b"user.a", value))  # twice: harmless
    run(root_fd, SetxattrOp(b"d", b"user.b", b""))
    run(root_fd, SetxattrOp(b"", b"user.root", b"r"))
    assert os.getxattr(replica / "f", b"user.a") == value
    assert os.getxattr(replica / "d", b"user.b") == b""
    assert os.getxattr(replica, b"user.root") == b"r"
    run(root_fd, SetxattrOp(b"f", b"user.a", b"new"))
    assert os.getxattr(replica / "f", b"user.a") == b"new"
    run(root_fd, RemovexattrOp(b"f", b"user.a"))
    run(root_fd, RemovexattrOp(b"f", b"user.a"))  # twice: harmless (ENODATA is "removed")
    assert os.listxattr(replica / "f") == []
    with pytest.raises(FileNotFoundError):
        run(root_fd, RemovexattrOp(b"missing", b"user.a"))


def test_user_xattr_on_symlink_is_refused_by_the_kernel(replica, root_fd):
    (replica / "t").write_bytes(b"")
    os.symlink("t", replica / "s")
    with pytest.raises(PermissionError):
        run(root_fd, SetxattrOp(b"s", b"user.a", b"v"))
    assert os.listxattr(replica / "t") == []


@needs_root
def test_trusted_xattr_on_symlink_and_fifo(replica, root_fd):
    (replica / "t").write_bytes(b"")
    os.symlink("t", replica / "s")
    os.mkfifo(replica / "p")
    run(root_fd, SetxattrOp(b"s", b"trusted.a", b"on-link"))
    run(root_fd, SetxattrOp(b"p", b"trusted.a", b"on-fifo"))
    assert os.getxattr(replica / "s", b"trusted.a", follow_symlinks=False) == b"on-link"
    assert os.getxattr(replica / "p", b"trusted.a") == b"on-fifo"
    assert os.listxattr(replica / "t") == []
    run(root_fd, RemovexattrOp(b"s", b"trusted.a"))
    assert os.listxattr(replica / "s", follow_symlinks=False) == []


# -- fsync and barrier ------------------------------------------------------------------------


@pytest.fixture
def fsync_calls(monkeypatch):
    calls: list[tuple[str, int]] = []

    def recorder(kind):
        def fake(fd):
            calls.append((kind, os.fstat(fd).st_ino))

        return fake

    monkeypatch.setattr(os, "fsync", recorder("fsync"))
    monkeypatch.setattr(os, "fdatasync", recorder("fdatasync"))
    return calls


def test_fsync_file_dir_and_root(replica, root_fd, fsync_calls):
    (replica / "d").mkdir()
    (replica / "d" / "f").write_bytes(b"x")
    run(root_fd, FsyncOp(b"d/f"))
    run(root_fd, FsyncOp(b"d/f", datasync=True))
    run(root_fd, FsyncOp(b"d"))
    run(root_fd, FsyncOp(b""))
    ino = lambda p: os.lstat(p).st_ino
    assert fsync_calls == [
        ("fsync", ino(replica / "d" / "f")),
        ("fdatasync", ino(replica / "d" / "f")),
        ("fsync", ino(replica / "d")),
        ("fsync", ino(replica)),
    ]


def test_fsync_real(replica, root_fd):
    (replica / "f").write_bytes(b"x")
    run(root_fd, FsyncOp(b"f"))
    run(root_fd, FsyncOp(b"", datasync=True))


def test_fsync_wrong_kinds(replica, root_fd, fsync_calls):
    (replica / "t").write_bytes(b"x")
    os.symlink("t", replica / "s")
    os.mkfifo(replica / "p")
    with pytest.raises(OSError) as e:
        run(root_fd, FsyncOp(b"s"))
    assert e.value.errno == errno.ELOOP
    with pytest.raises(OpError):
        run(root_fd, FsyncOp(b"p"))
    with pytest.raises(FileNotFoundError):
        run(root_fd, FsyncOp(b"missing"))
    assert fsync_calls == []


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_PATH], ids=["rdonly", "o_path"])
def test_barrier_syncs_the_replica_fs(replica, monkeypatch, flags):
    fd = os.open(replica, flags | os.O_DIRECTORY)
    try:
        barrier(fd)  # the real syscall, with either kind of fd
        seen: list[int] = []
        real = apply_mod._syncfs

        def spy(f):
            seen.append(os.fstat(f).st_ino)
            return real(f)

        monkeypatch.setattr(apply_mod, "_syncfs", spy)
        barrier(fd)
        assert seen and seen[-1] == os.lstat(replica).st_ino
    finally:
        os.close(fd)


def test_barrier_falls_back_to_sync(replica, root_fd, monkeypatch):
    called = []
    monkeypatch.setattr(apply_mod, "_syncfs", None)
    monkeypatch.setattr(os, "sync", lambda: called.append(True))
    barrier(root_fd)
    assert called == [True]


def test_barrier_bad_fd():
    with pytest.raises(OSError) as e:
        barrier(-1)
    assert e.value.errno == errno.EBADF


def test_deep_paths_close_every_fd(replica, root_fd):
    """run() checks the fd count; paths with several intermediate directories exercise the walk."""
    (replica / "a" / "b" / "c").mkdir(parents=True)
    (replica / "a" / "b" / "file").write_bytes(b"")
    run(root_fd, CreateOp(b"a/b/c/f", 0o644, 0, 0, T1))
    run(root_fd, WriteOp(b"a/b/c/f", 0, b"deep", T1))
    run(root_fd, LinkOp(b"a/b/c/f", b"a/b/c/g"))
    run(root_fd, RenameOp(b"a/b/c/g", b"a/b/h", RENAME_NOREPLACE))
    assert (replica / "a" / "b" / "h").read_bytes() == b"deep"
    with pytest.raises(FileNotFoundError):
        run(root_fd, WriteOp(b"a/b/missing/f", 0, b"x", T1))
    with pytest.raises(NotADirectoryError):
        run(root_fd, WriteOp(b"a/b/file/c/f", 0, b"x", T1))
    with pytest.raises(FileNotFoundError):
        run(root_fd, RenameOp(b"a/b/c/f", b"a/b/missing/f"))


@pytest.mark.parametrize("path", [b"a/../b", b"a/./b", b"a//b", b"/a", b"..", b"a\0b", b"a\0/b"])
def test_walk_refuses_escapes_without_validate(root_fd, path):
    """The walk checks components itself, even if a caller skipped ops.validate."""
    with pytest.raises(OpError):
        apply_mod.open_parent(root_fd, path)


# -- malformed ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        CreateOp(b"", 0o644, 0, 0, T1),
        CreateOp(b"/etc/x", 0o644, 0, 0, T1),
        CreateOp(b"a/../b", 0o644, 0, 0, T1),
        CreateOp(b"./b", 0o644, 0, 0, T1),
        CreateOp(b"a//b", 0o644, 0, 0, T1),
        CreateOp(b"a\0b", 0o644, 0, 0, T1),
        CreateOp("str", 0o644, 0, 0, T1),
        CreateOp(b"f", 0o10644, 0, 0, T1),
        MkdirOp(b"d", 0o20755, 0, 0, T1),
        RenameOp(b"a", b"b", 4),
        RenameOp(b"", b"b"),
        LinkOp(b"../x", b"y"),
        UnlinkOp(b""),
        SetxattrOp(b"f", b"", b"v"),
        WriteOp(b"f", -1, b"x", T1),
        "not an op",
    ],
    ids=repr,
)
def test_bad_ops_raise_operror_and_touch_nothing(replica, root_fd, op):
    (replica / "a").mkdir()
    (replica / "f").write_bytes(b"")
    before = tree_snapshot(replica, mtime=True)
    with pytest.raises(OpError):
        run(root_fd, op)
    assert tree_snapshot(replica, mtime=True) == before


# -- confinement --------------------------------------------------------------------------------

ESCAPE = f"octofs-escape-{uuid.uuid4().hex}".encode()


@pytest.fixture
def attack(tmp_path: Path):
    """A replica dir beside a sentinel dir, with symlinks inside the replica pointing out.

    Returns (replica, root_fd, check) where check() asserts the sentinel is untouched.
    """
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "sub").mkdir()
    (sentinel / "secret").write_bytes(b"secret bytes")
    os.chmod(sentinel / "secret", 0o640)
    os.setxattr(sentinel / "secret", b"user.keep", b"1")
    (sentinel / "sub" / "inner").write_bytes(b"inner")
    replica = tmp_path / "replica"
    replica.mkdir()
    (replica / "d").mkdir()
    (replica / "f").write_bytes(b"f")
    os.symlink("../sentinel", replica / "out")
    os.symlink(sentinel, replica / "abs")
    os.symlink("/", replica / "rootlink")
    os.symlink("../sentinel/secret", replica / "secretlink")
    os.symlink("..", replica / "d" / "up")
    os.symlink("../../sentinel", replica / "d" / "out2")

    def state():
        stats = {}
        for rel in tree_snapshot(sentinel):
            s = os.lstat(os.path.join(os.fsencode(sentinel), rel) if rel else sentinel)
            # ctime moves on any change (chmod, chown, xattr, link count, rename).
            stats[rel] = (s.st_ino, s.st_ctime_ns, s.st_mtime_ns, s.st_nlink)
        return tree_snapshot(sentinel, mtime=True), stats

    before = state()
    fd = os.open(replica, os.O_RDONLY | os.O_DIRECTORY)

    def check():
        after = state()
        assert after[0] == before[0]
        assert after[1] == before[1]
        assert not os.path.lexists(b"/tmp/" + ESCAPE)
        assert not os.path.lexists(os.fsencode(tmp_path) + b"/" + ESCAPE)
        assert not os.path.lexists(os.fsencode(sentinel) + b"/" + ESCAPE)
        try:
            assert os.getxattr("/", b"user." + ESCAPE) is None
        except OSError as exc:
            assert exc.errno in (errno.ENODATA, errno.ENOTSUP)

    yield replica, fd, check
    os.close(fd)


E = ESCAPE
SECRET_ABS = b"/sentinel/secret"
# (ops, what the last one raises or None); every earlier op must succeed.
ATTACKS = [
    # intermediate symlinks pointing out: never followed
    ([WriteOp(b"out/secret", 0, b"pwned", T1)], OSError),
    ([WriteOp(b"abs/secret", 0, b"pwned", T1)], OSError),
    ([WriteOp(b"d/out2/secret", 0, b"pwned", T1)], OSError),
    ([TruncateOp(b"d/up/out/secret", 0, T1)], OSError),
    ([CreateOp(b"out/" + E, 0o644, 0, 0, T1)], OSError),
    ([CreateOp(b"rootlink/tmp/" + E, 0o644, 0, 0, T1)], OSError),
    ([MkdirOp(b"abs/" + E, 0o755, 0, 0, T1)], OSError),
    ([MknodOp(b"out/" + E, stat.S_IFIFO | 0o644, 0, 0, 0, T1)], OSError),
    ([SymlinkOp(b"out/" + E, b"x", 0, 0, T1)], OSError),
    ([LinkOp(b"out/secret", b"stolen")], OSError),
    ([LinkOp(b"f", b"out/" + E)], OSError),
    ([RenameOp(b"out/secret", b"stolen")], OSError),
    ([RenameOp(b"f", b"d/out2/" + E)], OSError),
    ([RenameOp(b"f", b"abs/secret", RENAME_EXCHANGE)], OSError),
    ([UnlinkOp(b"out/secret")], OSError),
    ([RmdirOp(b"out/sub")], OSError),
    ([RmdirOp(b"out")], OSError),
    ([SetattrOp(b"out/secret", mode=0o777)], OSError),
    ([SetattrOp(b"d/up/secretlink", mtime_ns=T1)], OSError),
    ([SetxattrOp(b"out/secret", b"user.x", b"1")], OSError),
    ([RemovexattrOp(b"abs/secret", b"user.keep")], OSError),
    ([FsyncOp(b"out/secret")], OSError),
    ([SetxattrOp(b"rootlink/tmp", b"user." + E, b"1")], OSError),
    # a symlink as the last component: acted on itself, or refused, never followed
    ([WriteOp(b"secretlink", 0, b"pwned", T1)], OSError),
    ([TruncateOp(b"secretlink", 0, T1)], OSError),
    ([CreateOp(b"secretlink", 0o777, 0, 0, T1)], OSError),
    ([MkdirOp(b"out", 0o777, 0, 0, T1)], OSError),
    ([SetattrOp(b"secretlink", mode=0o777, mtime_ns=T1)], None),
    ([SetattrOp(b"out", mode=0o777, atime_ns=T1, mtime_ns=T1)], None),
    ([SetattrOp(b"secretlink", uid=0, gid=0)], None),
    ([SetxattrOp(b"secretlink", b"user.x", b"1")], OSError),  # EPERM: user.* not on symlinks
    ([SetxattrOp(b"rootlink", b"user." + E, b"1")], OSError),
    ([SetxattrOp(b"secretlink", b"trusted.x", b"1")], None if IS_ROOT else OSError),
    ([RemovexattrOp(b"secretlink", b"user.keep")], OSError),
    ([FsyncOp(b"secretlink")], OSError),
    ([UnlinkOp(b"secretlink")], None),
    ([UnlinkOp(b"rootlink")], None),
    ([LinkOp(b"secretlink", b"d/alias"), WriteOp(b"d/alias", 0, b"pwned", T1)], OSError),
    ([RenameOp(b"f", b"secretlink")], None),
    ([RenameOp(b"secretlink", b"out", RENAME_EXCHANGE), WriteOp(b"secretlink/secret", 0, b"x", T1)], OSError),
    ([RenameOp(b"d", b"out", RENAME_EXCHANGE), CreateOp(b"d/" + E, 0o644, 0, 0, T1)], OSError),
    ([SymlinkOp(b"new", b"../sentinel/secret", 0, 0, T1), WriteOp(b"new", 0, b"pwned", T1)], OSError),
    ([SymlinkOp(b"new", b"/", 0, 0, T1), MkdirOp(b"new/tmp/" + E, 0o755, 0, 0, T1)], OSError),
    # names that are not vault-relative: refused before any syscall
    ([WriteOp(b"../sentinel/secret", 0, b"pwned", T1)], OpError),
    ([WriteOp(b"d/../../sentinel/secret", 0, b"pwned", T1)], OpError),
    ([CreateOp(b"..", 0o644, 0, 0, T1)], OpError),
    ([UnlinkOp(b"/tmp/" + E)], OpError),
    ([SetattrOp(b"/", mode=0o700)], OpError),
    ([WriteOp(b"f\0/../../sentinel/secret", 0, b"pwned", T1)], OpError),
    ([RenameOp(b"f", b"../" + E)], OpError),
    ([LinkOp(b"../sentinel/secret", b"stolen")], OpError),
]


@pytest.mark.parametrize("ops, raises", ATTACKS, ids=[repr(ops[-1])[:90] for ops, _ in ATTACKS])
def test_confinement(attack, ops, raises):
    _replica, root_fd, check = attack
    for op in ops[:-1]:
        run(root_fd, op)
    if raises is None:
        run(root_fd, ops[-1])
    else:
        with pytest.raises(raises):
            run(root_fd, ops[-1])
    check()


def test_confinement_absolute_path_of_sentinel(attack, tmp_path):
    _replica, root_fd, check = attack
    with pytest.raises(OpError):
        run(root_fd, WriteOp(os.fsencode(tmp_path) + SECRET_ABS, 0, b"pwned", T1))
    check()


_NAMES = [b"out", b"abs", b"secretlink", b"d", b"up", b"out2", b"f", b"secret", b"sub", b"inner", b"new", b".."]
_paths = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4).map(b"/".join)
_ns = st.integers(0, 2**62)
_ops = st.one_of(
    st.builds(WriteOp, _paths, st.integers(0, 100), st.binary(max_size=8), _ns),
    st.builds(TruncateOp, _paths, st.integers(0, 100), _ns),
    st.builds(CreateOp, _paths, st.integers(0, 0o7777), st.just(0), st.just(0), _ns),
    st.builds(MkdirOp, _paths, st.integers(0, 0o7777), st.just(0), st.just(0), _ns),
    st.builds(MknodOp, _paths, st.sampled_from([stat.S_IFIFO | 0o644, stat.S_IFREG | 0o600]), st.just(0),
              st.just(0), st.just(0), _ns),
    st.builds(SymlinkOp, _paths, st.sampled_from([b"../sentinel", b"/", b"..", b"f"]), st.just(0), st.just(0), _ns),
    st.builds(LinkOp, _paths, _paths),
    st.builds(UnlinkOp, _paths),
    st.builds(RmdirOp, _paths),
    st.builds(RenameOp, _paths, _paths, st.sampled_from([0, RENAME_NOREPLACE, RENAME_EXCHANGE])),
    st.builds(SetattrOp, _paths, st.none() | st.integers(0, 0o7777), st.none() | st.just(0), st.none(),
              st.none() | _ns, st.none() | _ns),
    st.builds(SetxattrOp, _paths, st.sampled_from([b"user.x", b"user.keep", b"trusted.x"]), st.binary(max_size=4)),
    st.builds(RemovexattrOp, _paths, st.sampled_from([b"user.x", b"user.keep", b"trusted.x"])),
    st.builds(FsyncOp, _paths, st.booleans()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_ops, min_size=1, max_size=6))
def test_confinement_fuzz(tmp_path_factory, ops):
    """Random op sequences over names that lead out of the replica never change the sentinel.

    No symlink to / here: a confinement bug must not be able to damage this machine.
    """
    base = tmp_path_factory.mktemp("fuzz")
    sentinel = base / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "secret").write_bytes(b"secret")
    os.setxattr(sentinel / "secret", b"user.keep", b"1")
    (sentinel / "sub" / "inner").write_bytes(b"inner")
    replica = base / "replica"
    (replica / "d").mkdir(parents=True)
    (replica / "f").write_bytes(b"f")
    os.symlink("../sentinel", replica / "out")
    os.symlink(sentinel, replica / "abs")
    os.symlink("../sentinel/secret", replica / "secretlink")
    os.symlink("..", replica / "d" / "up")
    os.symlink("../../sentinel", replica / "d" / "out2")
    before = tree_snapshot(sentinel, mtime=True)
    ctimes = {p: os.lstat(p).st_ctime_ns for p in (sentinel, sentinel / "secret", sentinel / "sub")}
    fd = os.open(replica, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for op in ops:
            try:
                run(fd, op)
            except (OpError, OSError):
                pass
    finally:
        os.close(fd)
    assert tree_snapshot(sentinel, mtime=True) == before
    assert {p: os.lstat(p).st_ctime_ns for p in ctimes} == ctimes
    assert set(os.listdir(base)) == {"sentinel", "replica"}


# -- open_data / apply_data: a data op through an fd the caller keeps (replica.py's runs) ----------


def _open_data_refusal(root_fd, op):
    """What open_data raises for ``op`` (checking it leaks no fd), and that apply_op raises the same."""
    before = _fd_count()
    with pytest.raises((OSError, OpError)) as got:
        apply_mod.open_data(root_fd, op)
    assert _fd_count() == before, "open_data leaked an fd"
    with pytest.raises(type(got.value)):
        run(root_fd, op)
    return got.value


def test_open_data_is_as_confined_as_apply_op(replica, root_fd, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"keep")
    (replica / "link").symlink_to(outside)
    (replica / "flink").symlink_to(outside / "f")
    os.mkfifo(replica / "fifo")
    (replica / "dir").mkdir()
    for path in (b"link/f", b"flink"):
        exc = _open_data_refusal(root_fd, WriteOp(path, 0, b"X", T1))
        assert isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.ENOTDIR)
    assert isinstance(_open_data_refusal(root_fd, TruncateOp(b"fifo", 0, T1)), OpError)
    assert isinstance(_open_data_refusal(root_fd, WriteOp(b"dir", 0, b"X", T1)), IsADirectoryError)
    assert isinstance(_open_data_refusal(root_fd, WriteOp(b"../outside/f", 0, b"X", T1)), OpError)
    assert (outside / "f").read_bytes() == b"keep"


def test_apply_data_then_set_mtime_equals_apply_op(replica, root_fd, tmp_path):
    ops = [WriteOp(b"f", 5, b"hello", T1), TruncateOp(b"f", 7, T1 + 1), WriteOp(b"f", 0, b"ab", T2)]
    other = tmp_path / "other"
    other.mkdir()
    (replica / "f").write_bytes(b"0123456789")
    (other / "f").write_bytes(b"0123456789")
    fd = apply_mod.open_data(root_fd, ops[0])
    try:
        for op in ops:
            apply_mod.apply_data(fd, op)
        apply_mod.set_mtime(fd, ops[-1].mtime_ns, b"f")
    finally:
        os.close(fd)
    ofd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for op in ops:
            run(ofd, op)
    finally:
        os.close(ofd)
    assert tree_snapshot(replica, mtime=True) == tree_snapshot(other, mtime=True)
    assert (replica / "f").read_bytes() == b"ab234he"


@pytest.mark.parametrize("op", [WriteOp(b"f", -1, b"x", T1), WriteOp(b"f", 0, "str", T1),  # type: ignore[arg-type]
                                TruncateOp(b"f", -5, T1), WriteOp(b"f", 0, b"x", True),  # type: ignore[arg-type]
                                WriteOp(b"f", 0, b"x", 2**64 * 10**9)])
def test_apply_data_refuses_what_apply_op_refuses(replica, root_fd, op):
    (replica / "f").write_bytes(b"keep")
    fd = apply_mod.open_data(root_fd, TruncateOp(b"f", 0, T1))
    try:
        with pytest.raises(OpError):
            apply_mod.apply_data(fd, op)
    finally:
        os.close(fd)
    assert (replica / "f").read_bytes() == b"keep"  # refused before anything is written
    with pytest.raises(OpError):
        run(root_fd, op)
