"""The inode table (fs/inodes.py) keeps a path for every node the kernel still uses, even after the
kernel forgot the directories on the way to it (issue 6: the divergence that made 60 s entry/attr
timeouts unsafe).

The kernel forgets a directory once no dentry below it is in use, and reclaims unused dentries
whenever it needs memory. A hard-linked file can then still be in use under one parent while the
kernel has forgotten its other parent; and a file octofs gave a name the kernel never looked up
(``_keep_journaled``) has parents the kernel may never have held at all. Writing ``2`` to
``/proc/sys/vm/drop_caches`` makes the kernel reclaim every unused dentry and inode at once, the
same reclaim memory pressure does bit by bit, so these tests need no timing. Each one ends by
comparing a real target with the backing dir byte for byte: a node whose path was lost was
treated as unlinked, so its changes were applied but never journaled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.daemons import mounted, write_vault_yaml
from tests.support.trees import assert_trees_equal

pytestmark = pytest.mark.fuse


def _forget_unused() -> None:
    """Make the kernel reclaim every unused dentry and inode (FUSE sends FORGET for each)."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def _vault(tmp_path: Path, secret: Path, target) -> Path:
    return write_vault_yaml(tmp_path / "p", extra={
        "secret_file": str(secret), "targets": [{"name": "t", "address": target.address_str}],
    })


def test_hard_link_in_use_after_its_other_parent_was_forgotten(tmp_path: Path, secret: Path, target) -> None:
    """``x/y`` and ``c/a`` are one file, in use as ``c/a``; the kernel forgets ``x``. Opening
    ``c/a`` used to fail with ENOENT (its path was built from the name under the forgotten
    ``x``) right after ``c`` listed it, and writes to it went unjournaled."""
    with mounted(_vault(tmp_path, secret, target)) as m:
        mnt = m.mnt
        (mnt / "x").mkdir()  # x gets a lower inode number than c: its name sorts first
        (mnt / "c").mkdir()
        (mnt / "x" / "y").write_bytes(b"one")
        os.link(mnt / "x" / "y", mnt / "c" / "a")
        fd = os.open(mnt / "c" / "a", os.O_RDWR)
        try:
            _forget_unused()
            assert os.listdir(mnt / "c") == ["a"]
            assert (mnt / "c" / "a").read_bytes() == b"one"
            os.pwrite(fd, b"two", 3)
            with (mnt / "c" / "a").open("ab") as f:
                f.write(b"three")
            assert (mnt / "x" / "y").read_bytes() == b"onetwothree"
            os.fsync(fd)
        finally:
            os.close(fd)
        m.wait_synced()
        assert_trees_equal(m.backing, target.root / "vault", mtime=True)


def test_adopted_name_survives_its_parents_being_forgotten(tmp_path: Path, secret: Path, target) -> None:
    """An open file loses the only name the kernel knew (``g``); octofs finds its other link
    ``d/e/f`` in the backing dir and journals its changes there. The directories on that path
    are known to octofs only; once the kernel has looked ``d`` up and forgotten it again, writes
    through the open file must still be journaled under ``d/e/f``."""
    with mounted(_vault(tmp_path, secret, target)) as m:
        mnt = m.mnt
        (mnt / "d" / "e").mkdir(parents=True)
        (mnt / "d" / "e" / "f").write_bytes(b"data")
        os.link(mnt / "d" / "e" / "f", mnt / "g")
        _forget_unused()  # the kernel forgets d, e and the file: octofs learns only g below
        fd = os.open(mnt / "g", os.O_RDWR)
        try:
            os.unlink(mnt / "g")  # the file keeps its name d/e/f, which the kernel never looked up
            os.pwrite(fd, b"1", 0)
            assert os.listdir(mnt) == ["d"]  # the kernel looks d up ...
            _forget_unused()  # ... and forgets it again
            os.pwrite(fd, b"2", 1)
            os.fsync(fd)
            assert (mnt / "d" / "e" / "f").read_bytes() == b"12ta"
        finally:
            os.close(fd)
        m.wait_synced()
        assert_trees_equal(m.backing, target.root / "vault", mtime=True)
