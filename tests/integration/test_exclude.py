"""vault.yaml ``exclude`` on a real mount (issue 3).

Excluded paths work normally on the primary, but the journal holds exactly what
targets get: replaying it into an empty directory gives the backing dir *minus*
the excluded paths. Every test checks that at one or more points, with
``assert_replica_is_backing_minus_excluded``, while the mount is still live (the
journal reader can follow a writer) and once more after unmounting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import stat
from pathlib import Path

import pytest

from octofs.journal import JournalReader
from octofs.ops import WriteOp
from tests.support.daemons import mounted, write_vault_yaml
from tests.support.replay import replay_journal
from tests.support.trees import diff_snapshots, snapshot_minus_excluded, tree_snapshot

pytestmark = pytest.mark.fuse

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_replicas = itertools.count()


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def assert_replica_is_backing_minus_excluded(m, patterns: list[str]) -> Path:
    """Replay the whole journal into a fresh dir; it must equal the backing dir minus excluded paths."""
    replica = m.backing.parent / f"replica{next(_replicas)}"
    replay_journal(m.journal_dir, replica)
    lines = diff_snapshots(snapshot_minus_excluded(m.backing, patterns), tree_snapshot(replica, mtime=True))
    assert not lines, "replica differs from backing minus excluded (a=backing, b=replica):\n" + "\n".join(lines)
    return replica


def journaled_paths(m) -> list[bytes]:
    out = []
    for rec in JournalReader(m.journal_dir).records():
        for field in ("path", "src"):
            value = getattr(rec.op, field, None)
            if value is not None:
                out.append(value)
    return out


def write_file(path: Path, data: bytes, *, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def mount(tmp_path: Path, patterns: list[str]):
    return mounted(write_vault_yaml(tmp_path, extra={"exclude": patterns}))


# -- the save pattern ------------------------------------------------------------------

def test_save_by_rename_arrives_with_full_content(tmp_path: Path) -> None:
    patterns = ["*.tmp"]
    big = os.urandom(1 << 20) + bytes(3 << 20) + os.urandom((1 << 20) + 12345)  # data, a hole, data
    with mount(tmp_path, patterns) as m:
        (m.mnt / "doc.txt").write_bytes(b"old version\n")
        other = m.mnt / "other.txt"
        os.link(m.mnt / "doc.txt", other)  # the replaced file keeps its other name
        tmp = m.mnt / "doc.tmp"
        write_file(tmp, big, fsync=True)
        os.chmod(tmp, 0o640)
        os.chown(tmp, 1234, 5678)
        os.setxattr(tmp, "user.origin", b"editor")
        os.utime(tmp, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
        os.rename(tmp, m.mnt / "doc.txt")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "doc.txt").read_bytes() == big
        assert (replica / "other.txt").read_bytes() == b"old version\n"
        st = os.lstat(replica / "doc.txt")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
        assert os.getxattr(replica / "doc.txt", "user.origin") == b"editor"

        # Saved again: the included file is replaced atomically on the target too.
        write_file(m.mnt / "doc.tmp", b"third\n", fsync=True)
        os.rename(m.mnt / "doc.tmp", m.mnt / "doc.txt")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "doc.txt").read_bytes() == b"third\n"
    assert m.proc.returncode == 0
    assert_replica_is_backing_minus_excluded(m, patterns)
    paths = journaled_paths(m)
    assert not [p for p in paths if p.endswith(b".tmp")], "an op names an excluded path"
    writes = [r.op for r in JournalReader(m.journal_dir).records() if isinstance(r.op, WriteOp)]
    assert max(len(w.data) for w in writes) <= 1 << 20
    assert sum(len(w.data) for w in writes) < len(big)  # the hole was not shipped as zeros


def test_rename_to_excluded_name_disappears(tmp_path: Path) -> None:
    patterns = ["*.tmp", "*.bak/"]
    with mount(tmp_path, patterns) as m:
        (m.mnt / "doc.txt").write_bytes(b"x" * 1000)
        d = m.mnt / "dir"
        (d / "sub" / "deeper").mkdir(parents=True)
        (d / "a").write_bytes(b"a")
        (d / "sub" / "b").write_bytes(b"b")
        (d / "sub" / "deeper" / "c").write_bytes(b"c")
        (d / "sub" / "skip.tmp").write_bytes(b"never shipped")
        os.symlink("a", d / "link")
        os.mkfifo(d / "sub" / "fifo")
        assert_replica_is_backing_minus_excluded(m, patterns)

        os.rename(m.mnt / "doc.txt", m.mnt / "doc.txt.tmp")
        os.rename(d, m.mnt / "dir.bak")  # a directory-only pattern
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert not (replica / "doc.txt").exists() and not (replica / "dir").exists()
        assert os.listdir(replica) == []

        # and back again
        os.rename(m.mnt / "doc.txt.tmp", m.mnt / "doc.txt")
        os.rename(m.mnt / "dir.bak", m.mnt / "dir")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "dir" / "sub" / "deeper" / "c").read_bytes() == b"c"
        assert not (replica / "dir" / "sub" / "skip.tmp").exists()
    assert_replica_is_backing_minus_excluded(m, patterns)


# -- directories across the boundary -----------------------------------------------------

def _populate(root: Path) -> None:
    """A tree with every kind of entry, odd modes, owners, xattrs, hard links and an excluded file."""
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "plain").write_bytes(b"plain\n" * 100)
    (root / "empty-file").write_bytes(b"")
    (root / "sub" / "big").write_bytes(os.urandom(2_500_000))
    (root / "sub" / "obj.o").write_bytes(b"excluded inside")
    os.chmod(root / "plain", 0o600)
    os.chmod(root / "sub", 0o750)
    (root / "setid").write_bytes(b"#!/bin/sh\n")
    os.chown(root / "setid", 1234, 5678)
    os.chmod(root / "setid", 0o6755)
    os.setxattr(root / "plain", "user.k", b"v1")
    os.setxattr(root / "sub", "user.dir", b"attr on a directory")
    os.symlink("../plain", root / "sub" / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.lchown(root / "dangling", 1234, 5678)
    os.mkfifo(root / "sub" / "fifo", 0o640)
    os.link(root / "plain", root / "sub" / "plain-link")
    os.utime(root / "empty-file", ns=(1, 2_000_000_000))


def test_excluded_directory_renamed_in_and_out(tmp_path: Path) -> None:
    patterns = ["scratch/", "*.o"]
    with mount(tmp_path, patterns) as m:
        scratch = m.mnt / "scratch"
        scratch.mkdir()
        _populate(scratch)
        (m.mnt / "keep").write_bytes(b"keep")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert sorted(os.listdir(replica)) == ["keep"]

        os.rename(scratch, m.mnt / "real")  # excluded -> included: the whole subtree arrives
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "real" / "sub" / "big").stat().st_size == 2_500_000
        assert not (replica / "real" / "sub" / "obj.o").exists()
        assert os.lstat(replica / "real" / "plain").st_ino == os.lstat(replica / "real" / "sub" / "plain-link").st_ino

        os.rename(m.mnt / "real" / "sub", m.mnt / "scratch")  # part of it goes back out
        assert_replica_is_backing_minus_excluded(m, patterns)
        os.rename(m.mnt / "real", m.mnt / "scratch" / "real")  # all of it, nested
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert sorted(os.listdir(replica)) == ["keep"]

        os.rename(m.mnt / "scratch", m.mnt / "back")  # in again, with everything below
        assert_replica_is_backing_minus_excluded(m, patterns)
        (m.mnt / "back" / "real" / "plain").write_bytes(b"changed after arriving")
        assert_replica_is_backing_minus_excluded(m, patterns)
    assert_replica_is_backing_minus_excluded(m, patterns)


def test_excluded_directory_replaces_empty_included_one(tmp_path: Path) -> None:
    patterns = ["*.new"]
    with mount(tmp_path, patterns) as m:
        (m.mnt / "site").mkdir()
        (m.mnt / "site.new" / "css").mkdir(parents=True)
        (m.mnt / "site.new" / "index.html").write_bytes(b"<html>")
        (m.mnt / "site.new" / "css" / "a.css").write_bytes(b"body{}")
        os.rename(m.mnt / "site.new", m.mnt / "site")  # over an empty directory
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "site" / "css" / "a.css").read_bytes() == b"body{}"
        with pytest.raises(OSError):  # NOREPLACE onto an existing name fails, as natively
            renameat2(m.mnt / "site", m.mnt / "site", RENAME_NOREPLACE)
        (m.mnt / "other.new").write_bytes(b"n")
        renameat2(m.mnt / "other.new", m.mnt / "other", RENAME_NOREPLACE)
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "other").read_bytes() == b"n"


def test_rename_exchange_across_the_boundary(tmp_path: Path) -> None:
    patterns = ["*.tmp"]
    with mount(tmp_path, patterns) as m:
        mnt = m.mnt
        (mnt / "a.tmp").write_bytes(b"excluded content")
        (mnt / "b").write_bytes(b"included content")
        renameat2(mnt / "a.tmp", mnt / "b", RENAME_EXCHANGE)
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "b").read_bytes() == b"excluded content"

        # an excluded directory swapped with an included, non-empty directory
        (mnt / "d.tmp" / "x").mkdir(parents=True)
        (mnt / "d.tmp" / "x" / "f").write_bytes(b"from d.tmp")
        (mnt / "d" / "y").mkdir(parents=True)
        (mnt / "d" / "y" / "g").write_bytes(b"from d")
        renameat2(mnt / "d.tmp", mnt / "d", RENAME_EXCHANGE)
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert os.listdir(replica / "d") == ["x"]

        # a file swapped with a directory, both included, then across the boundary
        (mnt / "f").write_bytes(b"file")
        (mnt / "g" / "h").mkdir(parents=True)
        renameat2(mnt / "f", mnt / "g", RENAME_EXCHANGE)
        assert_replica_is_backing_minus_excluded(m, patterns)
        renameat2(mnt / "g", mnt / "a.tmp", RENAME_EXCHANGE)
        assert_replica_is_backing_minus_excluded(m, patterns)
        # both sides excluded: nothing shipped
        (mnt / "p.tmp").write_bytes(b"p")
        renameat2(mnt / "p.tmp", mnt / "g", RENAME_EXCHANGE)
        renameat2(mnt / "g", mnt / "p.tmp", RENAME_EXCHANGE)
        assert_replica_is_backing_minus_excluded(m, patterns)
    assert_replica_is_backing_minus_excluded(m, patterns)


# -- hard links ------------------------------------------------------------------------

def test_hard_links_across_the_boundary(tmp_path: Path) -> None:
    patterns = ["*.tmp"]
    with mount(tmp_path, patterns) as m:
        mnt = m.mnt
        (mnt / "a.tmp").write_bytes(b"made under an excluded name")
        os.setxattr(mnt / "a.tmp", "user.x", b"1")
        os.link(mnt / "a.tmp", mnt / "b")  # no included source: b arrives as a copy
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "b").read_bytes() == b"made under an excluded name"

        with open(mnt / "a.tmp", "r+b") as f:  # written through the excluded name
            f.seek(5)
            f.write(b"CHANGED")
        os.chmod(mnt / "a.tmp", 0o604)
        os.setxattr(mnt / "a.tmp", "user.x", b"2")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "b").read_bytes() == b"made CHANGEDn excluded name"

        os.link(mnt / "a.tmp", mnt / "c")  # now there is an included source: a real link
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert os.lstat(replica / "b").st_ino == os.lstat(replica / "c").st_ino

        (mnt / "x").write_bytes(b"included first")
        os.link(mnt / "x", mnt / "x.tmp")
        with open(mnt / "x.tmp", "r+b") as f:
            f.write(b"INCLUDED")
        os.truncate(mnt / "x.tmp", 12)
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "x").read_bytes() == b"INCLUDED fir"

        os.unlink(mnt / "b")
        os.unlink(mnt / "c")  # only the excluded name is left
        with open(mnt / "a.tmp", "ab") as f:
            f.write(b" - not shipped any more")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert not (replica / "b").exists()

        os.rename(mnt / "x.tmp", mnt / "y")  # an excluded link of an included file comes in
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert os.lstat(replica / "x").st_ino == os.lstat(replica / "y").st_ino

        (mnt / "z").write_bytes(b"z")
        os.link(mnt / "z", mnt / "z2")
        os.rename(mnt / "z", mnt / "z.tmp")  # one link leaves, the other stays
        assert_replica_is_backing_minus_excluded(m, patterns)
    assert_replica_is_backing_minus_excluded(m, patterns)


def test_write_through_excluded_link_kernel_never_looked_up_included_one(tmp_path: Path) -> None:
    """After a remount the kernel knows only the name it is asked about: octofs must find the included one."""
    patterns = ["*.tmp"]
    vault = write_vault_yaml(tmp_path, extra={"exclude": patterns})
    with mounted(vault) as m:
        (m.mnt / "dir").mkdir()
        (m.mnt / "dir" / "data.tmp").write_bytes(b"0123456789")
        os.link(m.mnt / "dir" / "data.tmp", m.mnt / "data")
        assert_replica_is_backing_minus_excluded(m, patterns)
    with mounted(vault) as m:
        with open(m.mnt / "dir" / "data.tmp", "r+b") as f:
            f.write(b"ABC")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "data").read_bytes() == b"ABC3456789"
    assert_replica_is_backing_minus_excluded(m, patterns)


# -- nothing about excluded paths is journaled --------------------------------------------

def test_changes_to_excluded_paths_are_not_journaled(tmp_path: Path) -> None:
    patterns = ["*.tmp", "cache/"]
    with mount(tmp_path, patterns) as m:
        (m.mnt / "cache").mkdir()
        before = len(list(JournalReader(m.journal_dir).records()))
        mnt = m.mnt
        write_file(mnt / "a.tmp", b"x" * 10000, fsync=True)
        os.truncate(mnt / "a.tmp", 10)
        os.chmod(mnt / "a.tmp", 0o600)
        os.utime(mnt / "a.tmp", ns=(1, 1))
        os.setxattr(mnt / "a.tmp", "user.a", b"1")
        os.removexattr(mnt / "a.tmp", "user.a")
        fd = os.open(mnt / "s.tmp", os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
        os.write(fd, b"sync write")
        os.close(fd)
        (mnt / "cache" / "deep" / "er").mkdir(parents=True)
        write_file(mnt / "cache" / "deep" / "f", b"cached", fsync=True)
        os.symlink("x", mnt / "cache" / "l")
        os.mkfifo(mnt / "cache" / "p")
        os.link(mnt / "cache" / "deep" / "f", mnt / "cache" / "f2")
        os.rename(mnt / "cache" / "deep", mnt / "cache" / "deep2")
        os.rename(mnt / "a.tmp", mnt / "cache" / "a")
        dfd = os.open(mnt / "cache", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        os.unlink(mnt / "cache" / "a")
        os.unlink(mnt / "s.tmp")
        os.rmdir(mnt / "cache" / "deep2" / "er")
        os.mkdir(mnt / "d.tmp")
        os.rmdir(mnt / "d.tmp")
        after = len(list(JournalReader(m.journal_dir).records()))
        assert after == before
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert sorted(os.listdir(replica)) == []


# -- anchored patterns: pg_stat_tmp/** ------------------------------------------------

def test_pg_stat_tmp_style_pattern(tmp_path: Path) -> None:
    patterns = ["pg_stat_tmp/**", "/logs/*.log", "!/logs/keep.log"]
    with mount(tmp_path, patterns) as m:
        mnt = m.mnt
        (mnt / "pg_stat_tmp").mkdir()
        (mnt / "base").mkdir()
        (mnt / "base" / "pg_stat_tmp").mkdir()  # anchored: this one is mirrored
        (mnt / "base" / "pg_stat_tmp" / "kept").write_bytes(b"kept")
        for i in range(3):
            write_file(mnt / "pg_stat_tmp" / f"db_{i}.tmp", b"stats %d" % i, fsync=True)
            os.rename(mnt / "pg_stat_tmp" / f"db_{i}.tmp", mnt / "pg_stat_tmp" / f"db_{i}.stat")
        (mnt / "pg_stat_tmp" / "sub").mkdir()
        (mnt / "pg_stat_tmp" / "sub" / "x").write_bytes(b"x")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert os.listdir(replica / "pg_stat_tmp") == []  # the directory itself is kept

        # Renaming the directory itself moves its contents into view, and back out again.
        os.rename(mnt / "pg_stat_tmp", mnt / "pg_stat_old")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert (replica / "pg_stat_old" / "sub" / "x").read_bytes() == b"x"
        os.mkdir(mnt / "pg_stat_tmp")
        os.rmdir(mnt / "pg_stat_tmp")
        os.rename(mnt / "pg_stat_old", mnt / "pg_stat_tmp")
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert os.listdir(replica / "pg_stat_tmp") == []
        os.rename(mnt / "base" / "pg_stat_tmp", mnt / "pg_stat_tmp" / "moved")  # into the excluded area
        assert_replica_is_backing_minus_excluded(m, patterns)

        # negation with anchoring
        (mnt / "logs" / "sub").mkdir(parents=True)
        for name in ("a.log", "keep.log", "sub/b.log", "notes.txt"):
            (mnt / "logs" / name).write_bytes(name.encode())
        replica = assert_replica_is_backing_minus_excluded(m, patterns)
        assert sorted(os.listdir(replica / "logs")) == ["keep.log", "notes.txt", "sub"]
        os.rename(mnt / "logs" / "keep.log", mnt / "logs" / "other.log")
        os.rename(mnt / "logs" / "a.log", mnt / "logs" / "keep.log")
        os.rename(mnt / "logs" / "sub", mnt / "logs2")
        os.rename(mnt / "logs", mnt / "logs-old")  # everything in it becomes included
        assert_replica_is_backing_minus_excluded(m, patterns)
        os.rename(mnt / "logs-old", mnt / "logs")  # and some of it excluded again
        assert_replica_is_backing_minus_excluded(m, patterns)
    assert_replica_is_backing_minus_excluded(m, patterns)
