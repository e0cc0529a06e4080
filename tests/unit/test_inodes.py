"""fs/inodes.py: FUSE inode numbers are the backing files' own ``st_ino`` where safe.

No FUSE here: the table is fed stat results built by hand (a fake device for "another
filesystem"), as operations.py feeds it ``os.lstat`` results. The real mounts are in
tests/integration/test_inode_names.py.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from octofs.fs.inodes import ROOT, SPARE_BASE, InodeTable

DEV = 0x803
ROOT_INO = 2


def _st(ino: int, *, dev: int = DEV, nlink: int = 1, is_dir: bool = False) -> os.stat_result:
    mode = (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644)
    return os.stat_result((mode, ino, dev, nlink, 0, 0, 0, 0, 0, 0))


def _lookup(table: InodeTable, parent: int, name: bytes, st_: os.stat_result) -> int:
    """What operations.py does for LOOKUP/CREATE/MKDIR/LINK: remember, then one kernel lookup."""
    node = table.remember(parent, name, st_)
    table.incref(node)
    return node.ino


def check_table(table: InodeTable) -> None:
    """The table's own bookkeeping agrees with itself (nothing left behind keyed by a dropped number)."""
    nodes = table._nodes
    for key, ino in table._by_key.items():
        assert ino in nodes and nodes[ino].key == key, (key, ino)
    children = dict.fromkeys(nodes, 0)
    for (parent, name), ino in table._entries.items():
        assert parent in nodes, f"entry {name!r} under dropped node {parent}"
        assert ino in nodes and (parent, name) in nodes[ino].names
        children[parent] += 1
    for ino, node in nodes.items():
        assert node.ino == ino
        assert node.children == children[ino], (ino, node.children, children[ino])
        for pair in node.names:
            assert table._entries.get(pair) == ino
        if ino != ROOT:
            assert node.lookups > 0 or node.children > 0, f"node {ino} kept with nothing holding it"
        if node.key is not None and ino < SPARE_BASE and ino != ROOT:
            assert ino == node.key[1], "a node numbered below SPARE_BASE carries its backing st_ino"


def test_node_number_is_the_backing_st_ino_and_comes_back_after_forget() -> None:
    table = InodeTable((DEV, ROOT_INO))
    assert _lookup(table, ROOT, b"a", _st(5000, nlink=2)) == 5000
    assert _lookup(table, ROOT, b"b", _st(5000, nlink=2)) == 5000  # the hard link: same node
    table.forget(5000, 2)
    assert table.get(5000) is None and len(table) == 1
    assert _lookup(table, ROOT, b"b", _st(5000, nlink=2)) == 5000  # forgotten and looked up again
    assert _lookup(table, ROOT, b"a", _st(5000, nlink=2)) == 5000
    check_table(table)


def test_recycled_backing_number_while_old_node_is_held_gets_a_spare_number() -> None:
    table = InodeTable((DEV, ROOT_INO))
    old = table[_lookup(table, ROOT, b"old", _st(700))]
    table.unlinked(ROOT, b"old")  # the kernel still holds it (an open file, a cwd)
    assert old.key is None and table.get(700) is old
    # The backing filesystem hands the freed number 700 to a new file.
    new_ino = _lookup(table, ROOT, b"new", _st(700))
    assert new_ino >= SPARE_BASE
    assert table.get(700) is old and table[new_ino] is not old  # no aliasing
    assert table.path(700) is None and table.path(new_ino) == b"new"
    assert table.by_key((DEV, 700)) is table[new_ino]
    assert _lookup(table, ROOT, b"link", _st(700, nlink=2)) == new_ino  # a link of it: same node
    check_table(table)

    table.forget(700, 1)  # the kernel lets go of the old file
    assert table.get(700) is None
    assert _lookup(table, ROOT, b"new", _st(700, nlink=2)) == new_ino  # still held: keeps its number
    table.forget(new_ino, 3)
    assert table.get(new_ino) is None and len(table) == 1
    # Forgotten too: the number is free again and the file gets its own.
    assert _lookup(table, ROOT, b"new", _st(700, nlink=2)) == 700
    check_table(table)


