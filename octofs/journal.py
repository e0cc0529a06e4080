"""journal.py: owns the journal on disk: its segments, appending, fsync batching, recovery and reading.

The format is specified in docs/FORMAT.md; this module, segment.py (the layout of one segment file) and that
document change together. ``JOURNAL_FORMAT_VERSION`` is defined in segment.py and re-exported here.

Invariants:
- The seqs in a journal are 1, 2, 3, ... across segments in file-name order, with no gap and no duplicate.
  A segment is named by its first seq and holds only records of one vault id and one epoch.
- ``JournalWriter.append`` writes a whole record with ``pwrite`` on a raw fd (no user-space buffer, no fsync).
  If that fails, the segment is cut back to the last whole record and ``last_seq`` is unchanged; if the cut
  itself fails, the writer refuses every later append ("failed").
- ``durable_seq`` grows only after every segment holding seqs up to it, and the journal directory when a segment
  was created, were fsynced. A failed fsync also makes the writer "failed": after a failed fsync the kernel may
  have dropped the dirty pages, so a retry could succeed without the data being on disk.
- Segment fds are closed only by ``finish_sync``/``close`` on the event-loop thread, never while a ``SyncTicket``
  (being run by a worker thread) holds them.
- ``JournalWriter.open`` leaves no torn tail behind, and never cuts anything that is followed by a valid record:
  that is corruption (``JournalCorruptError``), reported, not repaired.
- One writer per journal directory; the mount daemon's state-dir lock guarantees it. Readers may run at the same
  time, in any thread or process; they never change a file.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from octofs.codec import encode_payload
from octofs.errors import JournalError, JournalFullError, JournalIOError
from octofs.ops import Op, Record
from octofs.paths import segment_path
from octofs.segment import (
    HEADER_SIZE,
    JOURNAL_FORMAT_VERSION,  # noqa: F401 - re-exported: the API names it here (docs/FORMAT.md §1)
    VAULT_ID_BYTES,
    ScanState,
    SegmentHeader,
    SegmentInfo,  # re-exported with list_segments: part of this module's API
    check_header,
    corrupt_error,
    find_valid_record,
    frame_record,
    header_bytes,
    iter_raw,
    iter_records,
    list_segments,
    parse_header,
    read_header,
    scan_frames,
    valid_at,
)

log = logging.getLogger(__name__)

_U64_MAX = 2**64 - 1
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


# -- value types ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What ``JournalWriter.open`` found and repaired.

    Attributes:
        last_seq: the last good seq after recovery (0 for an empty journal).
        truncated_bytes: bytes cut off a torn tail plus the sizes of the empty segments deleted.
        segment: the segment that was cut (or whose header was rewritten), or None if none was.
        offset: where ``segment`` was cut, or None.
        removed: empty segments that were deleted.
        reason: why the tail was cut (the damage found), or None if nothing was torn.
    """

    last_seq: int
    truncated_bytes: int = 0
    segment: Path | None = None
    offset: int | None = None
    removed: tuple[Path, ...] = ()
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    """A snapshot of the journal for ``status``.

    Attributes:
        first_seq: the oldest seq still kept on disk; ``last_seq + 1`` when no record is kept.
        last_seq: the highest appended seq.
        durable_seq: the highest seq known to be fsynced.
        segments: number of segment files.
        bytes: total size of the segment files.
    """

    first_seq: int
    last_seq: int
    durable_seq: int
    segments: int
    bytes: int


