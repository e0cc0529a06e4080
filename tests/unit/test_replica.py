"""Replica: seq order, exactly once across kills, barriers before position, identity and epoch checks."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from octofs import apply, replayer
from octofs import replica as replica_mod
from octofs.errors import (
    DaemonRunningError,
    OpError,
    PeerEpochError,
    PeerError,
    ProtocolError,
)
from octofs.ops import (
    RENAME_EXCHANGE,
    CreateOp,
    FsyncOp,
    LinkOp,
    MkdirOp,
    Record,
    RenameOp,
    RmdirOp,
    SymlinkOp,
    TruncateOp,
    UnlinkOp,
    WriteOp,
)
from octofs.replica import UNKNOWN_SEQ, Replica, TargetLock
from tests.support.trees import tree_snapshot

VID = bytes(range(16))
T = 1_700_000_000_000_000_000


def rec(seq: int, op) -> Record:
    return Record(seq, T + seq, op)


def create(path: bytes) -> CreateOp:
    return CreateOp(path, 0o644, os.getuid(), os.getgid(), T)


def write(path: bytes, data: bytes, offset: int = 0) -> WriteOp:
    return WriteOp(path, offset, data, T)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def open_replica(root: Path, name: str = "v") -> Replica:
    return Replica.open(root, name)


def position(root: Path, name: str = "v") -> tuple[int, int]:
    return struct.unpack("<QQ", (root / ".octofs/vaults" / name / "position").read_bytes())


def kill(rep: Replica) -> None:
    """What SIGKILL leaves: fds closed, nothing made durable, page cache intact."""
    rep._close_fds()


def apply_all(rep: Replica, ops: list, start: int = 1) -> None:
    for i, op in enumerate(ops, start):
        rep.apply_record(rec(i, op))


# -- basics -------------------------------------------------------------------------


def test_open_creates_layout_and_starts_at_zero(root: Path) -> None:
    rep = open_replica(root)
    try:
        assert (root / "v").is_dir()
        assert (root / ".octofs/vaults/v/position").is_file()
        assert (rep.applied_seq, rep.durable_seq, rep.vault_id, rep.epoch) == (0, 0, None, 0)
        assert rep.owners == (os.geteuid() == 0)
        assert rep.needs_resync is None
    finally:
        rep.close()


@pytest.mark.parametrize("name", [".octofs", "..", ".", "a/b", "", "-x", "x" * 65, "a\0b"])
def test_bad_vault_names_refused(root: Path, name: str) -> None:
    with pytest.raises(ValueError):
        Replica.open(root, name)
    assert sorted(os.listdir(root)) in ([], [".octofs"]) and not (root / ".octofs/vaults").exists()


def test_symlink_at_replica_dir_is_not_followed(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "v").symlink_to(elsewhere)
    with pytest.raises(OSError):
        Replica.open(root, "v")
    assert list(elsewhere.iterdir()) == []


def test_applies_in_order_and_skips_duplicates(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, [create(b"f"), write(b"f", b"hello")])
    assert rep.applied_seq == 2
    rep.apply_record(rec(1, create(b"f")))  # a resend: skipped, so the file is not truncated
    rep.apply_record(rec(2, write(b"f", b"XXXXX")))
    assert (root / "v/f").read_bytes() == b"hello"
    assert rep.applied_seq == 2
    rep.close()


def test_gap_is_a_protocol_error_and_applies_nothing(root: Path) -> None:
    rep = open_replica(root)
    rep.apply_record(rec(1, create(b"f")))
    with pytest.raises(ProtocolError, match="gap"):
        rep.apply_record(rec(3, create(b"g")))
    assert not (root / "v/g").exists()
    assert rep.applied_seq == 1 and rep.needs_resync is None
    rep.close()


def test_apply_failure_marks_needs_resync_and_refuses_more(root: Path) -> None:
    rep = open_replica(root)
    with pytest.raises(OpError, match="cannot apply seq 1"):
        rep.apply_record(rec(1, UnlinkOp(b"missing")))
    assert rep.needs_resync and "unlink missing" in rep.needs_resync
    assert "unlink missing" in (root / ".octofs/vaults/v/needs_resync").read_text()
    with pytest.raises(OpError, match="needs a resync"):
        rep.apply_record(rec(1, create(b"f")))
    assert not (root / "v/f").exists()
    rep.close()
    rep2 = open_replica(root)
    assert rep2.needs_resync is not None
    rep2.close()


# -- durability -----------------------------------------------------------------------


def test_barrier_makes_durable_before_position(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    calls: list[str] = []
    real_barrier, real_fdatasync = apply.barrier, os.fdatasync

    def barrier(fd: int) -> None:
        calls.append(f"syncfs, position={position(root)}")
        real_barrier(fd)

    def fdatasync(fd: int) -> None:
        calls.append(f"position={position(root)}")
        real_fdatasync(fd)

    monkeypatch.setattr(apply, "barrier", barrier)
    monkeypatch.setattr(replica_mod.os, "fdatasync", fdatasync)
    rep.apply_record(rec(1, create(b"f")))
    rep.apply_record(rec(2, write(b"f", b"data")))
    rep.apply_record(rec(3, FsyncOp(b"f")))
    # Before op 1: the "touched" mark (durable 0, unknown) is made durable; then, at the
    # barrier, position = 3 is written, still "touched: unknown" (the next op needs no flush
    # of its own), and made durable by the syncfs itself: one flush, not two. A power cut
    # before the syncfs returns finds touched unknown, whichever durable seq the disk kept.
    assert calls == [f"position={(0, UNKNOWN_SEQ)}", f"syncfs, position={(3, UNKNOWN_SEQ)}"]
    assert rep.durable_seq == 3 and rep.unsettled
    # ... until the replica settles (idle: a heartbeat, or close).
    rep.settle()
    assert position(root) == (3, 3) and not rep.unsettled
    # From a settled position the first op makes "touched: unknown" durable again, before it runs.
    calls.clear()
    rep.apply_record(rec(4, write(b"f", b"more")))
    rep.apply_record(rec(5, FsyncOp(b"f")))
    assert calls == [f"position={(3, UNKNOWN_SEQ)}", f"syncfs, position={(5, UNKNOWN_SEQ)}"]
    rep.close()
    assert position(root) == (5, 5)


def test_make_durable_is_a_no_op_when_nothing_is_new(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    apply_all(rep, [create(b"f")])
    assert rep.make_durable() == 1
    monkeypatch.setattr(apply, "barrier", lambda fd: pytest.fail("syncfs without anything new"))
    assert rep.make_durable() == 1
    rep.close()


def test_nothing_after_a_barrier_before_it_is_durable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    seen: list[int] = []
    real = apply.apply_op

    def spy(fd, op, **kw):
        seen.append(rep.durable_seq)
        real(fd, op, **kw)

    def spy_data(fd, op):
        seen.append(rep.durable_seq)
        real_data(fd, op)

    def spy_create(fd, op, **kw):
        seen.append(rep.durable_seq)
        return real_create(fd, op, **kw)

    real_data, real_create = apply.apply_data, apply.create_open
    monkeypatch.setattr(apply, "apply_op", spy)
    monkeypatch.setattr(apply, "apply_data", spy_data)  # writes go through the run's fd
    monkeypatch.setattr(apply, "create_open", spy_create)  # creates keep their fd for a run
    apply_all(rep, [create(b"f"), FsyncOp(b"f"), write(b"f", b"x"), create(b"g")])
    # ops 3 and 4 were applied with durable_seq already 2 (the barrier's seq). The FsyncOp itself
    # is not handed to apply_op: the barrier's syncfs makes its file durable.
    assert seen == [0, 2, 2]
    rep.close()


def test_a_busy_barrier_writes_the_position_once(root: Path) -> None:
    """With the next record in hand, a barrier writes (durable, touched: unknown) in one flush, and
    the next op needs no position write of its own."""
    rep = open_replica(root)
    rep.apply_record(rec(1, create(b"f")))
    rep.apply_record(rec(2, FsyncOp(b"f")))
    assert position(root) == (2, UNKNOWN_SEQ) and rep.durable_seq == 2
    writes = []
    real = rep._write_position
    rep._write_position = lambda d, t: (writes.append((d, t)), real(d, t))  # type: ignore[method-assign]
    rep.apply_record(rec(3, write(b"f", b"x")))
    assert writes == []
    rep.make_durable()
    rep.settle()
    assert position(root) == (3, 3)
    rep.close()


def test_a_barrier_on_a_missing_path_needs_a_resync(root: Path) -> None:
    rep = open_replica(root)
    with pytest.raises(OpError, match="cannot apply seq 1"):
        rep.apply_record(rec(1, FsyncOp(b"missing")))
    assert rep.needs_resync is not None
    rep.close()


def test_close_makes_durable(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, [create(b"f"), write(b"f", b"abc")])
    assert rep.durable_seq == 0
    rep.close()
    assert position(root) == (2, 2)


# -- crashes ----------------------------------------------------------------------------


def test_kill_resumes_from_progress_exactly(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, [create(b"f"), write(b"f", b"abc"), RenameOp(b"f", b"g")])
    kill(rep)
    assert position(root)[0] == 0  # nothing was made durable
    rep = open_replica(root)
    assert rep.applied_seq == 3
    assert rep.durable_seq == 3  # open made it durable
    rep.apply_record(rec(3, RenameOp(b"f", b"g")))  # the primary resends: skipped, not re-applied
    rep.apply_record(rec(4, create(b"f")))
    assert (root / "v/g").read_bytes() == b"abc" and (root / "v/f").read_bytes() == b""
    rep.close()


def _kill_mid_op(rep: Replica, seq: int, op, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply ``op`` fully, then die before progress records it (the crash window)."""

    class Killed(BaseException):
        pass

    real = os.pwrite

    def pwrite(fd, data, offset):
        if fd == rep._prog_fd and offset == 0 and data[8:16] == bytes(8):  # "done", not "in flight"
            raise Killed
        return real(fd, data, offset)

    monkeypatch.setattr(replica_mod.os, "pwrite", pwrite)
    try:
        rep.apply_record(rec(seq, op))
    except Killed:
        pass
    else:  # a data op records "done" only when its run ends, so it is in flight until then
        assert isinstance(op, (WriteOp, TruncateOp)) and rep._run is not None
    monkeypatch.setattr(replica_mod.os, "pwrite", real)
    kill(rep)


