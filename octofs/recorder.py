"""recorder.py: owns the primary's journal writer inside the event loop (used by fs/ and the shipper).

Invariants:
- ``record(op)`` is synchronous: a handler calls it right after the backing-dir
  syscall succeeded, with no ``await`` in between, so seq order is the order the
  backing dir saw (DESIGN invariant 1, docs/CONCURRENCY.md).
- ``wait_durable(seq)`` returns only once the journal is fsynced up to ``seq``.
  fsyncs run in a worker thread, one at a time, and each covers everything
  appended before it started (group commit): many concurrent fsync requests cost
  one disk flush.
- Failing to journal is not a passthrough error: the first failure logs once, sets
  ``failsafe``, calls ``on_failure`` (which marks the vault for resync) and raises
  ``JournalError``; fs/operations.py answers the application EIO, and refuses every
  later change with EROFS until remount. No FUSE type appears here.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import trio

from octofs.errors import JournalError
from octofs.journal import JournalWriter
from octofs.ops import Op

log = logging.getLogger(__name__)

INDEX_INTERVAL_NS = 100_000_000


class Recorder:
    """Appends ops to the journal and makes them durable on request.

    Attributes:
        failsafe: True once an op could not be journaled; the vault is then
            read-only until remounted, and marked as needing a resync.
        failure: the message of the first journal failure, for status.
    """

    def __init__(self, writer: JournalWriter, on_failure: Callable[[str], None] | None = None) -> None:
        self.writer = writer
        self.failsafe = False
        self.failure: str | None = None
        self._on_failure = on_failure
        self._sync_lock = trio.Lock()
        self._appended = trio.Event()  # set and replaced on each append; wakes tailers
        # A coarse index of append times, one entry per INDEX_INTERVAL_NS at most:
        # enough to tell the age of the oldest op a target has not acked (status lag)
        # without reading the journal back.
        self._index_seqs: list[int] = []
        self._index_times: list[int] = []

    def record(self, op: Op) -> int:
        """Append ``op``; on failure go failsafe and raise the JournalError."""
        now = time.time_ns()
        try:
            seq = self.writer.append(op, now)
        except JournalError as exc:
            self.fail(str(exc))
            raise
        if not self._index_times or now - self._index_times[-1] >= INDEX_INTERVAL_NS:
            self._index_seqs.append(seq)
            self._index_times.append(now)
        self._appended.set()
        self._appended = trio.Event()
        return seq

    def age_of(self, seq: int) -> float:
        """Seconds since op ``seq`` was appended (an upper bound, within INDEX_INTERVAL_NS)."""
        i = bisect.bisect_right(self._index_seqs, seq) - 1
        if i < 0:
            return 0.0
        return max(0.0, (time.time_ns() - self._index_times[i]) / 1e9)

    def forget_before(self, seq: int) -> None:
        """Drop index entries no target needs any more (all acked beyond ``seq``)."""
        i = bisect.bisect_right(self._index_seqs, seq) - 1
        if i > 0:
            del self._index_seqs[:i]
            del self._index_times[:i]

    async def wait_appended(self) -> None:
        """Wait until the next op is appended (for journal tailers such as the shipper)."""
        await self._appended.wait()

    async def wait_durable(self, seq: int) -> None:
        """Return once the journal is fsynced up to at least ``seq``."""
        writer = self.writer
        while writer.durable_seq < seq:
            async with self._sync_lock:
                if writer.durable_seq >= seq:
                    return
                try:
                    ticket = writer.begin_sync()
                    if ticket is None:
                        return
                    try:
                        await trio.to_thread.run_sync(JournalWriter.run_sync, ticket)
                    finally:
                        # Always hand the ticket back: after a failed fsync the writer
                        # marks itself failed (a retried fsync after EIO can lie).
                        writer.finish_sync(ticket)
                except JournalError as exc:
                    self.fail(f"fsync of the journal failed: {exc}")
                    raise

    async def sync_all(self) -> None:
        """Make everything appended so far durable (periodic flush, clean shutdown)."""
        await self.wait_durable(self.writer.last_seq)

    def fail(self, message: str) -> None:
        """Go failsafe: the backing dir and the journal no longer agree (see module docstring)."""
        if self.failsafe:
            return
        self.failsafe = True
        self.failure = message
        log.error("cannot journal a change, the vault is now read-only and needs a resync: %s", message)
        if self._on_failure is not None:
            self._on_failure(message)
