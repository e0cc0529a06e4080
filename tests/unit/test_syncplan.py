"""SyncPlan against two local directories: the decisions and repairs of a Synchronize, without a network."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from octofs import apply, scan
from octofs.exclude import ExcludeFilter
from octofs.ops import Record
from octofs.syncplan import MAX_VERIFY_ATTEMPTS, SyncPlan, Touches
from octofs.tree import assert_trees_equal, tree_snapshot
from tests.support.planted import PLANTED_PHRASES, make_tree, plant_differences


def _fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def run_plan(primary: Path, target: Path, *, verify: bool = False, block_size: int = 4096, **kw) -> SyncPlan:
    """Drive a plan to the end; the 'target' answers with scan on its dir and applies repairs with apply_op."""
    pfd, tfd = _fd(primary), _fd(target)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, verify=verify, block_size=block_size, **kw)
        for _ in range(10_000):
            if plan.done:
                break
            query = plan.next_query()
            if query is not None:
                req, items = query
                answers = _target_answers(tfd, items, block_size)
                plan.compare(req, answers, plan.primary_view(items), Touches())
            for op in plan.produce(1 << 20):
                apply.apply_op(tfd, op, chown=os.geteuid() == 0)
        assert plan.done
        return plan
    finally:
        os.close(pfd)
        os.close(tfd)


def _target_answers(tfd: int, items, block_size: int) -> list:
    out = []
    for kind, path in items:
        if kind == "list":
            listing = scan.list_dir(tfd, path)
            out.append(None if listing is None else [scan.entry_to_wire(e) for e in listing])
        elif kind == "stat":
            info = scan.stat_path(tfd, path)
            out.append(None if info is None else scan.entry_to_wire(info))
        else:
            h = scan.file_hashes(tfd, path, block_size)
            out.append(None if h is None else list(h))
    return out


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "primary", tmp_path / "target"
    a.mkdir()
    b.mkdir()
    return a, b


def test_everything_planted_is_repaired(dirs):
    a, b = dirs
    plant_differences(a, b)
    plan = run_plan(a, b)
    assert_trees_equal(a, b, mtime=True)
    assert plan.stats.differences >= 15
    # the link structure is the primary's
    assert os.stat(b / "link-src").st_ino == os.stat(b / "link-dst").st_ino
    assert os.stat(b / "sep1").st_ino != os.stat(b / "sep2").st_ino


def test_verify_reports_each_difference_and_changes_nothing(dirs):
    a, b = dirs
    plant_differences(a, b)
    before = tree_snapshot(b, mtime=True)
    plan = run_plan(a, b, verify=True)
    assert tree_snapshot(b, mtime=True) == before
    text = "\n".join(plan.lines)
    for phrase in PLANTED_PHRASES:
        assert phrase in text, (phrase, text)


def test_identical_trees_send_nothing(dirs):
    a, b = dirs
    for root in (a, b):
        make_tree(root, {f"f{i:03d}/g{j}.txt": f"{i}-{j}".encode() * 50 for i in range(30) for j in range(5)})
    for rel in (a, b):
        for p in sorted(rel.rglob("*")):
            os.utime(p, ns=(10**18, 10**18), follow_symlinks=False)
    plan = run_plan(a, b)
    assert plan.stats.differences == 0 and plan.stats.repairs == 0 and plan.stats.repair_bytes == 0
    assert plan.stats.files == 150


def test_one_block_differs_in_a_big_file_sends_one_block(dirs):
    a, b = dirs
    data = bytearray(os.urandom(8 << 20))
    (a / "big").write_bytes(data)
    data[5_000_000] ^= 0xFF
    (b / "big").write_bytes(data)
    os.utime(b / "big", ns=(os.stat(a / "big").st_atime_ns, os.stat(a / "big").st_mtime_ns))
    plan = run_plan(a, b, block_size=64 * 1024)
    assert_trees_equal(a, b, mtime=True)
    assert plan.stats.repair_bytes == 64 * 1024


def test_sparse_file_copy_skips_zero_blocks(dirs):
    a, b = dirs
    with open(a / "sparse", "wb") as f:
        f.truncate(50 << 20)
        f.seek(20 << 20)
        f.write(b"middle")
    plan = run_plan(a, b, block_size=64 * 1024)
    assert_trees_equal(a, b)
    assert plan.stats.repair_bytes == 64 * 1024


def test_excluded_paths_are_neither_compared_nor_removed(dirs):
    a, b = dirs
    make_tree(a, {"keep.txt": b"k", "cache/p.tmp": b"primary"})
    make_tree(b, {"keep.txt": b"k", "cache/t.tmp": b"target only", "x.log": b"log"})
    plan = run_plan(a, b, exclude=ExcludeFilter(["cache/", "*.log"]))
    assert (b / "cache/t.tmp").read_bytes() == b"target only" and (b / "x.log").exists()
    assert not (b / "cache/p.tmp").exists()
    assert not [line for line in plan.lines if "cache" in line or ".log" in line]


def test_a_listing_touched_in_its_window_is_compared_again(dirs):
    a, b = dirs
    make_tree(a, {"d/new.txt": b"n"})
    (b / "d").mkdir()
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=False, paths=[b"d"])
        req, items = plan.next_query()
        plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
        req, items = plan.next_query()
        assert items == [("list", b"d")]
        busy = Touches(entries={b"d/new.txt"})
        plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), busy)
        assert not plan.has_repairs and plan.stats.rechecks == 1
        req, items = plan.next_query()
        assert items == [("stat", b"d/new.txt")]
        plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
        assert plan.has_repairs
    finally:
        os.close(pfd)
        os.close(tfd)


def test_written_blocks_are_sent_even_when_hashes_match(dirs):
    a, b = dirs
    make_tree(a, {"f": b"x" * 20000})
    make_tree(b, {"f": b"x" * 20000})
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=False, paths=[b"f"], block_size=4096)
        req, items = plan.next_query()
        plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
        req, items = plan.next_query()
        assert items == [("hash", b"f")]
        plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items),
                     Touches(data={b"f": [(5000, 5001)]}))
        ops = plan.produce(1 << 20)
        writes = [op for op in ops if type(op).__name__ == "WriteOp"]
        assert [(w.offset, len(w.data)) for w in writes] == [(4096, 4096)]
    finally:
        os.close(pfd)
        os.close(tfd)


def test_remove_tree_op_is_confined_and_tolerant(tmp_path: Path):
    from octofs.ops import RemoveTreeOp
    root = tmp_path / "r"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    root.mkdir()
    (root / "d/e").mkdir(parents=True)
    (root / "d/e/f").write_text("f")
    os.symlink(outside, root / "d/link")
    os.symlink(outside, root / "l")
    fd = _fd(root)
    try:
        apply.apply_op(fd, RemoveTreeOp(b"d"))
        apply.apply_op(fd, RemoveTreeOp(b"d"))  # already absent
        apply.apply_op(fd, RemoveTreeOp(b"l/keep"))  # through a symlink: not followed
        apply.apply_op(fd, RemoveTreeOp(b"missing/deeper"))
    finally:
        os.close(fd)
    assert not (root / "d").exists() and (outside / "keep").exists() and os.path.islink(root / "l")
    assert stat.S_ISDIR(os.stat(outside).st_mode)


def test_repair_record_round_trips_through_the_codec():
    from octofs import codec
    from octofs.ops import RemoveTreeOp
    rec = Record(5, 1, RemoveTreeOp(b"a/b"))
    assert codec.decode_record(codec.encode_record(rec)) == rec


def _finish(plan: SyncPlan, tfd: int) -> None:
    """Drive ``plan`` to its end in quiet windows, repairs applied to the target as they come."""
    for _ in range(100):
        if plan.done:
            break
        for op in plan.produce(1 << 20):
            apply.apply_op(tfd, op, chown=os.geteuid() == 0)
        query = plan.next_query()
        if query is not None:
            req, items = query
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
    assert plan.done


def _busy_until_replaced(plan: SyncPlan, tfd: int, path: bytes) -> None:
    """Compare ``path`` in busy windows until the plan gives up and copies it whole (a replace)."""
    while not plan.has_repairs:
        req, items = plan.next_query()
        assert ("stat", path) in items
        plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches(entries={path}))
    assert plan.stats.rechecks >= 4


@pytest.mark.parametrize("dst_compared_first", [False, True], ids=["replace-then-compare", "compare-then-replace"])
def test_a_replaced_file_linked_meanwhile_stays_linked(dirs, dst_compared_first: bool):
    """A whole-file copy of a name that the application hard-links during the Synchronize keeps the link.

    The copy makes a new inode on the target; it must become (or be joined by) the other
    name, not split the two apart (the CI failure of test_verify_only_…_then_sync_repairs).
    """
    from octofs.ops import LinkOp
    a, b = dirs
    make_tree(a, {"src": b"linked content"})
    make_tree(b, {"src": b"linked content"})
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, paths=[b"src"], block_size=4096)
        _busy_until_replaced(plan, tfd, b"src")
        # The application links it; the stream applies the same link on the target.
        os.link(a / "src", a / "dst")
        apply.apply_op(tfd, LinkOp(b"src", b"dst"))
        plan.note(10, LinkOp(b"src", b"dst"))
        if dst_compared_first:
            req, items = plan.next_query()
            assert items == [("stat", b"dst")]
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
        _finish(plan, tfd)
    finally:
        os.close(pfd)
        os.close(tfd)
    assert_trees_equal(a, b)
    assert os.stat(b / "src").st_ino == os.stat(b / "dst").st_ino


def test_two_names_copied_whole_after_a_link_share_one_inode(dirs):
    """Both names missing on the target (the stream's link was skipped: its source was not there yet);
    the first was compared before the application linked it: the second copy must be a link of the first."""
    from octofs.ops import LinkOp
    a, b = dirs
    make_tree(a, {"w/f28": b"content of f28"})
    (b / "w").mkdir()
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, block_size=4096)
        while not plan.has_repairs:  # compared while it had one name: a whole copy is queued
            req, items = plan.next_query()
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
        os.link(a / "w/f28", a / "w/l1")  # the application links it; the target skipped the link
        plan.note(10, LinkOp(b"w/f28", b"w/l1"))
        _finish(plan, tfd)
    finally:
        os.close(pfd)
        os.close(tfd)
    assert_trees_equal(a, b)
    assert os.stat(b / "w/f28").st_ino == os.stat(b / "w/l1").st_ino


def test_a_name_linked_after_its_source_was_compared_keeps_the_link_when_copied_whole(dirs):
    """The source was compared (equal) while it had one name; the application then linked it and the
    stream linked it on the target too; the new name was busy until the plan copied it whole. The
    copy is a new inode: the source must join it (the CI failure of test_verify_only_…, second form)."""
    from octofs.ops import LinkOp
    a, b = dirs
    make_tree(a, {"src": b"linked content"})
    make_tree(b, {"src": b"linked content"})
    st = os.stat(a / "src")
    os.utime(b / "src", ns=(st.st_atime_ns, st.st_mtime_ns))
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, paths=[b"src"], block_size=4096)
        while (query := plan.next_query()) is not None:  # quiet windows: src is equal
            req, items = query
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
        assert not plan.has_repairs
        os.link(a / "src", a / "dst")
        apply.apply_op(tfd, LinkOp(b"src", b"dst"))
        plan.note(10, LinkOp(b"src", b"dst"))
        _busy_until_replaced(plan, tfd, b"dst")
        _finish(plan, tfd)
    finally:
        os.close(pfd)
        os.close(tfd)
    assert_trees_equal(a, b)
    assert os.stat(b / "src").st_ino == os.stat(b / "dst").st_ino


@pytest.mark.parametrize("verify", [False, True], ids=["sync", "verify"])
def test_metadata_an_op_changed_in_the_window_is_not_a_difference(dirs, verify: bool):
    """A chmod between the target's answer and the primary's look (the op not applied on the target yet)
    is no difference: a Synchronize sets it again, a verify looks again; only a quiet window decides."""
    a, b = dirs
    make_tree(a, {"f": b"x"})
    make_tree(b, {"f": b"x"})
    st = os.stat(a / "f")
    os.utime(b / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(a / "f", 0o600)
    os.chmod(b / "f", 0o644)
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, paths=[b"f"], verify=verify, block_size=4096)
        req, items = plan.next_query()
        assert ("stat", b"f") in items
        plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches(meta={b"f"}))
        assert plan.stats.differences == 0
        assert plan.has_repairs != verify  # a Synchronize sets the metadata again
        if verify:  # a verify compares it again, and a quiet window tells
            _finish(plan, tfd)
            assert plan.stats.differences == 1 and plan.lines == ["f: differs in mode"]
        else:
            _finish(plan, tfd)
            assert plan.stats.differences == 0
    finally:
        os.close(pfd)
        os.close(tfd)
    if not verify:
        assert_trees_equal(a, b, mtime=True)


def test_a_hard_linked_name_compared_again_is_not_linked_to_itself(dirs):
    """A name copied whole (it has another name) and then compared again (a recheck) is the inode's
    first name: it must not become a link of itself (the target removed it, then could not link it)."""
    a, b = dirs
    make_tree(a, {"x": b"shared"})
    os.link(a / "x", a / "y")
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, paths=[b"x"], block_size=4096)
        while not plan.has_repairs:  # missing on the target: a whole copy is queued
            req, items = plan.next_query()
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), Touches())
        plan.recheck(b"x")
        _finish(plan, tfd)
    finally:
        os.close(pfd)
        os.close(tfd)
    assert (b / "x").read_bytes() == b"shared"


def test_a_write_under_another_name_of_a_hard_linked_file_is_no_difference(dirs):
    """The application writes a hard-linked file through one name (the op is journaled under it) while
    the other name is compared, and the target has not applied the write yet: not a difference."""
    a, b = dirs
    make_tree(a, {"x": b"new content"})
    os.link(a / "x", a / "y")
    make_tree(b, {"x": b"old content"})
    os.link(b / "x", b / "y")
    for name in ("x", "y"):
        st = os.stat(a / name)
        os.utime(b / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(b / "x", ns=(1, 1))  # and an mtime the write changed
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, paths=[b"y"], verify=True, block_size=4096)
        written = Touches(data={b"x": [(0, 11)]})
        for _ in range(3):  # the stat, then the hashes, in windows where the write is in flight
            query = plan.next_query()
            if query is None:
                break
            req, items = query
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), written)
        assert plan.stats.differences == 0
        (b / "x").write_bytes(b"new content")  # the stream catches up
        st = os.stat(a / "x")
        os.utime(b / "x", ns=(st.st_atime_ns, st.st_mtime_ns))
        _finish(plan, tfd)
        assert plan.stats.differences == 0, plan.lines
    finally:
        os.close(pfd)
        os.close(tfd)


def _growing_while_read(monkeypatch: pytest.MonkeyPatch, path: Path, extra: bytes) -> None:
    """The next read of ``path`` that comes back short (the end of the file) lets ``extra`` be appended
    right after it: an application appending while the file is hashed."""
    real_pread = os.pread
    ino = os.stat(path).st_ino
    pending = [extra]

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        if pending and len(data) < n and os.fstat(fd).st_ino == ino:
            with open(path, "ab") as f:
                f.write(pending.pop())
        return data

    monkeypatch.setattr(scan.os, "pread", pread)


def test_a_file_appended_while_hashed_keeps_its_blocks_aligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    log = tmp_path / "log"
    log.write_bytes(os.urandom(10_000))
    _growing_while_read(monkeypatch, log, os.urandom(300))
    fd = _fd(tmp_path)
    try:
        size, _, digests = scan.file_hashes(fd, b"log", 4096)
    finally:
        os.close(fd)
    data = log.read_bytes()
    assert size == len(data) == 10_300  # what was there when reading ended
    expected = [scan.hashlib.blake2b(data[i:i + 4096], digest_size=scan.DIGEST_BYTES).digest()
                for i in range(0, size, 4096)]
    assert digests == b"".join(expected)  # block i is bytes i*4096.., not shifted by the short read


@pytest.mark.parametrize("verify", [False, True], ids=["sync", "verify"])
def test_a_log_appended_while_compared_is_no_difference(dirs, monkeypatch: pytest.MonkeyPatch, verify: bool):
    """The target answered before an append it has not applied yet; the primary's file grows while it is
    hashed: the append is in the window, so this is no difference (a verify-only run reported one,
    1 Synchronize in 3 under the replication workload, when the short read shifted the blocks)."""
    a, b = dirs
    old = os.urandom(10_000)
    make_tree(a, {"log": old})
    make_tree(b, {"log": old})
    st = os.stat(a / "log")
    os.utime(b / "log", ns=(st.st_atime_ns, st.st_mtime_ns))
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, paths=[b"log"], verify=verify, block_size=4096)
        window = Touches(data={b"log": [(10_000, 10_300)]})
        hashed = False
        while (query := plan.next_query()) is not None:
            req, items = query
            if ("hash", b"log") in items and not hashed:
                _growing_while_read(monkeypatch, a / "log", os.urandom(300))
                hashed = True
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), window)
            if hashed:  # the stream catches up: the target applies the append, later windows are quiet
                (b / "log").write_bytes((a / "log").read_bytes())
                os.utime(b / "log", ns=(st.st_atime_ns, os.stat(a / "log").st_mtime_ns))
                window = Touches()
        assert hashed and plan.stats.differences == 0, plan.lines
    finally:
        os.close(pfd)
        os.close(tfd)


def test_verify_of_a_path_busy_in_every_window_ends_and_says_so(dirs):
    """A verify cannot copy a file that changes in every window (an application appending all along):
    after MAX_VERIFY_ATTEMPTS busy windows it lists it as not verified, no difference, and ends (it
    compared it again forever before)."""
    a, b = dirs
    make_tree(a, {"log": b"x" * 5000, "quiet": b"q"})
    make_tree(b, {"log": b"x" * 4000, "quiet": b"Q"})  # and a real difference elsewhere
    for name in ("log", "quiet"):
        st = os.stat(a / name)
        os.utime(b / name, ns=(st.st_atime_ns, st.st_mtime_ns - (name == "log")))
    pfd, tfd = _fd(a), _fd(b)
    try:
        plan = SyncPlan(pfd, owners=os.geteuid() == 0, verify=True, block_size=4096)
        busy = Touches(data={b"log": [(4000, 5000)]})  # the target is always one append behind
        for _ in range(100):
            query = plan.next_query()
            if query is None:
                break
            req, items = query
            plan.compare(req, _target_answers(tfd, items, 4096), plan.primary_view(items), busy)
        assert plan.done
    finally:
        os.close(pfd)
        os.close(tfd)
    assert plan.lines == ["quiet: content differs (1 of 1 blocks)"]  # the rest was compared
    assert plan.stats.unverified == 1
    assert plan.unverified_lines == [f"log: changed during each of {MAX_VERIFY_ATTEMPTS} comparisons of it: not verified"]
