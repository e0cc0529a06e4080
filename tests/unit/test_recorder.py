"""Recorder.sync_with: an application's fsync, the backing file's then the journal's, in one worker hop."""

from __future__ import annotations

import threading

import pytest

from octofs import ops
from octofs.errors import JournalError
from octofs.journal import JournalReader


async def test_sync_with_runs_the_file_sync_first_then_makes_the_journal_durable(recorder, tmp_path):
    seen = []

    def sync_file():
        # Runs in a worker thread, before the journal's fsync: the op is not durable yet.
        seen.append((threading.current_thread() is not threading.main_thread(), recorder.writer.durable_seq))

    recorder.record(ops.WriteOp(b"f", 0, b"x" * 10, 1))
    seq = recorder.record(ops.FsyncOp(b"f", datasync=False))
    await recorder.sync_with(seq, sync_file)
    assert seen == [(True, 0)]
    assert recorder.writer.durable_seq == seq
    assert [r.seq for r in JournalReader(tmp_path / "j").records(1)] == [1, 2]


async def test_sync_with_covered_by_an_earlier_flush_only_syncs_the_file(recorder):
    seq = recorder.record(ops.FsyncOp(b"f", datasync=True))
    await recorder.sync_all()
    calls = []
    await recorder.sync_with(seq, lambda: calls.append(recorder.writer.durable_seq))
    assert calls == [seq]


async def test_a_failing_file_sync_still_makes_the_journal_durable(recorder):
    seq = recorder.record(ops.FsyncOp(b"f", datasync=False))

    def sync_file():
        raise OSError(5, "EIO from the backing file")

    with pytest.raises(OSError, match="EIO from the backing file"):
        await recorder.sync_with(seq, sync_file)
    assert recorder.writer.durable_seq == seq
    assert not recorder.failsafe  # the backing file's error is the application's, not the journal's


async def test_a_failing_journal_fsync_goes_failsafe(recorder, monkeypatch):
    seq = recorder.record(ops.FsyncOp(b"f", datasync=False))

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("octofs.journal.os.fsync", broken_fsync)
    with pytest.raises(JournalError):
        await recorder.sync_with(seq, lambda: None)
    assert recorder.failsafe
    assert "fsync of the journal failed" in recorder.failure


async def test_sync_with_inline_runs_in_the_loops_thread(recorder):
    seen = []
    seq = recorder.record(ops.FsyncOp(b"f", datasync=False))
    await recorder.sync_with(seq, lambda: seen.append(threading.current_thread() is threading.main_thread()),
                             inline=True)
    assert seen == [True]
    assert recorder.writer.durable_seq == seq
