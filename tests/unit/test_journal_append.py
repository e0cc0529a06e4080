"""JournalWriter.append's fast path: one pwrite per record, the rest written after a short write."""

from __future__ import annotations

import os

from octofs.codec import encode_payload, encode_record
from octofs.journal import JournalReader, JournalWriter
from octofs.ops import FsyncOp, Record, SetattrOp, WriteOp

VAULT = bytes(range(16))


def test_encode_payload_is_encode_record_without_the_record():
    for op in (WriteOp(b"d/f", 4096, os.urandom(4096), 1_700_000_000_000_000_001), FsyncOp(b"", True),
               SetattrOp(b"f", mode=0o600, mtime_ns=5)):
        assert encode_payload(7, 123, op) == encode_record(Record(7, 123, op))


def test_a_short_journal_write_is_completed(tmp_path, monkeypatch):
    real = os.pwrite
    calls = []

    def short_once(fd, data, offset):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data)[:5], offset)  # a short write, no error
        return real(fd, data, offset)

    with JournalWriter.open(tmp_path / "j", vault_id=VAULT, epoch=1) as w:
        w.append(WriteOp(b"f", 0, b"a" * 100, 1))
        monkeypatch.setattr(os, "pwrite", short_once)
        assert w.append(WriteOp(b"f", 100, b"b" * 100, 2)) == 2
        monkeypatch.undo()
        assert w.append(WriteOp(b"f", 200, b"c" * 100, 3)) == 3
    assert len(calls) == 2 and calls[1] == calls[0] - 5
    ops = [r.op for r in JournalReader(tmp_path / "j").records(1)]
    assert [op.data[:1] for op in ops] == [b"a", b"b", b"c"]
