"""Stateful model test of apply.py: ops built from real changes replay to the same tree.

Each rule makes one change with plain ``os`` calls in ``expected/`` and, if the call
succeeded, builds the op a primary would journal for it (the *result*: the mode, owner
and mtime read back with lstat afterwards) and ships it into ``replica/`` with
``apply_op``. A failed call is not shipped, as a failed syscall on the primary is not
journaled. The invariant: the two trees are equal, mtimes of non-directories included.

Paths are resolved the way the kernel on the primary would before FUSE sees the
request: intermediate symlinks (and the last one, for calls that follow it) are
resolved with realpath, so every op names a path without symlinks in the middle, as
a primary's ops do. A path that resolves outside ``expected/`` is skipped: that is an
application leaving the vault, not a vault change. Symlinks that point out (``..``,
an absolute path to ``outside/``) are still created, in both trees, so apply_op keeps
meeting them; the invariant also checks that ``outside/`` stays empty and nothing
appears beside the two trees.

Hook for the journal tier: every op goes through ``ApplyModel._ship``. A subclass can
route it through codec + journal writer/reader before applying.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from octofs.apply import apply_op
from octofs.ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    CreateOp,
    FsyncOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    Op,
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
from tests.support.trees import assert_trees_equal

IS_ROOT = os.geteuid() == 0

NAMES = (b"a", b"b", b"c", b"d")
MAX_DEPTH = 3
SEED_FILES = (b"b", b"a/c", b"a/b/c")
fresh_paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=MAX_DEPTH).map(b"/".join)
OUTSIDE = b"<outside>"  # replaced by the absolute path of this example's outside/ dir
SYMLINK_TARGETS = (b"a", b"b", b"a/b", b"../a", b"..", b".", b"nowhere", b"../outside", OUTSIDE)
MODES = (0o644, 0o600, 0o755, 0o000, 0o640, 0o4755, 0o2755, 0o1777, 0o7777)
if not IS_ROOT:
    # Without root, tree_snapshot cannot read a 0o000 file or list a 0o000 directory.
    MODES = tuple(mode | 0o700 for mode in MODES)
XATTR_NAMES = (b"user.a", b"user.b") + ((b"trusted.t",) if IS_ROOT else ())
OWNERS = (None, 0, 1000, 4242)
times_ns = st.integers(-(2**60), 2**61)

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(src: bytes, dst: bytes, flags: int) -> None:
    """The test's own renameat2, independent of apply.py's, so a bug there is not mirrored here."""
    if _libc.renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def _child(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class ApplyModel(RuleBasedStateMachine):
    # Paths that exist or once did (every kind), and the regular files among them at
    # creation, so that data ops mostly meet files. Seeded with a small real tree, so
    # neither is ever empty (an empty bundle inside one_of would make Hypothesis throw
    # the example away) and most rules have something to act on from the first step.
    paths = Bundle("paths")
    files = Bundle("files")
    dirs = Bundle("dirs")  # made by mkdir: empty at first, so rmdir can succeed
    tagged = Bundle("tagged")  # (path, name) of an xattr that was set, so removexattr can succeed
    # A new name inside something that exists (or existed): far likelier to succeed
    # than a random path, so the trees grow past the top level.
    new_paths = st.builds(_child, paths | st.just(b""), st.sampled_from(NAMES)).filter(
        lambda p: p.count(b"/") < MAX_DEPTH
    )

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.tmp = os.fsencode(os.path.realpath(tempfile.mkdtemp(dir=base)))
        self.exp = self.tmp + b"/expected"
        self.rep = self.tmp + b"/replica"
        self.outside = self.tmp + b"/outside"
        for d in (self.exp, self.rep, self.outside):
            os.mkdir(d)
            os.chmod(d, 0o755)
        self.root_fd = os.open(self.rep, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.shipped: list[Op] = []

    def teardown(self) -> None:
        os.close(self.root_fd)
        _rmtree(self.tmp)

    # -- helpers ----------------------------------------------------------------------

    def _ship(self, op: Op) -> None:
        """Send one op to the replica. The journal tier overrides this (codec + journal)."""
        self.shipped.append(op)
        apply_op(self.root_fd, op)

    def _canon(self, path: bytes, *, follow: bool) -> bytes | None:
        """The vault path the primary's kernel would hand to FUSE for ``path``, or None if outside."""
        if not path:
            return b""
        full = self.exp + b"/" + path
        if follow:
            real = os.path.realpath(full)
        else:
            head, _, name = full.rpartition(b"/")
            real = os.path.realpath(head) + b"/" + name
        if real == self.exp:
            return b""
        if not real.startswith(self.exp + b"/"):
            return None
        return real[len(self.exp) + 1 :]

    def _abs(self, rel: bytes) -> bytes:
        return self.exp + b"/" + rel if rel else self.exp

    @initialize(
        target=paths,
        modes=st.lists(st.sampled_from(MODES), min_size=5, max_size=5),
        data=st.lists(st.binary(max_size=200), min_size=3, max_size=3),
    )
    def seed(self, modes: list[int], data: list[bytes]):
        """a/ and a/b/ (directories), b, a/c, a/b/c (files with some bytes), all shipped."""
        self.mkdir(b"a", modes[0])
        self.mkdir(b"a/b", modes[1])
        for path, mode, content in zip(SEED_FILES, modes[2:], data, strict=True):
            self.create(path, mode)
            self.write(path, 0, content)
        return multiple(b"a", b"a/b", *SEED_FILES)

    @initialize(target=files)
    def seed_files(self):
        return multiple(*SEED_FILES)

    @initialize(target=dirs)
    def seed_dirs(self):
        return multiple(b"a", b"a/b")

    # -- rules that create a name --------------------------------------------------------

    @rule(targets=(paths, files), path=new_paths | fresh_paths, mode=st.sampled_from(MODES))
    def create(self, path: bytes, mode: int):
        rel = self._canon(path, follow=False)
        if rel is None:
            return multiple()
        p = self._abs(rel)
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        except OSError:
            return multiple()
        s = os.lstat(p)
        self._ship(CreateOp(rel, stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns))
        return rel

    @rule(targets=(paths, dirs), path=new_paths | fresh_paths, mode=st.sampled_from(MODES))
    def mkdir(self, path: bytes, mode: int):
        rel = self._canon(path, follow=False)
        if rel is None:
            return multiple()
        p = self._abs(rel)
        try:
            os.mkdir(p, mode)
        except OSError:
            return multiple()
        s = os.lstat(p)
        self._ship(MkdirOp(rel, stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns))
        return rel

    @rule(target=paths, path=new_paths | fresh_paths, mode=st.sampled_from(MODES))
    def mkfifo(self, path: bytes, mode: int):
        rel = self._canon(path, follow=False)
        if rel is None:
            return multiple()
        p = self._abs(rel)
        try:
            os.mkfifo(p, mode)
        except OSError:
            return multiple()
        s = os.lstat(p)
        self._ship(MknodOp(rel, s.st_mode, 0, s.st_uid, s.st_gid, s.st_mtime_ns))
        return rel

    @rule(target=paths, path=new_paths | fresh_paths, target_=st.sampled_from(SYMLINK_TARGETS))
    def symlink(self, path: bytes, target_: bytes):
        rel = self._canon(path, follow=False)
        if rel is None:
            return multiple()
        link_target = self.outside if target_ == OUTSIDE else target_
        p = self._abs(rel)
        try:
            os.symlink(link_target, p)
        except OSError:
            return multiple()
        s = os.lstat(p)
        self._ship(SymlinkOp(rel, link_target, s.st_uid, s.st_gid, s.st_mtime_ns))
        return rel

    @rule(target=paths, src=files | paths, dst=new_paths | fresh_paths)
    def link(self, src: bytes, dst: bytes):
        # link(2) does not follow a symlink in src's last component.
        src_rel, dst_rel = self._canon(src, follow=False), self._canon(dst, follow=False)
        if src_rel is None or dst_rel is None:
            return multiple()
        try:
            os.link(self._abs(src_rel), self._abs(dst_rel), follow_symlinks=False)
        except OSError:
            return multiple()
        self._ship(LinkOp(src_rel, dst_rel))
        return dst_rel

    @rule(
        target=paths,
        src=paths,
        dst=new_paths | paths,
        flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    )
    def rename(self, src: bytes, dst: bytes, flags: int):
        src_rel, dst_rel = self._canon(src, follow=False), self._canon(dst, follow=False)
        if src_rel is None or dst_rel is None or not src_rel or not dst_rel:
            return multiple()
        try:
            if flags == 0:
                os.rename(self._abs(src_rel), self._abs(dst_rel))
            else:
                renameat2(self._abs(src_rel), self._abs(dst_rel), flags)
        except OSError:
            return multiple()
        self._ship(RenameOp(src_rel, dst_rel, flags))
        return dst_rel

    # -- rules that change or remove -------------------------------------------------------

    @rule(path=st.one_of(files, files, files, paths), offset=st.integers(0, 5000), data=st.binary(max_size=300))
    def write(self, path: bytes, offset: int, data: bytes) -> None:
        rel = self._canon(path, follow=True)  # open(2) follows symlinks
        if rel is None:
            return
        p = self._abs(rel)
        try:
            # O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of hanging.
            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            assert stat.S_ISREG(os.fstat(fd).st_mode)
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)
        self._ship(WriteOp(rel, offset, data, os.lstat(p).st_mtime_ns))

    @rule(path=st.one_of(files, files, paths), size=st.integers(0, 6000))
    def truncate(self, path: bytes, size: int) -> None:
        rel = self._canon(path, follow=True)
        if rel is None:
            return
        p = self._abs(rel)
        try:
            os.truncate(p, size)
        except OSError:
            return
        self._ship(TruncateOp(rel, size, os.lstat(p).st_mtime_ns))

    @rule(path=paths | fresh_paths)
    def unlink(self, path: bytes) -> None:
        rel = self._canon(path, follow=False)
        if rel is None:
            return
        try:
            os.unlink(self._abs(rel))
        except OSError:
            return
        self._ship(UnlinkOp(rel))

    @rule(path=dirs | paths)
    def rmdir(self, path: bytes) -> None:
        rel = self._canon(path, follow=False)
        if rel is None:
            return
        try:
            os.rmdir(self._abs(rel))
        except OSError:
            return
        self._ship(RmdirOp(rel))

    @rule(
        target=tagged,
        path=paths | fresh_paths | st.just(b""),
        follow=st.booleans(),
        name=st.sampled_from(XATTR_NAMES),
        value=st.binary(max_size=40),
    )
    def setxattr(self, path: bytes, follow: bool, name: bytes, value: bytes):
        rel = self._canon(path, follow=follow)
        if rel is None:
            return multiple()
        try:
            # On the canonical path the last component is what setxattr/lsetxattr acts on.
            os.setxattr(self._abs(rel), name, value, follow_symlinks=False)
        except OSError:
            return multiple()
        self._ship(SetxattrOp(rel, name, value))
        return (rel, name)

    @rule(tag=tagged)
    def removexattr(self, tag: tuple[bytes, bytes]) -> None:
        path, name = tag
        rel = self._canon(path, follow=False)  # path is canonical already: act on it, not on a link's target
        if rel is None:
            return
        try:
            os.removexattr(self._abs(rel), name, follow_symlinks=False)
        except OSError:
            return
        self._ship(RemovexattrOp(rel, name))

    @rule(path=paths | fresh_paths | st.just(b""), mode=st.sampled_from(MODES))
    def chmod(self, path: bytes, mode: int) -> None:
        rel = self._canon(path, follow=True)  # chmod(2) follows; Linux has no lchmod
        if rel is None:
            return
        p = self._abs(rel)
        try:
            os.chmod(p, mode)
        except OSError:
            return
        self._ship(SetattrOp(rel, mode=stat.S_IMODE(os.lstat(p).st_mode)))

    @precondition(lambda self: IS_ROOT)
    @rule(
        path=paths | fresh_paths | st.just(b""),
        follow=st.booleans(),
        uid=st.sampled_from(OWNERS),
        gid=st.sampled_from(OWNERS),
    )
    def chown(self, path: bytes, follow: bool, uid: int | None, gid: int | None) -> None:
        rel = self._canon(path, follow=follow)
        if rel is None:
            return
        p = self._abs(rel)
        try:
            mode_before = stat.S_IMODE(os.lstat(p).st_mode)
            os.chown(p, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
        except OSError:
            return
        s = os.lstat(p)
        # chown(2) clears the set-id bits of a non-directory, even for root and even
        # for chown(-1, -1), which changes no owner. The op carries that result, so it
        # does not depend on the target repeating the kernel's side effect (a target
        # that is not root skips the chown itself).
        mode = stat.S_IMODE(s.st_mode)
        self._ship(
            SetattrOp(
                rel,
                mode=None if mode == mode_before else mode,
                uid=None if uid is None else s.st_uid,
                gid=None if gid is None else s.st_gid,
            )
        )

    @rule(
        path=paths | fresh_paths | st.just(b""),
        follow=st.booleans(),
        atime=times_ns,
        mtime=times_ns,
        which=st.sampled_from(["both", "mtime"]),
    )
    def utime(self, path: bytes, follow: bool, atime: int, mtime: int, which: str) -> None:
        rel = self._canon(path, follow=follow)
        if rel is None:
            return
        p = self._abs(rel)
        try:
            if which == "both":
                os.utime(p, ns=(atime, mtime), follow_symlinks=False)
            else:  # mtime only: keep the current atime, as UTIME_OMIT would
                os.utime(p, ns=(os.lstat(p).st_atime_ns, mtime), follow_symlinks=False)
        except OSError:
            return
        s = os.lstat(p)
        self._ship(SetattrOp(rel, atime_ns=s.st_atime_ns if which == "both" else None, mtime_ns=s.st_mtime_ns))

    @rule(path=paths | st.just(b""), datasync=st.booleans())
    def fsync(self, path: bytes, datasync: bool) -> None:
        rel = self._canon(path, follow=True)
        if rel is None:
            return
        p = self._abs(rel)
        try:
            s = os.lstat(p)
        except OSError:
            return
        if not (stat.S_ISREG(s.st_mode) or stat.S_ISDIR(s.st_mode)):
            return  # the primary only ever fsyncs files and directories
        fd = os.open(p, os.O_RDONLY)
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)
        self._ship(FsyncOp(rel, datasync))

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def replica_matches_expected(self) -> None:
        assert_trees_equal(Path(os.fsdecode(self.exp)), Path(os.fsdecode(self.rep)), mtime=True)

    @invariant()
    def nothing_outside_changed(self) -> None:
        assert os.listdir(self.outside) == []
        assert sorted(os.listdir(self.tmp)) == [b"expected", b"outside", b"replica"]


def _rmtree(path: bytes) -> None:
    """rmtree that also copes with 0o000 directories when not root (open them up, retry)."""

    def retry(func, p, _exc) -> None:  # noqa: ANN001
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        func(p)

    if sys.version_info >= (3, 12):  # onerror is deprecated there (a warning, an error here)
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


SETTINGS = settings(max_examples=50, stateful_step_count=30, deadline=None)


def test_apply_model(tmp_path: Path) -> None:
    run_state_machine_as_test(lambda: ApplyModel(tmp_path), settings=SETTINGS)