class SyncTicket:
    """The work of one fsync batch, handed from the event-loop thread to a worker thread.

    Created by ``JournalWriter.begin_sync``; run by ``JournalWriter.run_sync`` (any thread); completed by
    ``JournalWriter.finish_sync`` (event-loop thread).

    Attributes:
        seq: ``last_seq`` when the ticket was made; ``durable_seq`` becomes this on success.
        fds: the segment fds to fsync, oldest first. The writer keeps them open until ``finish_sync``.
        paths: the segment paths, parallel to ``fds`` (for error messages).
        dir_fd: the journal directory's fd if a segment was created since the last ticket, else None.
        done: set by ``run_sync`` when every fsync succeeded.
        error: set by ``run_sync`` to the ``JournalIOError`` it raised.
    """

    __slots__ = ("seq", "fds", "paths", "dir_fd", "dir_path", "done", "error")

    def __init__(self, seq: int, fds: tuple[int, ...], paths: tuple[Path, ...], dir_fd: int | None, dir_path: Path):
        self.seq = seq
        self.fds = fds
        self.paths = paths
        self.dir_fd = dir_fd
        self.dir_path = dir_path
        self.done = False
        self.error: JournalIOError | None = None

    def __repr__(self) -> str:
        return f"<SyncTicket seq={self.seq} fds={len(self.fds)} dir={self.dir_fd is not None} done={self.done}>"


# -- writer helpers ------------------------------------------------------------


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``, continuing after short writes."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            # A regular-file pwrite that writes nothing without an error: report it as EIO rather than spin.
            raise OSError(errno.EIO, "pwrite wrote nothing")
        done += n


def _append_error(exc: OSError, path: Path) -> JournalError:
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL_ERRNOS:
        return JournalFullError(path=path, reason=reason)
    return JournalIOError(path=path, reason=reason)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- dropping segments ------------------------------------------------------------------


