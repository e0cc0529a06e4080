"""recorder.py: owns the primary's journal writer inside the event loop (used by fs/ and the shipper).

Invariants:
- ``record(op)`` is synchronous: a handler calls it right after the backing-dir
  syscall succeeded, with no ``await`` in between, so seq order is the order the
  backing dir saw (DESIGN invariant 1, docs/CONCURRENCY.md).
- ``wait_durable(seq)`` returns only once the journal is fsynced up to ``seq``.
  fsyncs run in a worker thread, one at a time, and each covers everything
  appended before it started (group commit): many concurrent fsync requests cost
  one disk flush. A flush that a barrier (an application's fsync) waits for starts
  at once; any other waiter (the shipper, the periodic flush) first gives others
  ``commit_delay_s`` to start one it can share (docs/CONCURRENCY.md §4).
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
from octofs.intent import IntentRing
from octofs.journal import JournalWriter
from octofs.ops import FsyncOp, Op
from octofs.threads import run_in_worker

log = logging.getLogger(__name__)

INDEX_INTERVAL_NS = 100_000_000
# How long a wait_durable that no barrier needs waits for a flush it can share
# before starting one (docs/CONCURRENCY.md §4).
COMMIT_DELAY_S = 0.005


class Recorder:
    """Appends ops to the journal and makes them durable on request.

    Attributes:
        failsafe: True once an op could not be journaled; the vault is then
            read-only until remounted, and marked as needing a resync.
        failure: the message of the first journal failure, for status.
    """

    def __init__(self, writer: JournalWriter, on_failure: Callable[[str], None] | None = None, *,
                 when_full: str = "block", headroom_bytes: int = 32 * 2**20,
                 commit_delay_s: float = COMMIT_DELAY_S) -> None:
        self.writer = writer
        self.commit_delay_s = commit_delay_s
        self._barrier_seq = 0  # the last FsyncOp appended: a flush up to it is urgent
        self._durable_changed = trio.Event()  # set and replaced after each flush
        self.when_full = when_full
        # With when_full=block, changes wait before their syscall once less than this
        # is left, so that the ops of the changes already admitted still fit.
        self.headroom_bytes = headroom_bytes
        self.blocked = 0  # changes waiting for room in the journal right now
        self._room_changed = trio.Event()
        self._blocking = trio.Event()  # set when a change starts waiting: wakes the janitor
        self.failsafe = False
        self.failure: str | None = None
        self._on_failure = on_failure
        self._sync_lock = trio.Lock()
        # Wakes tailers (wait_appended) on the next append. Made only when a tailer waits
        # and dropped by the append that sets it: an append that nobody waits for costs no
        # new Event (≈ 0.5 µs, and garbage, per FUSE write; docs/PERFORMANCE.md).
        self._appended: trio.Event | None = None
        # A coarse index of append times, one entry per INDEX_INTERVAL_NS at most:
        # enough to tell the age of the oldest op a target has not acked (status lag)
        # without reading the journal back.
        self._index_seqs: list[int] = []
        self._index_times: list[int] = []
        self._index_next_ns = 0  # the next append at or after this time gets an index entry
        # Called with (seq, op) after each append, synchronously (Synchronize tracks
        # what changes while it compares; it must not await).
        self.listeners: list[Callable[[int, Op], None]] = []
        self._paused = 0
        self._resumed = trio.Event()
        # Failover: why this vault is fenced (another machine took over at a higher epoch),
        # or None. Like failsafe, changes are refused (EROFS) while it is set (fencing.py).
        self.fenced: str | None = None
        # Where handlers note the paths they are about to change (intent.py), if anywhere.
        self.intent: IntentRing | None = None

    def record(self, op: Op) -> int:
        """Append ``op``; on failure go failsafe and raise the JournalError."""
        now = time.time_ns()
        try:
            seq = self.writer.append(op, now)
        except JournalError as exc:
            self.fail(str(exc))
            raise
        if now >= self._index_next_ns:
            self._index_seqs.append(seq)
            self._index_times.append(now)
            self._index_next_ns = now + INDEX_INTERVAL_NS
        if type(op) is FsyncOp:
            self._barrier_seq = seq
        if self.listeners:
            for listener in self.listeners:
                listener(seq, op)
        appended = self._appended
        if appended is not None:
            self._appended = None
            appended.set()
        return seq

    def intend(self, *paths: bytes | None) -> None:
        """Before a change's syscall (no await until its ``record``): note what it touches (intent.py)."""
        if self.intent is not None:
            self.intent.note(self.writer.last_seq + 1, *paths)

    def pause(self) -> None:
        """Hold new changes before their syscall (``wait_for_room``) until ``resume``.

        Synchronize reads the backing dir for a repair while no change can slip in
        between the read and the point in the stream where the repair goes.
        """
        self._paused += 1

    def resume(self) -> None:
        self._paused -= 1
        if self._paused == 0:
            self._resumed.set()
            self._resumed = trio.Event()

    def full(self) -> bool:
        room = self.writer.room()
        return room is not None and room < self.headroom_bytes

    async def wait_for_room(self) -> None:
        """With when_full=block: wait (before the syscall) until the journal has room again.

        Nothing is lost and nothing fails: the application's change simply waits until
        the targets have acked enough for whole segments to be dropped (DESIGN
        invariant 4). With when_full=resync the change goes ahead and, if the journal
        overflows, the vault goes failsafe and is marked for resync.
        """
        while self._paused:
            await self._resumed.wait()
        if self.when_full != "block" or not self.full():
            return
        self.blocked += 1
        self._blocking.set()
        if self.blocked == 1:
            log.warning("journal is full (%d bytes): changes wait until the targets catch up",
                        self.writer.statistics().bytes)
        try:
            while self.full():
                await self._room_changed.wait()
        finally:
            self.blocked -= 1
        if self.blocked == 0:
            log.info("journal has room again: changes resume")

    async def wait_blocking(self) -> None:
        """Wait until some change is waiting for room (for the janitor)."""
        await self._blocking.wait()
        self._blocking = trio.Event()

    def segments_dropped(self) -> None:
        """Called after journal segments were deleted: recount and wake waiting changes."""
        self.writer.recount()
        self._room_changed.set()
        self._room_changed = trio.Event()

    def age_of(self, seq: int) -> float:
        """Seconds since op ``seq`` was appended (an upper bound, within INDEX_INTERVAL_NS)."""
        i = bisect.bisect_right(self._index_seqs, seq) - 1
        if i < 0:
            return 0.0
        return max(0.0, (time.time_ns() - self._index_times[i]) / 1e9)

    def note_append_time(self, seq: int, time_ns: int) -> None:
        """Add a known (seq, append time) to the index, e.g. read back from the journal at startup."""
        i = bisect.bisect_left(self._index_seqs, seq)
        if i < len(self._index_seqs) and self._index_seqs[i] == seq:
            return
        self._index_seqs.insert(i, seq)
        self._index_times.insert(i, time_ns)
        self._index_next_ns = self._index_times[-1] + INDEX_INTERVAL_NS

    def forget_before(self, seq: int) -> None:
        """Drop index entries no target needs any more (all acked beyond ``seq``)."""
        i = bisect.bisect_right(self._index_seqs, seq) - 1
        if i > 0:
            del self._index_seqs[:i]
            del self._index_times[:i]

    async def wait_appended(self) -> None:
        """Wait until the next op is appended (for journal tailers such as the shipper)."""
        appended = self._appended
        if appended is None:
            appended = self._appended = trio.Event()
        await appended.wait()

    async def wait_durable(self, seq: int, *, urgent: bool = False) -> None:
        """Return once the journal is fsynced up to at least ``seq``.

        Group commit with a commit delay: the flush starts at once if ``urgent`` or if a
        barrier (FsyncOp) appended since the last flush is waiting for it — an
        application's fsync never waits for the delay. Otherwise (the shipper tailing the
        journal, the periodic flush) this first waits up to ``commit_delay_s`` for a flush
        started by someone else, and only then starts one: a stream of writes without
        fsyncs costs one journal fsync per delay instead of one per shipper round, which
        kept the disk flushing and stalled every metadata syscall behind ext4's commits.
        """
        writer = self.writer
        if (writer.durable_seq < seq and not urgent and self.commit_delay_s > 0
                and self._barrier_seq <= writer.durable_seq):
            with trio.move_on_after(self.commit_delay_s):
                while writer.durable_seq < seq:
                    await self._durable_changed.wait()
        while writer.durable_seq < seq:
            async with self._sync_lock:
                if writer.durable_seq >= seq:
                    return
                try:
                    ticket = writer.begin_sync()
                    if ticket is None:
                        return
                    # Shielded: once a ticket is taken, its fsync must run to the end and
                    # the ticket be handed back, even if the task that asked is cancelled
                    # (a shipper whose link dropped); otherwise the writer would keep a
                    # sync "in flight" forever and refuse every later one.
                    with trio.CancelScope(shield=True):
                        try:
                            await run_in_worker(JournalWriter.run_sync, ticket)
                        finally:
                            # Always hand the ticket back: after a failed fsync the writer
                            # marks itself failed (a retried fsync after EIO can lie).
                            writer.finish_sync(ticket)
                            self._durable_changed.set()
                            self._durable_changed = trio.Event()
                except JournalError as exc:
                    self.fail(f"fsync of the journal failed: {exc}")
                    raise

    async def sync_with(self, seq: int, sync_file: Callable[[], None], *, inline: bool = False) -> None:
        """An application's fsync: run the blocking ``sync_file`` (the backing file's fsync), then
        make the journal durable up to ``seq``, one after the other in one worker thread.

        One after the other, not side by side: the backing file's fsync commits the
        filesystem's journal, which already writes the octofs journal's appended blocks, so
        the journal fsync right after it costs little; two fsyncs started together contend
        for the same commit, and each needs its own thread hop (measured on ext4, 4 KiB
        random write + fsync: 256 µs one after the other against 372 µs side by side;
        docs/PERFORMANCE.md). If the journal is already durable up to ``seq`` (another
        fsync's group commit covered it), only ``sync_file`` runs, outside the lock.
        ``sync_file``'s exception propagates, after the journal fsync ran all the same.

        ``inline``: run them in the event loop's own thread, blocking it, instead of a worker:
        for an fsync that nothing else waits beside (the caller knows), the thread hop costs
        more than the loop's idle time it buys (docs/CONCURRENCY.md §3).
        """
        writer = self.writer
        ticket = None
        async with self._sync_lock:
            if writer.durable_seq < seq:
                try:
                    ticket = writer.begin_sync()
                except JournalError as exc:
                    self.fail(f"fsync of the journal failed: {exc}")
                    raise
            if ticket is not None:
                with trio.CancelScope(shield=True):  # as in wait_durable: a taken ticket runs to its end
                    try:
                        if inline:
                            _file_then_journal(sync_file, ticket)
                        else:
                            await run_in_worker(_file_then_journal, sync_file, ticket)
                    except JournalError as exc:
                        self.fail(f"fsync of the journal failed: {exc}")
                        raise
                    finally:
                        writer.finish_sync(ticket)
                        self._durable_changed.set()
                        self._durable_changed = trio.Event()
                return
        if inline:
            sync_file()
        else:
            await run_in_worker(sync_file)
        if writer.durable_seq < seq:  # a failed writer, or a seq not appended: as wait_durable would
            await self.wait_durable(seq, urgent=True)

    async def sync_all(self) -> None:
        """Make everything appended so far durable now (periodic flush, clean shutdown)."""
        await self.wait_durable(self.writer.last_seq, urgent=True)

    def fail(self, message: str) -> None:
        """Go failsafe: the backing dir and the journal no longer agree (see module docstring)."""
        if self.failsafe:
            return
        self.failsafe = True
        self.failure = message
        log.error("cannot journal a change, the vault is now read-only and needs a resync: %s", message)
        if self._on_failure is not None:
            self._on_failure(message)


def _file_then_journal(sync_file: Callable[[], None], ticket) -> None:
    """In a worker thread: ``sync_file()``, then the journal fsyncs of ``ticket`` even if it raised."""
    try:
        sync_file()
    finally:
        JournalWriter.run_sync(ticket)
