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
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import mounted, wait_until, write_vault_yaml
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
        (mnt / "d1").mkdir()
        (mnt / "d2").mkdir()
        # x is the directory with the lower inode number (the mount shows the backing
        # dir's numbers): the file's name under it sorts first, the one path() used.
        x, c = sorted((mnt / "d1", mnt / "d2"), key=lambda p: p.stat().st_ino)
        (x / "y").write_bytes(b"one")
        os.link(x / "y", c / "a")
        fd = os.open(c / "a", os.O_RDWR)
        try:
            _forget_unused()
            assert os.listdir(c) == ["a"]
            assert (c / "a").read_bytes() == b"one"
            os.pwrite(fd, b"two", 3)
            with (c / "a").open("ab") as f:
                f.write(b"three")
            assert (x / "y").read_bytes() == b"onetwothree"
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


# -- stable inode numbers ---------------------------------------------------------------------------


def _build_linked_tree(mnt: Path) -> None:
    """Directories with files hard-linked across them, plus plain files, made through the mount."""
    for d in ("a", "a/b", "c", "c/d/e"):
        (mnt / d).mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (mnt / "a" / f"f{i}").write_bytes(b"%d" % i)
        os.link(mnt / "a" / f"f{i}", mnt / "c" / "d" / "e" / f"link{i}")
    os.link(mnt / "a" / "f0", mnt / "a" / "b" / "second-link-of-f0")
    (mnt / "c" / "plain").write_bytes(b"p")
    os.symlink("a/f1", mnt / "sym")


def _numbers(root: Path, *, forget_between: bool = False) -> dict[str, tuple[int, int]]:
    """``{relpath: (st_ino, st_nlink)}`` of every entry below ``root`` (not ``root`` itself),
    in a tree walk; with ``forget_between``, the kernel forgets everything unused before each lstat."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            if forget_between:
                _forget_unused()
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_ino, st.st_nlink)
    return out


def test_hard_links_keep_the_backing_st_ino_after_the_kernel_forgets(tmp_path: Path) -> None:
    """Two names of one file show one ``st_ino``, the backing file's, even when the kernel forgot
    the file between the two stats (it used to get a fresh number from a counter each time
    the kernel looked it up again, so ``tar``, ``rsync -H``, ``du`` saw two files)."""
    with mounted(write_vault_yaml(tmp_path)) as m:
        mnt = m.mnt
        _build_linked_tree(mnt)
        want = (m.backing / "a" / "f2").lstat().st_ino
        first = (mnt / "a" / "f2").lstat().st_ino
        _forget_unused()
        second = (mnt / "c" / "d" / "e" / "link2").lstat().st_ino
        _forget_unused()
        third = (mnt / "a" / "f2").lstat().st_ino
        assert first == second == third == want

        # A tree walk during which the kernel forgets everything unused before each stat:
        # every entry shows its backing inode number, so the hard links agree.
        walked = _numbers(mnt, forget_between=True)
        backing = _numbers(m.backing)
        assert walked == backing
        groups: dict[int, set[str]] = {}
        for rel, (ino, _) in walked.items():
            groups.setdefault(ino, set()).add(rel)
        assert groups[walked["a/f0"][0]] == {"a/f0", "a/b/second-link-of-f0", "c/d/e/link0"}
        assert groups[walked["a/f3"][0]] == {"a/f3", "c/d/e/link3"}
        assert len(groups) == len(walked) - 5  # 5 extra names: one per link made above
        # find -samefile, which compares (st_dev, st_ino), finds every link.
        found = subprocess.run(["find", str(mnt), "-samefile", str(mnt / "c/d/e/link0")],
                               capture_output=True, text=True, check=True).stdout.split()
        assert sorted(found) == sorted(str(mnt / r) for r in groups[walked["a/f0"][0]])


def test_st_ino_is_stable_across_a_remount(tmp_path: Path) -> None:
    vault = write_vault_yaml(tmp_path)
    with mounted(vault) as m:
        _build_linked_tree(m.mnt)
        before = _numbers(m.mnt)
        backing = m.backing
    assert m.proc.returncode == 0
    with mounted(vault) as m:
        after = _numbers(m.mnt)
    assert before == after == _numbers(backing)


def test_recycled_backing_number_while_the_kernel_holds_the_old_file(tmp_path: Path) -> None:
    """The kernel still holds an unlinked file (a bind mount of it in another mount namespace
    pins it; octofs has no backing fd on it, so ext4 frees its inode number at once and hands it
    to the next new file). The new file must not get the number the kernel still uses for the
    old one: it gets a spare one (2**63 up). Once the kernel lets go of the old file (FORGET), the
    new file gets its backing number the next time the kernel looks it up."""
    with mounted(write_vault_yaml(tmp_path)) as m:
        mnt = m.mnt
        (mnt / "old").write_bytes(b"old")
        number = (mnt / "old").lstat().st_ino
        assert number == (m.backing / "old").lstat().st_ino
        hold = tmp_path / "hold"
        hold.write_bytes(b"")
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount --bind "{mnt / "old"}" "{hold}" && echo ready && read _'],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "ready\n"
            os.unlink(mnt / "old")  # allowed: the bind mount lives in the other namespace only
            new = None
            for i in range(100):  # ext4 reuses the freed number for the very next inode here
                (mnt / f"new{i}").write_bytes(b"new")
                if (m.backing / f"new{i}").lstat().st_ino == number:
                    new = mnt / f"new{i}"
                    break
            assert new is not None, "the backing filesystem did not recycle the inode number"
            spare = new.lstat().st_ino
            assert spare >= 1 << 63
            held = subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "stat", "-c", "%i", str(hold)],
                                  capture_output=True, text=True, check=True).stdout
            assert int(held) == number  # the kernel's old inode keeps its number
            holder.communicate("\n", timeout=30)  # lets go of the old file
            assert holder.returncode == 0
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.wait()
        assert new.lstat().st_ino == spare  # still held by the kernel: unchanged

        def renumbered() -> bool:
            _forget_unused()
            return new.lstat().st_ino == number
        wait_until(renumbered, timeout=10, what="the new file to get its backing inode number")
        assert new.read_bytes() == b"new"


def test_last_link_keeps_the_number_after_the_known_link_is_unlinked(tmp_path: Path) -> None:
    """``p`` and ``q`` are one file; after the kernel forgot it, it looks up only ``p``, unlinks
    it, and keeps the inode cached. ``q`` must show the file's own number: octofs knew the
    file had a name it had not seen, so the node stays the file's."""
    with mounted(write_vault_yaml(tmp_path)) as m:
        mnt = m.mnt
        (mnt / "p").write_bytes(b"pq")
        os.link(mnt / "p", mnt / "q")
        number = (m.backing / "p").lstat().st_ino
        _forget_unused()
        assert (mnt / "p").lstat().st_ino == number  # the kernel learns p only
        os.unlink(mnt / "p")
        assert (mnt / "q").lstat().st_ino == number
        assert (mnt / "q").read_bytes() == b"pq"