def drop_segments_before(journal_dir: Path, seq: int) -> int:
    """Delete the whole segments whose records all have a seq below ``seq``.

    A segment's records all lie below ``seq`` exactly when the next segment starts at or below ``seq``; so the
    last (live) segment is never deleted. Segments are deleted oldest first, so the journal stays contiguous.
    The directory is not fsynced: a dropped segment that reappears after a power cut is dropped again.

    Args:
        journal_dir: the ``journal/`` directory.
        seq: typically the lowest acked seq of all targets, plus one.

    Returns:
        The number of segments deleted.

    Raises:
        JournalIOError: a segment could not be deleted.
    """
    segs = list_segments(journal_dir)
    dropped = 0
    for cur, nxt in zip(segs, segs[1:]):
        if nxt.first_seq > seq:
            break
        try:
            os.unlink(cur.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise JournalIOError(path=cur.path, reason=f"cannot delete segment: {exc.strerror}") from exc
        dropped += 1
        log.debug("dropped segment %s (all seqs below %d)", cur.path.name, nxt.first_seq)
    return dropped


# -- writer --------------------------------------------------------------------------


class JournalWriter:
    """Appends ops to a journal and makes them durable in batches.

    Thread-safety: every method except ``run_sync`` is called on one thread (the event-loop thread).
    ``run_sync`` runs in a worker thread while ``append`` continues; it touches only its ticket.
    At most one ticket is in flight at a time (the caller's fsync lock serializes them).

    Attributes:
        last_seq: the highest appended seq, 0 if none.
        durable_seq: the highest seq known to be fsynced. After ``open`` it equals ``last_seq``
            (recovery fsyncs every segment).
        recovery: what ``open`` found and repaired.
        failed: None, or the error that made this writer refuse further appends (a failed fsync, or a failed
            cut-back after a failed append). The vault then needs a resync.
    """

    def __init__(self, journal_dir: Path, dir_fd: int, vault_id: bytes, epoch: int, limits: tuple[int, int | None]):
        """Use ``JournalWriter.open``; ``limits`` is (max_segment_bytes, max_total_bytes)."""
        self._dir = journal_dir
        self._dir_fd = dir_fd
        self._vault_id = vault_id
        self._epoch = epoch
        self._max_segment_bytes, self._max_total_bytes = limits
        self.last_seq = 0
        self.durable_seq = 0
        self.recovery = RecoveryReport(last_seq=0)
        self.failed: JournalError | None = None
        self._closed = False
        # The live segment.
        self._fd: int | None = None
        self._seg_path: Path | None = None
        self._seg_first = 0
        self._seg_size = 0
        self._need_new_segment = False
        # fds written since the last begin_sync, oldest first (the live fd last).
        self._dirty: list[int] = []
        self._dirty_paths: list[Path] = []
        # Segment fds rotated out and not closed yet: (fd, path).
        self._retired: list[tuple[int, Path]] = []
        self._dir_dirty = False
        self._ticket: SyncTicket | None = None
        # Upper bound of the bytes on disk (drop_segments_before only lowers the real value).
        self._total_bytes = 0

    @classmethod
    def open(
        cls,
        journal_dir: Path,
        *,
        vault_id: bytes,
        epoch: int,
        max_segment_bytes: int = 64 * 2**20,
        max_total_bytes: int | None = None,
    ) -> JournalWriter:
        """Open (creating if needed) and recover a journal for appending.

        Recovery follows docs/FORMAT.md §6: a torn tail is cut at the last good record, empty segments after it
        are deleted, and everything left is fsynced. Numbering continues after the last good seq (the first seq
        ever is 1).

        Args:
            journal_dir: the ``journal/`` directory of the vault's state dir; created if missing.
            vault_id: the vault's 16-byte identity; every segment must carry it.
            epoch: the primary's current epoch, stored in the header of each new segment.
            max_segment_bytes: start a new segment before an append that would take the live one past this.
            max_total_bytes: refuse appends (``JournalFullError``) that would take the journal past this.

        Returns:
            The writer; ``recovery`` says what was repaired.

        Raises:
            JournalCorruptError: damage followed by valid records, a header that disagrees with its file name,
                or another vault's segment (the message names both vault ids).
            JournalVersionError: a segment written in an unsupported format version.
            JournalIOError: the directory or a segment cannot be read, written or fsynced.
        """
        if not isinstance(vault_id, bytes) or len(vault_id) != VAULT_ID_BYTES:
            raise ValueError(f"vault_id must be {VAULT_ID_BYTES} bytes, got {vault_id!r}")
        if not 0 <= epoch <= _U64_MAX:
            raise ValueError(f"epoch must be in 0..2**64-1, got {epoch}")
        if max_segment_bytes < HEADER_SIZE:
            raise ValueError(f"max_segment_bytes must be at least {HEADER_SIZE}")
        journal_dir = Path(journal_dir)
        try:
            journal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            dir_fd = os.open(journal_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise JournalIOError(path=journal_dir, reason=exc.strerror or str(exc)) from exc
        writer = cls(journal_dir, dir_fd, vault_id, epoch, (max_segment_bytes, max_total_bytes))
        try:
            writer._recover()
        except BaseException:
            writer._close_fds()
            raise
        return writer

    # -- recovery

    def _recover(self) -> None:
        try:
            live, report = self._recover_segments()
            segs = list_segments(self._dir)
            for seg in segs:
                _fsync_path(seg.path)
            os.fsync(self._dir_fd)
            if live is not None:
                self._fd = os.open(live.path, os.O_WRONLY | os.O_CLOEXEC)
                self._seg_size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise JournalIOError(path=self._dir, reason=f"recovery failed: {exc.strerror or exc}") from exc
        self._total_bytes = sum(s.size_bytes for s in segs)
        self.last_seq = self.durable_seq = report.last_seq
        self.recovery = report
        if live is not None:
            self._seg_path = live.path
            self._seg_first = live.first_seq
            header = read_header(live.path)
            # A segment holds records of one epoch: a writer in a new epoch starts a new segment.
            # (A live segment without records had its header rewritten with our epoch in _recover_segments.)
            self._need_new_segment = not isinstance(header, SegmentHeader) or header.epoch != self._epoch
        if report.reason is not None:
            log.warning(
                "journal %s: repaired torn tail, %d bytes cut (%s at offset %s of %s; removed %d empty segments); "
                "last seq is %d",
                self._dir,
                report.truncated_bytes,
                report.reason,
                report.offset,
                report.segment.name if report.segment else None,
                len(report.removed),
                report.last_seq,
            )
        log.info("opened journal %s: last seq %d, %d segments", self._dir, self.last_seq, len(segs))

    def _recover_segments(self) -> tuple[SegmentInfo | None, RecoveryReport]:
        """Apply docs/FORMAT.md §6; return the live segment (None if none) and the report."""
        segs = list_segments(self._dir)
        headers = [read_header(seg.path) for seg in segs]  # may raise JournalVersionError
        for seg, header in zip(segs, headers):
            if isinstance(header, SegmentHeader):
                check_header(header, seg.path, seg.first_seq, self._vault_id)
        # Walk back from the newest segment to T, the last one holding a valid record.
        t_index: int | None = None
        t_state: ScanState | None = None
        for i in range(len(segs) - 1, -1, -1):
            seg, header = segs[i], headers[i]
            if isinstance(header, str):
                found = find_valid_record(seg.path, 0, 0)
                if found is not None:
                    raise corrupt_error(seg.path, 0, f"{header}, but a valid record follows at offset {found}")
                continue
            state = scan_frames(seg.path, header)
            if state.count:
                t_index, t_state = i, state
                break
            if state.damage is not None:
                found = find_valid_record(seg.path, state.end, 0)
                if found is not None:
                    raise corrupt_error(seg.path, state.damage[0], f"{state.damage[1]}, but a valid record follows")
        if t_index is not None:
            for seg, header in zip(segs[:t_index], headers[:t_index]):
                if isinstance(header, str):
                    raise corrupt_error(seg.path, 0, f"{header}, but later segments hold valid records")
        empty = segs[t_index + 1 :] if t_index is not None else segs
        truncated = 0
        cut_seg: Path | None = None
        cut_offset: int | None = None
        reason: str | None = None
        removed: list[Path] = []

        if t_index is not None:
            assert t_state is not None
            tail = segs[t_index]
            last_seq = t_state.next_seq - 1
            if t_state.damage is not None:
                offset, reason = t_state.damage
                found = find_valid_record(tail.path, offset + 1, last_seq)
                if found is not None:
                    raise corrupt_error(tail.path, offset, f"{reason}, but a valid record follows at offset {found}")
                cut_seg, cut_offset = tail.path, t_state.end
                truncated += tail.size_bytes - t_state.end
                os.truncate(tail.path, t_state.end)
                tail = SegmentInfo(tail.path, tail.first_seq, t_state.end)
            elif empty and empty[0].first_seq != last_seq + 1:
                raise corrupt_error(
                    empty[0].path, 0, f"segment should start at seq {last_seq + 1} (the previous one ends there)"
                )
            elif empty:
                reason = f"empty segment {empty[0].path.name} after the last record"
            live: SegmentInfo | None = tail
            to_delete = empty
        elif segs:
            # No segment holds a record: keep the first one (its name carries the numbering) as a clean,
            # header-only live segment of our vault and epoch; delete the others.
            first, header = segs[0], headers[0]
            last_seq = first.first_seq - 1
            clean = isinstance(header, SegmentHeader) and first.size_bytes == HEADER_SIZE
            if not (clean and header.epoch == self._epoch):
                if not clean:
                    reason = header if isinstance(header, str) else "torn record after the segment header"
                    cut_seg, cut_offset = first.path, HEADER_SIZE if isinstance(header, SegmentHeader) else 0
                    truncated += max(first.size_bytes - HEADER_SIZE, 0)
                fd = os.open(first.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    _pwrite_all(fd, header_bytes(self._vault_id, self._epoch, first.first_seq), 0)
                    os.ftruncate(fd, HEADER_SIZE)
                finally:
                    os.close(fd)
            live = SegmentInfo(first.path, first.first_seq, HEADER_SIZE)
            to_delete = segs[1:]
        else:
            last_seq = 0
            live = None
            to_delete = []

        for seg in to_delete:
            os.unlink(seg.path)
            truncated += seg.size_bytes
            removed.append(seg.path)
        report = RecoveryReport(
            last_seq=last_seq,
            truncated_bytes=truncated,
            segment=cut_seg,
            offset=cut_offset,
            removed=tuple(removed),
            reason=reason if (truncated or removed or cut_seg) else None,
        )
        return live, report

    # -- appending

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"journal writer for {self._dir} is closed")
        if self.failed is not None:
            raise JournalIOError(path=self._dir, reason=f"the journal writer failed earlier: {self.failed.message}")

    def append(self, op: Op, time_ns: int | None = None) -> int:
        """Encode ``op`` as the next record and write it to the live segment.

        The record is written with ``pwrite`` on a raw fd: no Python buffering and no fsync (see ``begin_sync``).
        Starts a new segment first if this record would take the live one past ``max_segment_bytes``.

        Args:
            op: the op, already applied to the backing dir (docs/FORMAT.md §5: syscall first, then append).
            time_ns: wall-clock time to record; ``time.time_ns()`` if None.

        Returns:
            The record's seq (``last_seq`` + 1).

        Raises:
            OpError: the op is invalid (nothing is written).
            JournalFullError: ENOSPC/EDQUOT, or ``max_total_bytes`` would be exceeded. The segment is cut back to
                the last whole record and ``last_seq`` is unchanged; a later append may succeed.
            JournalIOError: any other OSError (same cut-back), or the writer has failed.
        """
        # Once per FUSE request: the checks are inlined where the common case needs no call.
        if self._closed or self.failed is not None:
            self._check_usable()
        seq = self.last_seq + 1
        data = frame_record(encode_payload(seq, time.time_ns() if time_ns is None else time_ns, op))
        size = len(data)
        rotate = (
            self._fd is None
            or self._need_new_segment
            or (self._seg_first <= self.last_seq and self._seg_size + size > self._max_segment_bytes)
        )
        if self._max_total_bytes is not None:
            self._check_room(size + (HEADER_SIZE if rotate else 0))
        if rotate:
            self._start_segment(seq)
        fd = self._fd
        assert fd is not None and self._seg_path is not None
        offset = self._seg_size
        try:
            written = os.pwrite(fd, data, offset)
            if written != size:  # a short write (rare on a regular file): write the rest
                _pwrite_all(fd, memoryview(data)[written:], offset + written)
        except OSError as exc:
            self._cut_back(fd, self._seg_path, offset)
            raise _append_error(exc, self._seg_path) from exc
        self._seg_size = offset + size
        self._total_bytes += size
        self.last_seq = seq
        if not self._dirty or self._dirty[-1] != fd:
            self._dirty.append(fd)
            self._dirty_paths.append(self._seg_path)
        return seq

    def room(self) -> int | None:
        """Bytes that may still be appended under ``max_total_bytes`` (None: no limit). An estimate from below."""
        if self._max_total_bytes is None:
            return None
        return self._max_total_bytes - self._total_bytes

    def recount(self) -> None:
        """Recount the journal's size from its segment files (after segments were dropped)."""
        self._total_bytes = sum(s.size_bytes for s in list_segments(self._dir))

    def _check_room(self, needed: int) -> None:
        limit = self._max_total_bytes
        if limit is None or self._total_bytes + needed <= limit:
            return
        # Our count is an upper bound; segments may have been dropped since. Count again before refusing.
        self._total_bytes = sum(s.size_bytes for s in list_segments(self._dir))
        if self._total_bytes + needed > limit:
            raise JournalFullError(
                path=self._dir,
                reason=f"it holds {self._total_bytes} bytes, and {needed} more would pass max_total_bytes={limit}",
            )

    def _start_segment(self, first_seq: int) -> None:
        """Create the segment for ``first_seq`` and make it the live one; the old live fd is retired, not closed."""
        path = segment_path(self._dir, first_seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _append_error(exc, path) from exc
        try:
            _pwrite_all(fd, header_bytes(self._vault_id, self._epoch, first_seq), 0)
        except OSError as exc:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError as unlink_exc:
                # Harmless for the format: recovery deletes or rewrites a segment with a torn header.
                log.debug("cannot delete half-created segment %s: %s", path, unlink_exc)
            raise _append_error(exc, path) from exc
        if self._fd is not None:
            # Closed later by finish_sync/close: a SyncTicket in a worker thread may be fsyncing it right now.
            assert self._seg_path is not None
            self._retired.append((self._fd, self._seg_path))
        self._fd, self._seg_path, self._seg_first, self._seg_size = fd, path, first_seq, HEADER_SIZE
        self._need_new_segment = False
        self._total_bytes += HEADER_SIZE
        self._dir_dirty = True
        self._dirty.append(fd)
        self._dirty_paths.append(path)
        log.debug("started segment %s", path.name)

    def _cut_back(self, fd: int, path: Path, size: int) -> None:
        """After a failed append: cut the segment back to its last whole record, or fail the writer."""
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            self.failed = JournalIOError(
                path=path, reason=f"cannot cut a partly written record off at offset {size}: {exc.strerror}"
            )
            log.error("journal writer failed: %s", self.failed.message)

    # -- durability

    def begin_sync(self) -> SyncTicket | None:
        """Start an fsync batch covering every record appended so far (event-loop thread).

        Returns:
            A ticket for ``run_sync``, or None if there is nothing to sync (``durable_seq == last_seq`` and no
            segment file changed since the last ticket).

        Raises:
            RuntimeError: a ticket is already in flight (not yet passed to ``finish_sync``).
            JournalIOError: the writer has failed.
        """
        self._check_usable()
        if self._ticket is not None:
            raise RuntimeError("a journal sync is already in flight")
        if not self._dirty and not self._dir_dirty and self.durable_seq == self.last_seq:
            return None
        ticket = SyncTicket(
            self.last_seq,
            tuple(self._dirty),
            tuple(self._dirty_paths),
            self._dir_fd if self._dir_dirty else None,
            self._dir,
        )
        self._dirty, self._dirty_paths, self._dir_dirty = [], [], False
        self._ticket = ticket
        return ticket

    @staticmethod
    def run_sync(ticket: SyncTicket) -> None:
        """Do the blocking fsyncs of ``ticket``; safe to run in a worker thread while ``append`` continues.

        Raises:
            JournalIOError: an fsync failed (also stored in ``ticket.error``; ``finish_sync`` then fails the writer).
        """
        path = ticket.dir_path
        try:
            for fd, path in zip(ticket.fds, ticket.paths):
                os.fsync(fd)
            if ticket.dir_fd is not None:
                path = ticket.dir_path
                os.fsync(ticket.dir_fd)
        except OSError as exc:
            ticket.error = JournalIOError(path=path, reason=f"fsync failed: {exc.strerror or exc}")
            raise ticket.error from exc
        ticket.done = True

    def finish_sync(self, ticket: SyncTicket) -> None:
        """Complete ``ticket`` (event-loop thread): advance ``durable_seq`` and close retired segment fds.

        Call it after ``run_sync`` returned or raised (e.g. in a ``finally``). If ``run_sync`` failed, this marks the
        writer failed and returns without raising (``run_sync``'s error is already propagating).

        Raises:
            RuntimeError: ``ticket`` is not the ticket in flight, or ``run_sync`` has not finished with it.
        """
        if ticket is not self._ticket:
            raise RuntimeError(f"{ticket!r} is not the journal sync in flight")
        if not ticket.done and ticket.error is None:
            raise RuntimeError(f"finish_sync({ticket!r}) before run_sync finished with it")
        self._ticket = None
        if ticket.error is not None:
            self.failed = ticket.error
            log.error("journal writer failed: %s", ticket.error.message)
            return
        if ticket.seq > self.durable_seq:
            self.durable_seq = ticket.seq
        # A retired fd not written since begin_sync was covered by this ticket (or an earlier one): close it.
        keep = []
        for fd, path in self._retired:
            if fd in self._dirty:
                keep.append((fd, path))
            else:
                os.close(fd)
        self._retired = keep

    def sync(self) -> None:
        """``begin_sync``, ``run_sync`` and ``finish_sync`` in the calling thread.

        Raises:
            JournalIOError: an fsync failed, or the writer had failed.
        """
        ticket = self.begin_sync()
        if ticket is None:
            return
        try:
            self.run_sync(ticket)
        finally:
            self.finish_sync(ticket)

    def close(self) -> None:
        """Sync (unless the writer has failed) and close every fd. Idempotent.

        Raises:
            RuntimeError: a sync ticket is still in flight (its thread may be using the fds).
            JournalIOError: the final sync failed (the fds are closed anyway).
        """
        if self._closed:
            return
        if self._ticket is not None:
            raise RuntimeError("close() while a journal sync is in flight")
        try:
            if self.failed is None:
                self.sync()
        finally:
            self._close_fds()
            self._closed = True

    def _close_fds(self) -> None:
        fds = [fd for fd, _ in self._retired]
        if self._fd is not None:
            fds.append(self._fd)
        fds.append(self._dir_fd)
        self._retired, self._fd, self._dirty, self._dirty_paths = [], None, [], []
        for fd in fds:
            try:
                os.close(fd)
            except OSError as exc:
                log.debug("closing journal fd %d: %s", fd, exc)

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> JournalStatistics:
        """A snapshot of the journal: oldest kept seq, last and durable seq, segment count and bytes on disk."""
        segs = list_segments(self._dir)
        return JournalStatistics(
            first_seq=segs[0].first_seq if segs else self.last_seq + 1,
            last_seq=self.last_seq,
            durable_seq=self.durable_seq,
            segments=len(segs),
            bytes=sum(s.size_bytes for s in segs),
        )


# -- reader --------------------------------------------------------------------------


class JournalReader:
    """Reads the records of a journal in seq order, while a writer may be appending.

    A reader never changes a file. Reuse one reader to tail a journal: it remembers where the last call ended
    (segment, inode, offset), so the next ``records(last + 1)`` does not re-read the segment from its start.

    Args:
        journal_dir: the ``journal/`` directory.
        vault_id: if given, every segment must carry this vault id; otherwise every segment must carry the
            same vault id as the first one read.
    """

    def __init__(self, journal_dir: Path, *, vault_id: bytes | None = None, keep_open: bool = False) -> None:
        self._dir = Path(journal_dir)
        self._vault_id = vault_id
        # (segment path, inode, offset of a record boundary, seq of the record there)
        self._resume: tuple[Path, int, int, int] | None = None
        # keep_open (a tailer such as the shipper): the newest segment read stays open with its
        # scan state, and the next call reads on from there without listing the directory or
        # opening the file again (measured ≈ 100 µs a call saved; docs/PERFORMANCE.md).
        self._keep_open = keep_open
        self._tail: tuple[Path, int, BinaryIO, ScanState] | None = None

    def close(self) -> None:
        """Close the segment kept open (``keep_open``); the reader stays usable."""
        if self._tail is not None:
            self._tail[2].close()
            self._tail = None

    def raw_records(self, start_seq: int = 1) -> Iterator[tuple[int, bytes]]:
        """Like ``records``, but yield ``(seq, payload)``: the record payload exactly as journaled, not decoded.

        For forwarding (the wire carries the journal's payloads, docs/FORMAT.md §7): no decode and
        re-encode per record. Frames, CRCs and seq continuity are checked as in ``records``; a
        payload whose body does not decode is not noticed here (the target refuses it).

        Raises:
            The same errors as ``records``.
        """
        return self._scan(start_seq, raw=True)

    def records(self, start_seq: int = 1) -> Iterator[Record]:
        """Yield every record with seq >= ``start_seq``, in order, across segments.

        Stops quietly at the end of the valid data: a damage point that no valid record follows is a torn tail,
        or, in the live segment, a record being appended right now ("end for now"; call again to continue).

        Args:
            start_seq: the first seq wanted (e.g. a target's acked seq + 1).

        Raises:
            JournalCorruptError: damage followed by a valid record, a seq gap or duplicate, an undecodable record,
                a header that disagrees with its file name, or a segment of another vault.
            JournalVersionError: a segment in an unsupported format version.
            JournalError: ``start_seq`` is older than the oldest segment kept (it was dropped), or a segment
                cannot be read.
        """
        return self._scan(start_seq, raw=False)

    def _scan(self, start_seq: int, *, raw: bool) -> Iterator:
        tail = self._tail
        if tail is not None:
            path, ino, f, state = tail
            if state.next_seq <= start_seq:
                # Read on in the segment kept open. A clean end of it with no newer segment is
                # the end for now; damage (maybe an append in progress), or a newer segment
                # (the writer moved on), goes to the full scan below, which resumes from here.
                state.damage = None
                f.seek(state.end)
                for item in iter_raw(f, path, state) if raw else iter_records(f, path, state):
                    self._resume = (path, ino, state.end, state.next_seq)
                    seq = item[0] if raw else item.seq
                    if seq >= start_seq:
                        start_seq = seq + 1
                        yield item
                if state.damage is None and not os.path.exists(segment_path(self._dir, state.next_seq)):
                    return
            self.close()
        segs = list_segments(self._dir)
        if not segs:
            return
        if start_seq < segs[0].first_seq:
            raise JournalError(
                path=self._dir,
                reason=f"seq {start_seq} is no longer kept (dropped); the oldest seq kept is {segs[0].first_seq}",
            )
        first_index = bisect.bisect_right([s.first_seq for s in segs], start_seq) - 1
        vault_id = self._vault_id
        next_seq: int | None = None
        for k in range(first_index, len(segs)):
            seg = segs[k]
            try:
                f = open(seg.path, "rb")
            except FileNotFoundError:
                raise JournalError(
                    path=seg.path, reason=f"segment vanished while reading (dropped?) at seq {start_seq}"
                ) from None
            except OSError as exc:
                raise JournalError(path=seg.path, reason=exc.strerror or str(exc)) from exc
            keep = self._keep_open and k == len(segs) - 1
            with contextlib.ExitStack() as closing:
                closing.callback(f.close)
                header = parse_header(f.read(HEADER_SIZE), seg.path)
                if isinstance(header, str):
                    self._end_or_corrupt(segs, k, 0, header, (next_seq or seg.first_seq) - 1)
                    return
                check_header(header, seg.path, seg.first_seq, vault_id)
                if vault_id is None:
                    vault_id = header.vault_id
                if next_seq is not None and header.first_seq != next_seq:
                    raise corrupt_error(seg.path, 0, f"segment starts at seq {header.first_seq}, expected {next_seq}")
                ino = os.fstat(f.fileno()).st_ino
                state = ScanState(HEADER_SIZE, header.first_seq)
                resume = self._resume
                if resume is not None and k == first_index and resume[0] == seg.path and resume[1] == ino:
                    if resume[3] <= start_seq:
                        state = ScanState(resume[2], resume[3])
                f.seek(state.end)
                if keep:  # the newest segment stays open for the next call (keep_open)
                    self.close()
                    self._tail = (seg.path, ino, f, state)
                    closing.pop_all()
                if raw:
                    for item in iter_raw(f, seg.path, state):
                        self._resume = (seg.path, ino, state.end, state.next_seq)
                        if item[0] >= start_seq:
                            yield item
                else:
                    for rec in iter_records(f, seg.path, state):
                        self._resume = (seg.path, ino, state.end, state.next_seq)
                        if rec.seq >= start_seq:
                            yield rec
                next_seq = state.next_seq
                if state.damage is not None:
                    self._end_or_corrupt(segs, k, state.damage[0], state.damage[1], next_seq - 1)
                    return

    def _end_or_corrupt(self, segs: list[SegmentInfo], k: int, offset: int, reason: str, last_seq: int) -> None:
        """Damage in segment k: corruption if any valid record follows it (FORMAT §6), else the end of the data."""
        path = segs[k].path
        found = find_valid_record(path, offset + 1, last_seq)
        if found is not None:
            detail = f"a valid record follows at offset {found}"
        else:
            for later in segs[k + 1 :]:
                if find_valid_record(later.path, 0, last_seq) is not None:
                    detail = f"segment {later.path.name} holds valid records"
                    break
            else:
                return
        # The damage may have been a record (or header) that a writer was appending while we read it: the scan
        # above read the file again, later, and saw what was appended after it. The writer appends in order, so
        # a record seen after the damage means the damaged bytes had been completely written before that second
        # read began; reading them once more now tells a concurrent append (valid now) from corruption.
        if valid_at(path, offset):
            log.debug("%s: damage at offset %d was an append in progress", path, offset)
            return
        raise corrupt_error(path, offset, f"{reason}, but {detail}")

