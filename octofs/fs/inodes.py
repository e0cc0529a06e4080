"""fs/inodes.py: owns the map between FUSE inode numbers and entries of the backing dir.

Invariants:
- A node is identified by the backing file's ``(st_dev, st_ino)`` while it has at
  least one name.
- A node's FUSE inode number (the ``st_ino`` applications see) is fixed for its life
  and unique among the nodes in the table. It is the backing file's own ``st_ino``
  whenever that is safe: the file is on the backing dir's device, the number is
  neither 0 nor 1 (FUSE's root) and below 2**63, and no node in the table has it.
  So a file keeps its number when the kernel forgets it and looks it up again, all
  hard links of a file show one number, and numbers survive a remount. Otherwise
  (another filesystem mounted below the backing dir, or a backing inode number the
  filesystem recycled while the kernel still holds the old, unlinked file) the
  number comes from a counter from 2**63 upward, which never hands a number out
  twice: such a node's number is not stable across a FORGET.
- A FUSE inode number is reused only after its node was dropped, i.e. once the
  kernel has FORGOTten it (lookup counts are per number and additive, so a lookup
  answered before a FORGET of that number is processed still balances) and nothing
  of the table refers to it. Nothing in fs/ keeps state by FUSE inode number outside
  the node itself (``Node`` fields, the ``_by_key``/``_entries`` entries that point
  at it, which ``_drop`` removes, and entries named under it, which keep it alive);
  open-file and directory handles are keyed by backing fd and hold the node object.
- A node knows its names as ``(parent FUSE inode, name)`` pairs, never as full
  paths: renaming a directory updates one pair and every descendant's path follows.
  A directory has at most one name; a file has one per hard link we have seen.
- A node with no names is unlinked: it lives on only while the kernel holds a lookup
  reference (e.g. an open file) and its changes are not journaled, because they can
  no longer affect the tree. "No names" means no name *in the backing dir*: when an
  open file loses the last name we knew but still has hard links we never saw,
  operations.py finds one and ``adopt``s it, so its changes keep being journaled.
  Such a node (``names_complete`` False) also keeps its key, so that a lookup of a
  name we never saw finds it (and its FUSE inode number) again.
- ``names_complete`` is True only while ``names`` holds *every* name the backing
  file has (a directory, a file we created, a file whose st_nlink equals the names
  seen). Changes through the mount keep it true; operations.py relies on it to pick
  a journaled (not excluded) name for a hard-linked file without walking the tree.
- A node is dropped once the kernel's lookup count is zero (``forget``) *and* no
  entry of the table is named under it (``children``). The kernel keeps the parent
  of each dentry it uses, but not every parent we know: a hard-linked file in use as
  ``c/a`` keeps its name ``x/y`` while the kernel forgets ``x`` (it reclaims unused
  dentries whenever it needs memory), and the directories above a name found in the
  backing dir (``adopt``, exclusion.py) may never have been looked up at all. Every
  name therefore has a complete chain of parents in the table, and ``path`` always
  rebuilds a real path for a linked node. Dropping the last child of a node nobody
  else holds drops that node in turn (``_settle``). (Dropping the parent instead used
  to leave such a name dangling: ``path`` returned None, the file looked unlinked,
  opening it failed with ENOENT and its writes were not journaled.)
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
# FUSE inode numbers from here up come from InodeTable's counter; below it, they are
# backing inode numbers. ext4, xfs, btrfs and tmpfs numbers stay far below.
SPARE_BASE = 1 << 63
_INO_END = 1 << 64  # FUSE node ids are u64


@dataclass(slots=True, eq=False)
class Node:
    """One inode known to the kernel.

    Attributes:
        ino: our FUSE inode number: the backing file's ``st_ino`` when safe, else
            one from the counter (``SPARE_BASE`` up); see the module docstring.
        key: ``(st_dev, st_ino)`` of the backing file, or None once unlinked.
        names: the entries that point at it, as ``(parent ino, name)``.
        lookups: the kernel's lookup count.
        fds: backing file descriptors open on it (to stat it once unlinked):
            open files, open directory handles and ``held_fd``.
        held_fd: for a removed directory the kernel still refers to (someone's
            cwd), a backing fd that operations.py keeps until ``forget``.
        is_dir: the backing file is a directory (fixed for a node's life: a key
            names one inode, and an inode never changes type).
        children: how many entries of the table are named under this node (it is
            their parent); a node with any is kept even with no kernel lookup.
        names_complete: ``names`` is known to hold every name of the backing file.
        no_caps: the backing file is known to have no ``security.capability`` xattr
            (operations.py answers the kernel's per-write question without a syscall).
    """

    ino: int
    key: tuple[int, int] | None
    names: set[tuple[int, bytes]] = field(default_factory=set)
    lookups: int = 0
    fds: set[int] = field(default_factory=set)
    held_fd: int | None = None
    is_dir: bool = False
    names_complete: bool = False
    no_caps: bool = False
    children: int = 0


class InodeTable:
    """The kernel's view of the backing dir: FUSE inode ↔ entries.

    Args:
        root_key: ``(st_dev, st_ino)`` of the backing dir itself.
    """

    def __init__(self, root_key: tuple[int, int]) -> None:
        self._dev = root_key[0]
        self._next_spare = SPARE_BASE
        root = Node(ROOT, root_key, lookups=1, is_dir=True, names_complete=True)
        self._nodes: dict[int, Node] = {ROOT: root}
        self._by_key: dict[tuple[int, int], int] = {root_key: ROOT}
        self._entries: dict[tuple[int, bytes], int] = {}
        self._idle: list[Node] = []  # lost their last child: dropped by _settle if nothing holds them

    def __len__(self) -> int:
        return len(self._nodes)

    def __getitem__(self, ino: int) -> Node:
        return self._nodes[ino]

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def by_key(self, key: tuple[int, int]) -> Node | None:
        """The linked node of the backing file ``(st_dev, st_ino)``, or None if we do not know it."""
        ino = self._by_key.get(key)
        return None if ino is None else self._nodes.get(ino)

    def entry(self, parent: int, name: bytes) -> Node | None:
        """The node a known entry points at, or None if the entry is unknown."""
        ino = self._entries.get((parent, name))
        return None if ino is None else self._nodes.get(ino)

    # -- paths --------------------------------------------------------------

    def path(self, ino: int) -> bytes | None:
        """The vault-relative path of ``ino`` (b"" for the root), or None if unlinked."""
        parts: list[bytes] = []
        while ino != ROOT:
            node = self._nodes.get(ino)
            if node is None or not node.names:
                return None
            # Any name will do for a hard-linked file: all of them reach the same inode.
            ino, name = min(node.names)
            parts.append(name)
        parts.reverse()
        return b"/".join(parts)

    def paths(self, ino: int) -> list[bytes]:
        """Every known vault-relative path of ``ino`` (one per hard link we know), sorted."""
        node = self._nodes.get(ino)
        if node is None:
            return []
        if ino == ROOT:
            return [b""]
        out = []
        for parent, name in node.names:
            base = self.path(parent)  # directories have one name: only the leaf varies
            if base is not None:
                out.append(base + b"/" + name if base else name)
        out.sort()
        return out

    def path_preferring(self, ino: int, prefer: Callable[[bytes], bool]) -> bytes | None:
        """Like ``path``, but for a hard-linked file the first of its names (sorted) that
        ``prefer`` accepts, if any; ``path`` stays the fast, one-name common case."""
        node = self._nodes.get(ino)
        if node is None or len(node.names) < 2:
            return self.path(ino)
        candidates = self.paths(ino)
        for p in candidates:
            if prefer(p):
                return p
        return candidates[0] if candidates else None

    def child_path(self, parent: int, name: bytes) -> bytes | None:
        base = self.path(parent)
        if base is None:
            return None
        return base + b"/" + name if base else name

    # -- changes ------------------------------------------------------------

    def remember(self, parent: int, name: bytes, st: os.stat_result) -> Node:
        """Record that ``parent/name`` is the backing file ``st``; return its node.

        Does not change the lookup count (call ``incref`` once the kernel accepted it).
        """
        key = (st.st_dev, st.st_ino)
        old = self._entries.get((parent, name))
        if old is not None:
            old_node = self._nodes.get(old)
            if old_node is not None and old_node.key == key:
                return old_node
            # The entry now names another file (changed behind the kernel's back,
            # e.g. replaced by a rename we did not see as such): forget the stale link.
            self._unlink_entry(parent, name)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._new_ino(st)
            is_dir = stat.S_ISDIR(st.st_mode)
            node = Node(ino, key, is_dir=is_dir, names_complete=is_dir or st.st_nlink <= 1)
            self._nodes[ino] = node
            self._by_key[key] = ino
        else:
            node = self._nodes[ino]
        self._add_entry(parent, name, node)
        if not node.names_complete and len(node.names) >= st.st_nlink:
            node.names_complete = True
        self._settle()
        return node

    def _new_ino(self, st: os.stat_result) -> int:
        """The FUSE inode number of a new node: ``st.st_ino`` if safe, else the next spare one.

        A live node with the same number is an unlinked file the kernel still holds
        whose backing number was recycled (or a stale node of a file replaced behind
        our back): giving the new file that number would make the kernel see one
        inode where there are two.
        """
        ino = st.st_ino
        if st.st_dev == self._dev and ROOT < ino < SPARE_BASE and ino not in self._nodes:
            return ino
        ino = self._next_spare
        while ino in self._nodes:  # only after 2**63 spare numbers: never in practice
            ino = ino + 1 if ino + 1 < _INO_END else SPARE_BASE
        self._next_spare = ino + 1 if ino + 1 < _INO_END else SPARE_BASE
        return ino

    def incref(self, node: Node, count: int = 1) -> None:
        node.lookups += count

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups = max(0, node.lookups - count)  # kept nodes (children) may be looked up again
        if node.lookups <= 0 and node.children <= 0:
            self._drop(node)
            self._settle()

    def drop_if_unreferenced(self, node: Node) -> None:
        """Drop a node the kernel never accepted (e.g. a readdir entry that did not fit)."""
        if node.lookups <= 0 and node.children <= 0 and node.ino != ROOT and self._nodes.get(node.ino) is node:
            self._drop(node)
            self._settle()

    def _drop(self, node: Node) -> None:
        for parent, name in node.names:
            if self._entries.get((parent, name)) == node.ino:
                del self._entries[(parent, name)]
                self._release(parent)
        node.names.clear()
        if node.key is not None and self._by_key.get(node.key) == node.ino:
            del self._by_key[node.key]
        del self._nodes[node.ino]

    def _add_entry(self, parent: int, name: bytes, node: Node) -> None:
        """Name ``node`` ``parent/name`` (a free entry)."""
        self._entries[(parent, name)] = node.ino
        node.names.add((parent, name))
        pnode = self._nodes.get(parent)
        if pnode is not None:
            pnode.children += 1

    def _release(self, parent: int) -> None:
        """An entry named under ``parent`` went away; if that was its last and the kernel
        does not hold it, ``_settle`` drops it (not at once: the caller may be about to
        name something else under it, as a rename within one directory does)."""
        pnode = self._nodes.get(parent)
        if pnode is None:
            return
        pnode.children -= 1
        if pnode.children <= 0 and pnode.lookups <= 0 and parent != ROOT:
            self._idle.append(pnode)

    def _settle(self) -> None:
        """Drop the nodes that lost their last child and that nothing holds any more
        (each drop may release its own parent in turn). Called at the end of every change."""
        while self._idle:
            node = self._idle.pop()
            if node.lookups <= 0 and node.children <= 0 and self._nodes.get(node.ino) is node:
                self._drop(node)

    def unlinked(self, parent: int, name: bytes) -> None:
        """``parent/name`` was removed from the backing dir."""
        self._unlink_entry(parent, name)
        self._settle()

    def _unlink_entry(self, parent: int, name: bytes) -> None:
        ino = self._entries.pop((parent, name), None)
        if ino is None:
            return
        self._release(parent)
        node = self._nodes.get(ino)
        if node is None:
            return
        node.names.discard((parent, name))
        if not node.names and node.key is not None and node.names_complete:
            # No name left: the backing inode number may be recycled by a new file.
            # (Without names_complete the file still has a name the kernel never looked
            # up: it looks up every name it unlinks or renames over, so that name is still
            # there. The node stays keyed, and looking that name up finds it again, under
            # the number the kernel may still hold it by.)
            if self._by_key.get(node.key) == ino:
                del self._by_key[node.key]
            node.key = None

    def adopt(self, node: Node, parent: int, name: bytes, key: tuple[int, int]) -> None:
        """Give a node that lost its last known name another name its backing file still has."""
        if self._entries.get((parent, name)) not in (None, node.ino):
            self._unlink_entry(parent, name)
        node.key = key
        self._by_key[key] = node.ino
        node.names_complete = False  # it had names we never saw
        if (parent, name) not in self._entries:
            self._add_entry(parent, name, node)
        self._settle()

    def renamed(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes) -> None:
        """``old`` was renamed over ``new`` (which, if it existed, lost that name)."""
        self._unlink_entry(new_parent, new_name)
        ino = self._entries.pop((old_parent, old_name), None)
        if ino is not None:
            self._release(old_parent)
            node = self._nodes[ino]
            node.names.discard((old_parent, old_name))
            self._add_entry(new_parent, new_name, node)
        self._settle()

    def exchanged(self, parent_a: int, name_a: bytes, parent_b: int, name_b: bytes) -> None:
        """``a`` and ``b`` swapped places atomically (RENAME_EXCHANGE)."""
        ino_a = self._entries.pop((parent_a, name_a), None)
        ino_b = self._entries.pop((parent_b, name_b), None)
        for ino, old in ((ino_a, (parent_a, name_a)), (ino_b, (parent_b, name_b))):
            if ino is not None:
                self._release(old[0])
                self._nodes[ino].names.discard(old)
        for ino, new in ((ino_a, (parent_b, name_b)), (ino_b, (parent_a, name_a))):
            if ino is not None:
                self._add_entry(new[0], new[1], self._nodes[ino])
        self._settle()
