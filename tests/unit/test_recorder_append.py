"""Recorder.record and wait_appended: every append wakes every tailer waiting at that moment."""

from __future__ import annotations

import trio

from octofs import ops
from octofs.journal import JournalReader
from octofs.recorder import INDEX_INTERVAL_NS


async def test_every_append_wakes_every_waiting_tailer(recorder):
    woken: list[tuple[str, int]] = []

    async def tail(name: str, rounds: int) -> None:
        for _ in range(rounds):
            await recorder.wait_appended()
            woken.append((name, recorder.writer.last_seq))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tail, "a", 3)
        nursery.start_soon(tail, "b", 3)
        for seq in (1, 2, 3):
            await trio.testing.wait_all_tasks_blocked()
            assert recorder.record(ops.WriteOp(b"f", 0, b"x", 1)) == seq
    assert sorted(woken) == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)]


async def test_a_tailer_that_starts_waiting_after_an_append_waits_for_the_next(recorder):
    recorder.record(ops.WriteOp(b"f", 0, b"x", 1))  # nobody waiting: no wakeup is kept for later
    with trio.move_on_after(0.05) as scope:
        await recorder.wait_appended()
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.wait_appended)
        await trio.testing.wait_all_tasks_blocked()
        recorder.record(ops.WriteOp(b"f", 1, b"y", 2))
    assert recorder.writer.last_seq == 2


async def test_record_calls_listeners_and_indexes_append_times(recorder, tmp_path):
    seen = []
    recorder.listeners.append(lambda seq, op: seen.append((seq, type(op).__name__)))
    recorder.record(ops.WriteOp(b"f", 0, b"x", 1))
    recorder.record(ops.FsyncOp(b"f"))
    assert seen == [(1, "WriteOp"), (2, "FsyncOp")]
    # Two appends within INDEX_INTERVAL_NS: one index entry, for the first.
    assert recorder._index_seqs == [1]
    # A known append time read back later moves the next entry's threshold with it.
    recorder.note_append_time(3, recorder._index_times[-1] + 10 * INDEX_INTERVAL_NS)
    assert recorder._index_seqs == [1, 3]
    assert [r.seq for r in JournalReader(tmp_path / "j").records(1)] == [1, 2]