SETUP = [create(b"a"), write(b"a", b"A"), MkdirOp(b"d", 0o755, os.getuid(), os.getgid(), T), create(b"d/x")]
WINDOW_OPS = {
    "unlink": UnlinkOp(b"a"),
    "rmdir": RmdirOp(b"d2"),
    "rename": RenameOp(b"a", b"b"),
    "rename-over": RenameOp(b"a", b"d/x"),
    "link": LinkOp(b"a", b"l"),
    "create": create(b"new"),
    "mkdir": MkdirOp(b"d3", 0o700, os.getuid(), os.getgid(), T),
    "symlink": SymlinkOp(b"s", b"../../etc", os.getuid(), os.getgid(), T),
    "write": write(b"a", b"BB", 1),
}


@pytest.mark.parametrize("kind", sorted(WINDOW_OPS))
def test_op_half_done_at_kill_is_tolerated_once(root: Path, tmp_path: Path, kind: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    setup = SETUP + ([MkdirOp(b"d2", 0o755, os.getuid(), os.getgid(), T)] if kind == "rmdir" else [])
    op = WINDOW_OPS[kind]
    rep = open_replica(root)
    apply_all(rep, setup)
    n = len(setup)
    _kill_mid_op(rep, n + 1, op, monkeypatch)
    rep = open_replica(root)
    assert rep.applied_seq == n
    rep.apply_record(rec(n + 1, op))  # the primary resends it: "already done" is fine
    rep.apply_record(rec(n + 2, create(b"after")))
    assert rep.needs_resync is None and rep.applied_seq == n + 2
    rep.close()
    # The result is exactly what applying each op once gives.
    expected = tmp_path / "expected"
    expected.mkdir()
    fd = os.open(expected, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for o in [*setup, op, create(b"after")]:
            apply.apply_op(fd, o)
    finally:
        os.close(fd)
    assert tree_snapshot(root / "v") == tree_snapshot(expected)


def test_tolerance_is_for_the_interrupted_op_only(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    apply_all(rep, SETUP)
    n = len(SETUP)
    _kill_mid_op(rep, n + 1, UnlinkOp(b"a"), monkeypatch)
    rep = open_replica(root)
    rep.apply_record(rec(n + 1, UnlinkOp(b"a")))
    with pytest.raises(OpError):  # a later missing file is a real divergence
        rep.apply_record(rec(n + 2, UnlinkOp(b"a")))
    assert rep.needs_resync
    rep.close()


def test_clean_restart_tolerates_nothing(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, SETUP)
    rep.close()
    rep = open_replica(root)
    with pytest.raises(OpError):
        rep.apply_record(rec(len(SETUP) + 1, UnlinkOp(b"nothing-here")))
    rep.close()


def test_interrupted_rename_exchange_needs_resync(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    apply_all(rep, SETUP)
    n = len(SETUP)
    _kill_mid_op(rep, n + 1, RenameOp(b"a", b"d/x", RENAME_EXCHANGE), monkeypatch)
    rep = open_replica(root)
    with pytest.raises(OpError, match="exchange"):
        rep.apply_record(rec(n + 1, RenameOp(b"a", b"d/x", RENAME_EXCHANGE)))
    assert "exchange" in rep.needs_resync
    rep.close()


def test_kill_repeatedly_in_the_window(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    apply_all(rep, SETUP)
    n = len(SETUP)
    _kill_mid_op(rep, n + 1, RenameOp(b"a", b"b"), monkeypatch)
    rep = open_replica(root)  # open makes durable with "touched = n + 1"
    assert position(root) == (n, n + 1)
    kill(rep)
    rep = open_replica(root)
    rep.apply_record(rec(n + 1, RenameOp(b"a", b"b")))
    assert (root / "v/b").read_bytes() == b"A" and rep.needs_resync is None
    rep.close()


# -- runs of data ops: one fd, the mtime set when the run ends --------------------------------


def wr(path: bytes, data: bytes, offset: int, n: int) -> WriteOp:
    """A write whose mtime (T + n) tells it apart from every other one."""
    return WriteOp(path, offset, data, T + n)


def mtime(p: Path) -> int:
    return os.stat(p, follow_symlinks=False).st_mtime_ns


def expected_tree(tmp_path: Path, ops: list) -> Path:
    """The tree that applying each op once, through apply_op, gives."""
    expected = tmp_path / "expected"
    expected.mkdir()
    fd = os.open(expected, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for o in ops:
            apply.apply_op(fd, o)
    finally:
        os.close(fd)
    return expected


RUN = [create(b"f"), *(wr(b"f", bytes([65 + i]) * 4096, (i * 3000) % 20000, i) for i in range(1, 9)),
       TruncateOp(b"f", 15000, T + 9), wr(b"f", b"tail", 14998, 10)]


def test_a_run_of_writes_uses_one_open(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    opens: list[bytes] = []
    real = apply.open_data
    monkeypatch.setattr(apply, "open_data", lambda fd, op: (opens.append(op.path), real(fd, op))[1])
    replayer._apply_all(rep, [rec(1, RUN[0])])  # the create in a batch of its own: its fd is closed
    replayer._apply_all(rep, [rec(i, o) for i, o in enumerate(RUN[1:], 2)])
    assert opens == [b"f"] and rep._run is None  # the batch's end closed it
    assert mtime(root / "v/f") == T + 10
    rep.close()


def test_a_create_keeps_its_fd_for_the_writes_after_it(root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The new file's fd starts the run: no open of its own for the writes; mode, owner, data and
    mtime as applying each op through apply_op gives, also for a mode without write permission."""
    opens: list[bytes] = []
    real = apply.open_data
    monkeypatch.setattr(apply, "open_data", lambda fd, op: (opens.append(op.path), real(fd, op))[1])
    ops = [*RUN, CreateOp(b"ro", 0o444, os.getuid(), os.getgid(), T + 20), wr(b"ro", b"data", 0, 21),
           create(b"empty"), create(b"f2"), wr(b"f", b"again", 1, 22)]
    rep = open_replica(root)
    replayer._apply_all(rep, [rec(i, o) for i, o in enumerate(ops, 1)])
    assert opens == [b"f"] and rep._run is None  # only the write after other files' creates opened f
    rep.close()
    assert tree_snapshot(root / "v", mtime=True) == tree_snapshot(expected_tree(tmp_path, ops), mtime=True)
    st = os.stat(root / "v/ro")
    assert (st.st_mode & 0o7777, st.st_mtime_ns, (root / "v/ro").read_bytes()) == (0o444, T + 21, b"data")
    assert mtime(root / "v/empty") == T and (root / "v/empty").read_bytes() == b""


def test_data_ops_on_other_paths_each_get_their_own_file(root: Path, tmp_path: Path) -> None:
    ops = [create(b"a"), create(b"b"), wr(b"a", b"A1", 0, 1), wr(b"a", b"A2", 2, 2), wr(b"b", b"B1", 0, 3),
           TruncateOp(b"a", 3, T + 4), wr(b"b", b"B2", 1, 5), wr(b"a", b"A3", 3, 6)]
    rep = open_replica(root)
    replayer._apply_all(rep, [rec(i, o) for i, o in enumerate(ops, 1)])
    rep.close()
    assert (root / "v/a").read_bytes() == b"A1AA3" and (root / "v/b").read_bytes() == b"BB2"
    assert (mtime(root / "v/a"), mtime(root / "v/b")) == (T + 6, T + 5)
    assert tree_snapshot(root / "v", mtime=True) == tree_snapshot(expected_tree(tmp_path, ops), mtime=True)


def test_a_run_then_rename_or_unlink_never_writes_to_the_old_file(root: Path, tmp_path: Path) -> None:
    ops = [*RUN, RenameOp(b"f", b"g"), create(b"f"), wr(b"f", b"new", 0, 20), wr(b"f", b"!", 3, 21),
           UnlinkOp(b"f"), create(b"f"), wr(b"f", b"newest", 0, 30), MkdirOp(b"d", 0o755, os.getuid(), os.getgid(), T),
           wr(b"f", b"x", 100, 31), RenameOp(b"f", b"d/f"), wr(b"g", b"G", 0, 40)]
    rep = open_replica(root)
    replayer._apply_all(rep, [rec(i, o) for i, o in enumerate(ops, 1)])  # one batch: the runs end inside it
    rep.close()
    assert tree_snapshot(root / "v", mtime=True) == tree_snapshot(expected_tree(tmp_path, ops), mtime=True)
    assert (root / "v/d/f").read_bytes() == b"newest" + bytes(94) + b"x"
    assert mtime(root / "v/d/f") == T + 31 and mtime(root / "v/g") == T + 40


def test_a_run_then_a_barrier_makes_the_exact_mtime_durable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    at_syncfs: list[tuple[int, bytes]] = []
    real = apply.barrier

    def barrier(fd: int) -> None:
        at_syncfs.append((mtime(root / "v/f"), (root / "v/f").read_bytes()))
        real(fd)

    monkeypatch.setattr(apply, "barrier", barrier)
    ops = [*RUN, wr(b"f", b"commit", 0, 11), FsyncOp(b"f")]
    for i, o in enumerate(ops, 1):  # not through _apply_all: the barrier itself ends the run
        rep.apply_record(rec(i, o))
    data = (root / "v/f").read_bytes()
    assert at_syncfs == [(T + 11, data)] and data.startswith(b"commit") and len(data) == 15002
    assert rep.durable_seq == len(ops) and rep._run is None
    rep.close()


@pytest.mark.parametrize("killed_after", [2, 5, len(RUN)])
def test_kill_in_a_run_then_restart_gives_exact_data_and_mtime(root: Path, tmp_path: Path,
                                                               killed_after: int) -> None:
    """Killed with the run's fd open, its mtime not set, then the primary resends from the durable seq."""
    ops = [*RUN, RenameOp(b"f", b"g"), wr(b"g", b"after", 0, 50)]
    rep = open_replica(root)
    apply_all(rep, ops[:killed_after])
    assert killed_after == 2 or rep._run is not None
    kill(rep)
    rep = open_replica(root)
    # The last op started is re-applied (its mtime is the one that counts); all before it stay applied.
    assert rep.applied_seq == killed_after - 1 and rep.needs_resync is None
    replayer._apply_all(rep, [rec(i, o) for i, o in enumerate(ops, 1)])
    assert rep.applied_seq == len(ops) and rep.needs_resync is None
    rep.close()
    assert tree_snapshot(root / "v", mtime=True) == tree_snapshot(expected_tree(tmp_path, ops), mtime=True)
    assert mtime(root / "v/g") == T + 50


def test_kill_at_the_end_of_a_run_then_restart_sets_its_mtime(root: Path, tmp_path: Path) -> None:
    """The run's last op was applied, the next op (a rename) not started: the restart must not skip
    to the rename with the file's mtime from before the run."""
    ops = [*RUN, RenameOp(b"f", b"g")]
    rep = open_replica(root)
    apply_all(rep, RUN)
    kill(rep)
    rep = open_replica(root)
    replayer._apply_all(rep, [rec(i, o) for i, o in enumerate(ops, 1)])
    rep.close()
    assert mtime(root / "v/g") == T + 10
    assert tree_snapshot(root / "v", mtime=True) == tree_snapshot(expected_tree(tmp_path, ops), mtime=True)


def test_kill_twice_in_a_run(root: Path, tmp_path: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, RUN[:6])
    kill(rep)
    rep = open_replica(root)
    kill(rep)  # killed again right after the restart, before anything was resent
    rep = open_replica(root)
    replayer._apply_all(rep, [rec(i, o) for i, o in enumerate(RUN, 1)])
    rep.close()
    assert tree_snapshot(root / "v", mtime=True) == tree_snapshot(expected_tree(tmp_path, RUN), mtime=True)


def test_a_run_interrupted_by_a_synchronize_answer(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, RUN)
    assert rep._run is not None  # no batch end yet: the answer itself must end the run
    [entry] = rep.answer((("stat", b"f"),), 4096)
    assert entry[6] == T + 10 and entry[5] == 15002  # mtime_ns, size
    assert rep._run is None and mtime(root / "v/f") == T + 10
    rep.apply_record(rec(len(RUN) + 1, wr(b"f", b"more", 0, 60)))  # a new run opens the file again
    replayer._apply_all(rep, [])
    assert mtime(root / "v/f") == T + 60 and (root / "v/f").read_bytes().startswith(b"more")
    rep.close()


def test_a_run_ends_before_make_durable_settle_and_close(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, RUN[:4])
    rep.make_durable()
    assert rep._run is None and mtime(root / "v/f") == T + 3
    apply_all(rep, [wr(b"f", b"z", 0, 70)], start=5)
    rep.close()
    assert mtime(root / "v/f") == T + 70
    assert struct.unpack("<QQ", (root / ".octofs/vaults/v/progress").read_bytes()[:16]) == (5, 0)


def test_a_failed_write_in_a_run_keeps_the_last_applied_mtime(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, RUN[:4])
    with pytest.raises(OpError, match="cannot apply seq 5"):
        rep.apply_record(rec(5, WriteOp(b"f", 0, b"x", 2**64 * 10**9)))  # an mtime time_t cannot hold
    assert rep.needs_resync and rep._run is None and mtime(root / "v/f") == T + 3
    rep.close()


# -- machine went down (boot id changes) ------------------------------------------------


def test_reboot_while_idle_resumes_at_position(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    apply_all(rep, SETUP)
    rep.make_durable()
    kill(rep)
    monkeypatch.setattr(replica_mod, "current_boot_id", lambda: b"another boot....")
    rep = open_replica(root)
    assert (rep.applied_seq, rep.durable_seq, rep.needs_resync) == (len(SETUP), len(SETUP), None)
    rep.close()


def test_reboot_while_replaying_needs_resync(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = open_replica(root)
    apply_all(rep, SETUP)
    rep.make_durable()
    rep.apply_record(rec(len(SETUP) + 1, create(b"z")))  # applied, not durable
    kill(rep)
    monkeypatch.setattr(replica_mod, "current_boot_id", lambda: b"another boot....")
    rep = open_replica(root)
    assert rep.applied_seq == len(SETUP)
    assert rep.needs_resync and "power cut" in rep.needs_resync
    rep.close()


def test_power_cut_during_a_barriers_flush_never_resumes_from_its_unflushed_seq(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a busy barrier the new durable seq is written before the syncfs that flushes it: if the
    machine goes down during that flush, the disk may say "durable N" for data it lacks, but it
    also says "touched: unknown", so the replica is marked for a Synchronize, never resumed at N."""
    rep = open_replica(root)
    apply_all(rep, SETUP)
    rep.make_durable()
    rep.settle()

    class PowerCut(Exception):
        pass

    def barrier(fd: int) -> None:  # the machine goes down while syncfs flushes
        raise PowerCut

    n = len(SETUP)
    rep.apply_record(rec(n + 1, create(b"z")))
    monkeypatch.setattr(apply, "barrier", barrier)
    with pytest.raises(PowerCut):
        rep.apply_record(rec(n + 2, FsyncOp(b"z")))
    assert position(root) == (n + 2, UNKNOWN_SEQ)  # the worst case: that write did reach the disk
    kill(rep)
    monkeypatch.setattr(replica_mod, "current_boot_id", lambda: b"another boot....")
    rep = open_replica(root)
    assert rep.needs_resync and "power cut" in rep.needs_resync
    rep.close()


def test_missing_replica_dir_with_state_needs_resync(root: Path) -> None:
    rep = open_replica(root)
    apply_all(rep, SETUP)
    rep.close()
    import shutil

    shutil.rmtree(root / "v")
    rep = open_replica(root)
    assert rep.needs_resync and "missing" in rep.needs_resync
    rep.close()


# -- identity and epoch ------------------------------------------------------------------


def test_first_contact_records_identity_and_epoch(root: Path) -> None:
    rep = open_replica(root)
    rep.check_peer(VID, 3)
    rep.close()
    assert (root / ".octofs/vaults/v/vault_id").read_text().strip() == VID.hex()
    rep = open_replica(root)
    assert (rep.vault_id, rep.epoch) == (VID, 3)
    rep.check_peer(VID, 3)
    rep.check_peer(VID, 4)
    assert rep.epoch == 4 and (root / ".octofs/vaults/v/epoch").read_text().strip() == "4"
    rep.close()


def test_other_vault_id_refused_naming_both(root: Path) -> None:
    rep = open_replica(root)
    rep.check_peer(VID, 1)
    other = bytes(16)
    with pytest.raises(PeerError) as info:
        rep.check_peer(other, 1, peer="primary 10.0.0.9:5000")
    assert not isinstance(info.value, PeerEpochError)
    assert VID.hex() in info.value.message and other.hex() in info.value.message
    assert "10.0.0.9:5000" in info.value.message
    assert rep.vault_id == VID
    rep.close()


def test_lower_epoch_refused(root: Path) -> None:
    rep = open_replica(root)
    rep.check_peer(VID, 5)
    with pytest.raises(PeerEpochError, match="lower than the epoch 5"):
        rep.check_peer(VID, 4)
    assert rep.epoch == 5
    rep.close()


def test_target_lock_is_exclusive(root: Path) -> None:
    a = TargetLock(root)
    a.acquire()
    b = TargetLock(root)
    try:
        with pytest.raises(DaemonRunningError, match="Another octofs serve"):
            b.acquire()
    finally:
        a.release()
    b.acquire()
    b.release()
