"""tests/support/trees.py: every kind of difference is found, and nothing that should be ignored is."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.trees import assert_trees_equal, diff_snapshots, tree_snapshot

IS_ROOT = os.geteuid() == 0
T0 = 1_600_000_000_123_456_789


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two identical small trees a/ and b/."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        root.chmod(0o755)
        (root / "d").mkdir()
        (root / "d" / "f").write_bytes(b"hello")
        (root / "g").write_bytes(b"")
        os.symlink("d/f", root / "s")
        for p in (root / "d" / "f", root / "g"):
            os.utime(p, ns=(T0, T0))
        os.utime(root / "s", ns=(T0, T0), follow_symlinks=False)
    return a, b


def _diff(a: Path, b: Path, *, mtime: bool = False) -> str:
    with pytest.raises(AssertionError) as info:
        assert_trees_equal(a, b, mtime=mtime)
    return str(info.value)


def test_identical_trees_pass(pair):
    a, b = pair
    assert_trees_equal(a, b, mtime=True)
    assert tree_snapshot(a, mtime=True) == tree_snapshot(b, mtime=True)


def test_snapshot_shape(pair):
    a, _ = pair
    snap = tree_snapshot(a, mtime=True)
    assert set(snap) == {b"", b"d", b"d/f", b"g", b"s"}
    f = snap[b"d/f"]
    assert (f.kind, f.mode, f.size, f.target, f.links, f.mtime_ns) == ("file", 0o644 & ~_umask(), 5, None, None, T0)
    assert f.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert snap[b"s"].kind == "symlink" and snap[b"s"].target == b"d/f" and snap[b"s"].sha256 is None
    assert snap[b""].kind == "dir" and snap[b""].mode == 0o755
    assert snap[b"d"].size is None and snap[b"d"].mtime_ns is None
    assert tree_snapshot(a)[b"d/f"].mtime_ns is None


def test_content_with_same_size_and_mtime_differs(pair):
    a, b = pair
    (b / "d" / "f").write_bytes(b"HELLO")
    os.utime(b / "d" / "f", ns=(T0, T0))
    assert os.stat(a / "d" / "f").st_mtime_ns == os.stat(b / "d" / "f").st_mtime_ns
    lines = _diff(a, b, mtime=True).splitlines()[1:]
    assert lines == ["b'd/f': sha256 2cf24dba5fb0 != 3733cd977ff8"]


def test_mode_differs(pair):
    a, b = pair
    (b / "g").chmod(0o4755)
    assert "b'g': mode 0o644 != 0o4755" in _diff(a, b).replace(oct(0o644 & ~_umask()), "0o644")


def test_root_mode_differs(pair):
    a, b = pair
    b.chmod(0o700)
    assert "<root>: mode 0o755 != 0o700" in _diff(a, b)


def test_symlink_target_differs(pair):
    a, b = pair
    (b / "s").unlink()
    os.symlink("g", b / "s")
    os.utime(b / "s", ns=(T0, T0), follow_symlinks=False)
    assert "b's': size 3 != 1; target b'd/f' != b'g'" in _diff(a, b, mtime=True)


def test_hard_link_grouping_differs(pair):
    a, b = pair
    os.link(a / "d" / "f", a / "h")  # a: h is a second name of d/f
    shutil.copy2(b / "d" / "f", b / "h")  # b: h is a copy with the same bytes and mtime
    msg = _diff(a, b, mtime=True)
    assert "b'd/f': links (b'd/f', b'h') != None" in msg
    assert "b'h': links (b'd/f', b'h') != None" in msg
    assert "sha256" not in msg


def test_hard_link_groups_ignore_inode_numbers(pair):
    a, b = pair
    os.link(a / "g", a / "h")
    os.link(b / "g", b / "h")
    assert os.stat(a / "g").st_ino != os.stat(b / "g").st_ino
    assert_trees_equal(a, b)
    assert tree_snapshot(a)[b"h"].links == (b"g", b"h")


def test_xattr_differs(pair):
    a, b = pair
    os.setxattr(a / "g", b"user.k", b"v1")
    os.setxattr(b / "g", b"user.k", b"v2")
    assert "b'g': xattrs ((b'user.k', b'v1'),) != ((b'user.k', b'v2'),)" in _diff(a, b)
    os.setxattr(b / "g", b"user.k", b"v1")
    assert_trees_equal(a, b)
    os.setxattr(b, b"user.root", b"")
    assert "<root>: xattrs" in _diff(a, b)


def test_missing_and_extra(pair):
    a, b = pair
    (a / "only_a").write_bytes(b"x")
    (b / "d" / "only_b").mkdir()
    msg = _diff(a, b)
    assert "b'd/only_b': missing in a (b has a dir)" in msg
    assert "b'only_a': missing in b (a has a file)" in msg


def test_type_differs(pair):
    a, b = pair
    (b / "g").unlink()
    os.mkfifo(b / "g", 0o644 & ~_umask())
    os.utime(b / "g", ns=(T0, T0))
    msg = _diff(a, b, mtime=True)
    assert "b'g': kind 'file' != 'fifo'" in msg


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_owner_differs(pair):
    a, b = pair
    os.chown(b / "g", 1234, 5678)
    assert "b'g': uid 0 != 1234; gid 0 != 5678" in _diff(a, b)


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a device needs root")
def test_device_numbers_differ(pair):
    a, b = pair
    os.mknod(a / "dev", 0o600 | 0o020000, os.makedev(1, 3))
    os.mknod(b / "dev", 0o600 | 0o020000, os.makedev(1, 5))
    assert "b'dev': rdev (1, 3) != (1, 5)" in _diff(a, b)


def test_mtime_only_compared_when_asked(pair):
    a, b = pair
    os.utime(b / "g", ns=(T0, T0 + 1))
    assert_trees_equal(a, b)
    assert f"b'g': mtime_ns {T0} != {T0 + 1}" in _diff(a, b, mtime=True)
    os.utime(b / "s", ns=(T0, T0 + 1), follow_symlinks=False)
    assert "b's': mtime_ns" in _diff(a, b, mtime=True)


def test_ignored_fields(pair):
    """atime, directory mtime, directory size and ctime never cause a difference."""
    a, b = pair
    os.utime(b / "g", ns=(T0 + 99, T0))  # atime only
    os.utime(b / "d", ns=(1, 1))  # directory mtime
    for i in range(300):  # grow b/d's directory size past one block
        (b / "d" / f"tmp{i:03}-{'x' * 40}").touch()
    for p in (b / "d").glob("tmp*"):
        p.unlink()
    assert os.stat(b / "d").st_size != os.stat(a / "d").st_size
    os.chmod(b / "g", 0o600)
    os.chmod(b / "g", 0o644 & ~_umask())  # ctime moved, nothing else
    assert_trees_equal(a, b, mtime=True)


def test_diff_is_sorted_and_capped(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in reversed(range(100)):
        (a / f"f{i:03}").write_bytes(b"x")
    lines = diff_snapshots(tree_snapshot(a), tree_snapshot(b))
    assert lines == sorted(lines) and len(lines) == 100
    msg = _diff(a, b)
    assert msg.splitlines()[1].startswith("b'f000'")
    assert msg.splitlines()[-1] == "... and 40 more"


def test_non_utf8_names(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    name = b"caf\xe9"
    with open(os.fsencode(a) + b"/" + name, "wb") as f:
        f.write(b"x")
    assert name in tree_snapshot(a)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