def test_a_number_is_free_again_once_its_node_is_forgotten() -> None:
    table = InodeTable((DEV, ROOT_INO))
    _lookup(table, ROOT, b"x", _st(42))
    table.unlinked(ROOT, b"x")
    table.forget(42, 1)
    assert table.get(42) is None
    assert _lookup(table, ROOT, b"y", _st(42)) == 42  # another file, after the kernel forgot the old one
    check_table(table)


@pytest.mark.parametrize("st_", [
    _st(900, dev=DEV + 1),  # another filesystem mounted below the backing dir
    _st(0),
    _st(ROOT),  # FUSE's ROOT_INODE
    _st(SPARE_BASE),
    _st((1 << 64) - 1),
], ids=["other-device", "zero", "one", "2**63", "2**64-1"])
def test_numbers_that_cannot_serve_get_a_spare_one(st_: os.stat_result) -> None:
    table = InodeTable((DEV, ROOT_INO))
    first = _lookup(table, ROOT, b"f", st_)
    assert first >= SPARE_BASE
    other = _lookup(table, ROOT, b"g", os.stat_result((*st_[:1], st_.st_ino ^ 1, *st_[2:])))
    assert other >= SPARE_BASE and other != first
    check_table(table)


def test_two_files_with_one_number_on_two_devices_stay_apart() -> None:
    table = InodeTable((DEV, ROOT_INO))
    here = _lookup(table, ROOT, b"here", _st(77))
    there = _lookup(table, ROOT, b"there", _st(77, dev=DEV + 1))
    assert here == 77 and there >= SPARE_BASE
    assert table.by_key((DEV, 77)) is table[here] and table.by_key((DEV + 1, 77)) is table[there]
    check_table(table)


def test_spare_counter_skips_numbers_in_use_and_wraps() -> None:
    table = InodeTable((DEV, ROOT_INO))
    a = _lookup(table, ROOT, b"a", _st(1, dev=9))
    assert a == SPARE_BASE
    table._next_spare = SPARE_BASE  # as after a wrap-around: the next spare number is taken
    assert _lookup(table, ROOT, b"b", _st(2, dev=9)) == SPARE_BASE + 1
    table._next_spare = (1 << 64) - 1
    assert _lookup(table, ROOT, b"c", _st(3, dev=9)) == (1 << 64) - 1
    assert _lookup(table, ROOT, b"d", _st(4, dev=9)) == SPARE_BASE + 2  # wrapped, skipping a and b
    check_table(table)


def test_kept_directory_keeps_its_number_for_the_next_lookup() -> None:
    """A directory the kernel forgot while a name below it is still in use stays in the table
    under its own number, so the next lookup of it answers with that number."""
    table = InodeTable((DEV, ROOT_INO))
    d = _lookup(table, ROOT, b"d", _st(300, is_dir=True))
    f = _lookup(table, d, b"f", _st(301))
    table.forget(d, 1)
    assert table.get(d) is not None  # kept for f's name
    assert _lookup(table, ROOT, b"d", _st(300, is_dir=True)) == 300
    table.forget(f, 1)
    table.forget(d, 1)
    assert len(table) == 1
    check_table(table)


def test_other_link_of_a_file_whose_known_names_were_unlinked() -> None:
    """The kernel looked up only ``p`` of the links ``p`` and ``q`` and still holds the file after
    ``unlink p``: ``q``, looked up next, is the same node under the same number (the node knew
    a name was missing, ``names_complete``), as on a native filesystem."""
    table = InodeTable((DEV, ROOT_INO))
    assert _lookup(table, ROOT, b"p", _st(20, nlink=2)) == 20
    table.unlinked(ROOT, b"p")
    assert table.path(20) is None and table[20].key == (DEV, 20)
    assert _lookup(table, ROOT, b"q", _st(20, nlink=1)) == 20
    assert table.path(20) == b"q" and table[20].names_complete
    table.unlinked(ROOT, b"q")  # now every name is gone: the number is free for a new file
    assert table[20].key is None and table.by_key((DEV, 20)) is None
    assert _lookup(table, ROOT, b"new", _st(20)) >= SPARE_BASE  # the kernel still holds the old one
    check_table(table)


