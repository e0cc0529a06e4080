"""fs/exclusion.py: owns capture across the exclusion boundary (vault.yaml ``exclude``).

A mixin of PassthroughOperations: which name a change is journaled under, and the
ops that make a target match when a rename or link moves something into or out
of the excluded part of the tree (a full copy, or a bottom-up removal).

Invariants:
- Every method runs inside a handler, after its backing syscall and with no
  ``await``; the ops it records describe the backing dir exactly as that syscall
  left it (docs/CONCURRENCY.md §2).
- The journal holds exactly what targets get: replaying it yields the backing dir
  minus the excluded paths.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from pyfuse3 import FUSEError

from octofs.fs.inodes import Node
from octofs.ops import (
    RENAME_EXCHANGE,
    CreateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    RenameOp,
    RmdirOp,
    SetattrOp,
    SetxattrOp,
    SymlinkOp,
    TruncateOp,
    UnlinkOp,
    WriteOp,
)

log = logging.getLogger(__name__)

# Largest WriteOp recorded when a file is copied into the journal (it crossed the
# exclusion boundary): keeps each op, and so each journal record and frame, bounded.
_COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_COPY_CHUNK)


def _join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base else name


def _under(path: bytes, roots: tuple[bytes, ...]) -> bool:
    """Is ``path`` one of ``roots`` or below one of them?"""
    return any(path == r or path.startswith(r + b"/") for r in roots)


class ExclusionCapture:
    """Mixin for PassthroughOperations (uses its inodes, _abs, _record, _exclude ...)."""

    # -- exclusion (vault.yaml ``exclude``) -------------------------------------
    #
    # Everything here runs inside a handler, after its syscall and with no ``await``:
    # the ops describe the backing dir exactly as the syscall left it
    # (docs/CONCURRENCY.md §2). The walks and file reads below therefore block the
    # event loop; that is accepted because they only happen when something crosses
    # the exclusion boundary (a save-by-rename, moving a directory in or out), and a
    # thread hop would let other requests change the backing dir before the ops
    # describing it are journaled.

    def _jpath(self, node: Node, rel: bytes | None) -> bytes | None:
        """The path to journal a change of ``node`` under, or None to journal nothing.

        ``rel`` is ``inodes.path(node.ino)``. None when the node is unlinked or when
        every name it has is excluded; for a hard-linked file, an included name.
        """
        if rel is None or not self._excluding:
            return rel
        excluded = self.exclude.excluded
        if node.is_dir:
            return None if excluded(rel, True) else rel
        if len(node.names) > 1:
            rel = self.inodes.path_preferring(node.ino, self._included_file)
        if rel is not None and not excluded(rel):
            return rel
        if node.names_complete:
            return None
        self._learn_names(node)
        rel = self.inodes.path_preferring(node.ino, self._included_file)
        return rel if rel is not None and not excluded(rel) else None

    def _included_file(self, rel: bytes) -> bool:
        return not self.exclude.excluded(rel)

    def _excluded(self, rel: bytes, is_dir: bool) -> bool:
        return self._excluding and self.exclude.excluded(rel, is_dir)

    def _learn_names(self, node: Node) -> None:
        """Learn every name of a hard-linked file whose known names are all excluded.

        A file opened as ``a.tmp`` may also be ``b`` (included) without the kernel
        ever having looked ``b`` up; its changes must reach the target under ``b``.
        Walks the backing dir, once per node (``names_complete``), and only for an
        excluded file with more links than names we know: rare.
        """
        node.names_complete = True
        try:
            if node.fds:
                st = os.fstat(next(iter(node.fds)))
            else:
                rel = self.inodes.path(node.ino)
                if rel is None:
                    return
                st = os.lstat(self._abs(rel))
            if st.st_nlink <= len(node.names):
                return
            for rel in list(self._names_of(st)):
                parent, _, name = rel.rpartition(b"/")
                self.inodes.remember(self._dir_ino(parent), name, st)
        except OSError as exc:
            log.warning("cannot find the other hard links of an excluded file; changes made "
                        "through its excluded name will not be journaled: %s", exc)

    def _capture(self, what: str, fn: Callable[..., None], *args) -> None:
        """Run ``fn`` (which records ops read from the backing dir); if the backing dir
        cannot be read, the journal cannot describe the change: go failsafe (EIO)."""
        try:
            fn(*args)
        except OSError as exc:
            # Same treatment as a journal failure (STYLE §7): the backing dir is now
            # ahead of the journal by this change, so the vault needs a resync.
            self.recorder.fail(f"cannot capture {what}: {exc}")
            raise FUSEError(errno.EIO) from None

    def _record_rename(self, old: bytes, new: bytes, flags: int, a_node: Node | None,
                       b_node: Node | None) -> None:
        """Journal a rename that already happened, as the target must see it given ``exclude``.

        ``A`` is the object renamed (now at ``new``); with RENAME_EXCHANGE, ``B`` is the
        one that was at ``new`` (now at ``old``). For each: is it on the target now
        (``has``), must it be there afterwards (``want``)? Then: remove what leaves,
        rename what stays, copy in what arrives, and fix up moved directories whose
        entries change side because of where they now are.
        """
        exchange = bool(flags & RENAME_EXCHANGE)
        excluded = self.exclude.excluded
        a_dir = a_node.is_dir if a_node is not None else self._is_dir_at(new)
        has_a, want_a = not excluded(old, a_dir), not excluded(new, a_dir)
        if exchange:
            b_dir = b_node.is_dir if b_node is not None else self._is_dir_at(old)
            has_b, want_b = not excluded(new, b_dir), not excluded(old, b_dir)
        else:
            # An object replaced at ``new`` has A's kind (a file or an empty directory),
            # so the target holds it exactly when ``want_a``; renaming A (or its copy)
            # onto ``new`` replaces it there too, in one op, as here.
            has_b = want_b = b_dir = False
            if has_a != want_a and os.path.lexists(self._abs(old)):
                return  # old and new were links to one file: rename(2) changed nothing
        if has_a and want_a and has_b and want_b:
            self._record(RenameOp(old, new, flags))
        elif has_a or want_a or has_b or want_b:
            avoid = (old, new)
            if has_a and not want_a:
                self._emit_removal(new, old, old)
            if has_b and not want_b:
                self._emit_removal(old, new, new)
            if has_a and want_a:
                self._record(RenameOp(old, new, 0 if exchange else flags))
            elif has_b and want_b:
                self._record(RenameOp(new, old, 0))
            if want_a and not has_a:
                self._emit_copy(new, avoid)
            if want_b and not has_b:
                self._emit_copy(old, avoid)
        if has_a and want_a and a_dir:
            self._emit_relocated(new, old)
        if has_b and want_b and b_dir:
            self._emit_relocated(old, new)

    def _is_dir_at(self, rel: bytes) -> bool:
        return stat.S_ISDIR(os.lstat(self._abs(rel)).st_mode)

    def _temp_name(self, parent: bytes) -> bytes:
        """A name in ``parent`` that the backing dir (hence the target) does not have."""
        while True:
            self._tmp_serial += 1
            rel = _join(parent, b".octofs~%s~%d" % (self._tmp_tag, self._tmp_serial))
            if not os.path.lexists(self._abs(rel)):
                return rel

    def _emit_copy(self, rel: bytes, avoid: tuple[bytes, ...]) -> None:
        """Make the target hold ``rel`` (with its included subtree) as the backing dir has it now.

        Built under a temporary name, then renamed onto ``rel`` in one op: the target
        never shows ``rel`` half made, and what it held at ``rel`` is replaced
        atomically, as rename(2) replaced it here (the save-by-rename pattern).
        """
        tmp = self._temp_name(rel.rpartition(b"/")[0])
        self._emit_tree(rel, tmp, avoid)
        self._record(RenameOp(tmp, rel))

    def _emit_tree(self, rel: bytes, at: bytes, avoid: tuple[bytes, ...]) -> None:
        """Record ops that create, at ``at``, the backing dir's ``rel`` and the included entries below it.

        Exclusion is judged by the paths under ``rel`` (where they will end up). Hard
        links within the copy stay links; a file that also has an included name the
        kernel knows, outside ``avoid`` (the subtrees the current change moves), is
        linked to it instead of copied.
        """
        excluded = self.exclude.excluded
        copied: dict[tuple[int, int], bytes] = {}
        pending = [(rel, at)]
        while pending:
            src, dst = pending.pop()
            path = self._abs(src)
            st = os.lstat(path)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                self._record(MkdirOp(dst, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns))
                if self._emit_xattrs(path, dst):
                    self._record(SetattrOp(dst, mode=stat.S_IMODE(mode)))  # an ACL may have changed it
                with os.scandir(path) as it:
                    entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
                for name, is_dir in reversed(entries):  # popped in sorted order
                    child = _join(src, name)
                    if not excluded(child, is_dir):
                        pending.append((child, _join(dst, name)))
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                link_src = copied.get(key) or self._included_link(key, avoid)
                if link_src is not None:
                    self._record(LinkOp(link_src, dst))
                    continue
                copied[key] = dst
            if stat.S_ISREG(mode):
                self._emit_file(path, dst)
            elif stat.S_ISLNK(mode):
                self._record(SymlinkOp(dst, os.readlink(path), st.st_uid, st.st_gid, st.st_mtime_ns))
                self._emit_xattrs(path, dst)
            else:
                self._record(MknodOp(dst, mode, st.st_rdev, st.st_uid, st.st_gid, st.st_mtime_ns))
                if self._emit_xattrs(path, dst):
                    self._record(SetattrOp(dst, mode=stat.S_IMODE(mode)))

    def _emit_file(self, path: bytes, dst: bytes) -> None:
        """CreateOp, the content as WriteOps of at most 1 MiB (all-zero chunks left as holes), xattrs, mode and mtime."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
        except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            mtime, size = st.st_mtime_ns, st.st_size
            self._record(CreateOp(dst, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime))
            if size:
                self._record(TruncateOp(dst, size, mtime))
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(_COPY_CHUNK, size - offset), offset)
                if not chunk:
                    break
                if chunk != _ZERO_CHUNK[:len(chunk)]:
                    self._record(WriteOp(dst, offset, chunk, mtime))
                offset += len(chunk)
        finally:
            os.close(fd)
        self._emit_xattrs(path, dst)
        # Last, so that it wins over anything the writes or an ACL did to the mode
        # (a non-root replayer's writes clear set-ID bits) and to the mtime.
        self._record(SetattrOp(dst, mode=stat.S_IMODE(st.st_mode), mtime_ns=mtime))

    def _emit_xattrs(self, path: bytes, dst: bytes) -> bool:
        """Record a SetxattrOp for each extended attribute of ``path``; True if there were any."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise
        for name in sorted(names):
            self._record(SetxattrOp(dst, os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)))
        return bool(names)

    def _included_link(self, key: tuple[int, int], avoid: tuple[bytes, ...]) -> bytes | None:
        """An included name the target already has for the backing file ``key``, if we know one."""
        node = self.inodes.by_key(key)
        if node is None:
            return None
        for rel in self.inodes.paths(node.ino):
            if not _under(rel, avoid) and not self.exclude.excluded(rel):
                return rel
        return None

    def _emit_removal(self, now: bytes, at: bytes, was: bytes) -> None:
        """Record ops that take ``at`` off the target, bottom-up.

        The object is in the backing dir at ``now``; the target holds it at ``at``
        with those entries that are not excluded under its old path ``was``.
        """
        excluded = self.exclude.excluded
        if not self._is_dir_at(now):
            self._record(UnlinkOp(at))
            return
        pending: list[tuple[bytes, bytes, bytes, bool]] = [(now, at, was, False)]
        while pending:
            n, a, w, children_done = pending.pop()
            if children_done:
                self._record(RmdirOp(a))
                continue
            pending.append((n, a, w, True))
            with os.scandir(self._abs(n)) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
            for name, is_dir in entries:
                if excluded(_join(w, name), is_dir):
                    continue  # never reached the target
                if is_dir:
                    pending.append((_join(n, name), _join(a, name), _join(w, name), False))
                else:
                    self._record(UnlinkOp(_join(a, name)))

    def _emit_relocated(self, now: bytes, was: bytes) -> None:
        """A directory moved from ``was`` to ``now`` (both included) and the target moved it too:
        copy in the entries that are included only at the new place, remove those excluded only there.

        Only anchored patterns (``/a/*.log``, ``pg_stat_tmp/**``) can make that happen,
        so the walk is skipped unless one of them lies on the path of either place.
        """
        if not (self.exclude.location_dependent(was) or self.exclude.location_dependent(now)):
            return
        excluded = self.exclude.excluded
        avoid = (now, was)
        pending = [b""]
        while pending:
            sub = pending.pop()
            base_now, base_was = _join(now, sub) if sub else now, _join(was, sub) if sub else was
            with os.scandir(self._abs(base_now)) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
            for name, is_dir in entries:
                n, w = _join(base_now, name), _join(base_was, name)
                held, wanted = not excluded(w, is_dir), not excluded(n, is_dir)
                if held and wanted:
                    if is_dir:
                        pending.append(_join(sub, name))
                elif held:
                    self._emit_removal(n, n, w)
                elif wanted:
                    self._emit_copy(n, avoid)