def test_unfitting_readdir_entry_frees_its_number() -> None:
    table = InodeTable((DEV, ROOT_INO))
    node = table.remember(ROOT, b"e", _st(55))
    table.drop_if_unreferenced(node)  # the readdir reply had no room for it: the kernel never saw it
    assert table.get(55) is None and len(table) == 1
    check_table(table)


# -- a state machine: the kernel never sees one number stand for two files ---------------------------


@dataclass
class _File:
    """One backing file (identity = this object), with the number the backing fs gave it."""

    st_ino: int
    names: set[tuple[str, bytes]] = field(default_factory=set)
    is_dir: bool = False

    def stat(self) -> os.stat_result:
        return _st(self.st_ino, nlink=max(1, len(self.names)), is_dir=self.is_dir)


_DIRS = ("", "a", "b")
_NAMES = (b"p", b"q", b"r")
_POOL = range(20, 24)  # few backing numbers, so the backing fs recycles them often


class InodeNumbers(RuleBasedStateMachine):
    """Backing files with recycled numbers, and a kernel that looks up, links, renames, unlinks
    and forgets. The kernel's side: each number it holds names one backing file for as long
    as it holds it (no aliasing); a number it has let go of may come back for another file."""

    def __init__(self) -> None:
        super().__init__()
        self.table = InodeTable((DEV, ROOT_INO))
        self.dirs = {"": _File(ROOT_INO, is_dir=True), "a": _File(10, is_dir=True), "b": _File(11, is_dir=True)}
        self.dirs["a"].names.add(("", b"a"))
        self.dirs["b"].names.add(("", b"b"))
        self.entries: dict[tuple[str, bytes], _File] = {("", b"a"): self.dirs["a"], ("", b"b"): self.dirs["b"]}
        self.held: dict[int, list] = {ROOT: [1, self.dirs[""]]}  # FUSE ino -> [lookups, file]

    def _held_dir(self, d: str) -> int | None:
        for ino, (_, f) in self.held.items():
            if f is self.dirs[d]:
                return ino
        return None

    def _kernel_lookup(self, parent: int, name: bytes, f: _File) -> None:
        st_ = f.stat()
        known = self.table.by_key((DEV, f.st_ino))
        free = f.st_ino not in self.table._nodes
        ino = _lookup(self.table, parent, name, st_)
        if known is not None:
            assert ino == known.ino
        elif free:
            assert ino == f.st_ino, "a free backing number must be used as is"
        else:
            assert ino >= SPARE_BASE
        if ino in self.held:
            assert self.held[ino][1] is f, f"FUSE inode {ino} stands for two files"
            self.held[ino][0] += 1
        else:
            self.held[ino] = [1, f]

    def _free_number(self) -> int | None:
        used = {f.st_ino for f in self.entries.values()}
        free = [n for n in _POOL if n not in used]
        return free[0] if free else None

    @rule(d=st.sampled_from(_DIRS), name=st.sampled_from(_NAMES))
    def lookup(self, d: str, name: bytes) -> None:
        parent = self._held_dir(d)
        f = self.entries.get((d, name))
        if parent is not None and f is not None:
            self._kernel_lookup(parent, name, f)

    @rule(d=st.sampled_from(("a", "b")))
    def lookup_dir(self, d: str) -> None:
        self._kernel_lookup(ROOT, d.encode(), self.dirs[d])

    @rule(d=st.sampled_from(_DIRS), name=st.sampled_from(_NAMES))
    def create(self, d: str, name: bytes) -> None:
        parent = self._held_dir(d)
        number = self._free_number()
        if parent is None or number is None or (d, name) in self.entries:
            return
        f = _File(number, {(d, name)})
        self.entries[(d, name)] = f
        self._kernel_lookup(parent, name, f)

    @rule(data=st.data(), d=st.sampled_from(_DIRS), name=st.sampled_from(_NAMES))
    def link(self, data, d: str, name: bytes) -> None:
        files = [(ino, f) for ino, (_, f) in self.held.items() if not f.is_dir and f.names]
        parent = self._held_dir(d)
        if not files or parent is None or (d, name) in self.entries:
            return
        _, f = data.draw(st.sampled_from(files))
        f.names.add((d, name))
        self.entries[(d, name)] = f
        self._kernel_lookup(parent, name, f)

    @rule(d=st.sampled_from(_DIRS), name=st.sampled_from(_NAMES))
    def unlink(self, d: str, name: bytes) -> None:
        parent = self._held_dir(d)
        f = self.entries.get((d, name))
        if parent is None or f is None or f.is_dir:
            return
        del self.entries[(d, name)]
        f.names.discard((d, name))  # with no name left its number is free for the next create
        self.table.unlinked(parent, name)

    @rule(d1=st.sampled_from(_DIRS), n1=st.sampled_from(_NAMES), d2=st.sampled_from(_DIRS),
          n2=st.sampled_from(_NAMES))
    def rename(self, d1: str, n1: bytes, d2: str, n2: bytes) -> None:
        p1, p2 = self._held_dir(d1), self._held_dir(d2)
        f = self.entries.get((d1, n1))
        if p1 is None or p2 is None or f is None or f.is_dir or (d1, n1) == (d2, n2):
            return
        victim = self.entries.get((d2, n2))
        if victim is f:
            return  # two links of one file: rename(2) does nothing
        if victim is not None:
            victim.names.discard((d2, n2))
        del self.entries[(d1, n1)]
        f.names.discard((d1, n1))
        f.names.add((d2, n2))
        self.entries[(d2, n2)] = f
        self.table.renamed(p1, n1, p2, n2)

    @rule(data=st.data(), all_=st.booleans())
    def forget(self, data, all_: bool) -> None:
        inos = sorted(i for i in self.held if i != ROOT)
        if not inos:
            return
        ino = data.draw(st.sampled_from(inos))
        count = self.held[ino][0] if all_ else 1
        self.table.forget(ino, count)
        self.held[ino][0] -= count
        if self.held[ino][0] == 0:
            del self.held[ino]

    @precondition(lambda self: self._held_dir("") is not None)
    @rule(name=st.sampled_from(_NAMES), fits=st.booleans())
    def readdir_entry(self, name: bytes, fits: bool) -> None:
        f = self.entries.get(("", name))
        if f is None:
            return
        if fits:
            self._kernel_lookup(ROOT, name, f)
        else:
            node = self.table.remember(ROOT, name, f.stat())
            self.table.drop_if_unreferenced(node)

    @invariant()
    def consistent(self) -> None:
        check_table(self.table)
        for ino, (count, f) in self.held.items():
            node = self.table.get(ino)
            assert node is not None, f"the kernel holds {ino}, the table dropped it"
            if ino != ROOT:
                assert node.lookups == count
            if ino != ROOT and (node.names or node.key is not None):
                # Linked, or every known name unlinked while the file lives on under a name
                # the kernel never looked up: keyed, and the file really has those names.
                assert f.names and node.key == (DEV, f.st_ino)
                assert {(self._dir_of(p), n) for p, n in node.names} <= f.names


    def _dir_of(self, ino: int) -> str | None:
        if ino == ROOT:
            return ""
        node = self.table.get(ino)
        for d in ("a", "b"):
            if node is not None and node.key == (DEV, self.dirs[d].st_ino):
                return d
        return None


TestInodeNumbers = InodeNumbers.TestCase
TestInodeNumbers.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
