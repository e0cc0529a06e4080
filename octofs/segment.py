"""segment.py: owns the byte layout of a journal segment file (header, record frames, scanning them) and their listing.

This is docs/FORMAT.md §3 in code; journal.py builds the journal (many segments, writer, reader, recovery
policy) on top of it. Split out of journal.py to keep both under STYLE §3's size limit.

Invariants:
- ``JOURNAL_FORMAT_VERSION`` is defined here, once (journal.py re-exports it); a header is written with it and
  read only if its version is in ``READABLE_VERSIONS`` (else ``JournalVersionError``, checked before the CRC).
- All integers in headers and frames are little-endian; a record's CRC is ``zlib.crc32`` of its payload.
- The scanners never change a file, never return a record whose frame, CRC or seq is wrong, and report the
  first damage point instead of guessing past it; deciding whether damage is a torn tail or corruption is the
  caller's (docs/FORMAT.md §6).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from octofs.codec import MAX_PAYLOAD_BYTES, decode_record
from octofs.errors import JournalCorruptError, JournalVersionError, OpError
from octofs.ops import Record
from octofs.paths import SEGMENT_SUFFIX, segment_first_seq

JOURNAL_FORMAT_VERSION = 1
# Versions this code reads (docs/FORMAT.md §1: N and N-1; there is no version 0).
READABLE_VERSIONS = frozenset({1})

SEGMENT_MAGIC = b"OCTOJRNL"
RECORD_MAGIC = b"OJRC"
VAULT_ID_BYTES = 16

# Header: magic, version, 7 reserved bytes, vault id, epoch, first_seq; then crc32 of those 48 bytes.
_HEADER_BODY = struct.Struct("<8sB7s16sQQ")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER_BODY.size + _HEADER_CRC.size  # 52
# Record frame: magic, payload length, crc32 of the payload.
_RECORD_FRAME = struct.Struct("<4sII")
RECORD_FRAME_SIZE = _RECORD_FRAME.size  # 12


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """A segment file as listed in the journal directory (its header is not read)."""

    path: Path
    first_seq: int  # from the file name
    size_bytes: int


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The decoded, CRC-checked header of a segment (docs/FORMAT.md §3.1)."""

    version: int
    vault_id: bytes
    epoch: int
    first_seq: int


def header_bytes(vault_id: bytes, epoch: int, first_seq: int, version: int = JOURNAL_FORMAT_VERSION) -> bytes:
    """The 52 header bytes of a segment (docs/FORMAT.md §3.1)."""
    body = _HEADER_BODY.pack(SEGMENT_MAGIC, version, bytes(7), vault_id, epoch, first_seq)
    return body + _HEADER_CRC.pack(zlib.crc32(body))


def frame_record(payload: bytes) -> bytes:
    """The on-disk bytes of a record: the 12-byte frame followed by ``payload``."""
    return _RECORD_FRAME.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def parse_header(raw: bytes, path: Path) -> SegmentHeader | str:
    """Decode a segment header.

    Args:
        raw: the first ``HEADER_SIZE`` bytes of the segment (fewer if the file is shorter).
        path: the segment, for error messages.

    Returns:
        The header, or a short phrase saying why it is damaged (short, bad magic, bad CRC, reserved bytes).

    Raises:
        JournalVersionError: the magic is right but the version is not one this code reads.
    """
    if len(raw) >= 9 and raw[:8] == SEGMENT_MAGIC and raw[8] not in READABLE_VERSIONS:
        raise JournalVersionError(
            path=path, version=raw[8], supported=", ".join(str(v) for v in sorted(READABLE_VERSIONS))
        )
    if len(raw) < HEADER_SIZE:
        return f"segment header is short ({len(raw)} of {HEADER_SIZE} bytes)"
    magic, version, reserved, vault_id, epoch, first_seq = _HEADER_BODY.unpack_from(raw)
    if magic != SEGMENT_MAGIC:
        return f"bad segment magic {magic!r}"
    (crc,) = _HEADER_CRC.unpack_from(raw, _HEADER_BODY.size)
    if zlib.crc32(raw[: _HEADER_BODY.size]) != crc:
        return "segment header CRC mismatch"
    if reserved != bytes(7):
        return "reserved header bytes are not zero"
    return SegmentHeader(version, vault_id, epoch, first_seq)


def corrupt_error(path: Path, offset: int, reason: str) -> JournalCorruptError:
    """The JournalCorruptError for ``path`` at ``offset``, with the dump-journal hint for its directory."""
    return JournalCorruptError(path=path, offset=offset, reason=reason, journal_dir=path.parent)


def check_header(header: SegmentHeader, path: Path, name_first_seq: int, vault_id: bytes | None) -> None:
    """Raise JournalCorruptError if a valid header disagrees with its file name or (if given) the vault id."""
    if header.first_seq != name_first_seq:
        raise corrupt_error(path, 0, f"header says first seq {header.first_seq}, the file name says {name_first_seq}")
    if vault_id is not None and header.vault_id != vault_id:
        raise corrupt_error(
            path, 0, f"segment belongs to vault id {header.vault_id.hex()}, expected vault id {vault_id.hex()}"
        )


class ScanState:
    """Where a record scan stopped: end of the last good record, next seq, count, and the damage if any."""

    __slots__ = ("end", "next_seq", "count", "damage")

    def __init__(self, offset: int, next_seq: int) -> None:
        self.end = offset
        self.next_seq = next_seq
        self.count = 0
        self.damage: tuple[int, str] | None = None


def read_frame(read: Callable[[int], bytes]) -> tuple[bytes | None, str | None]:
    """Read one record frame and payload with ``read``: ``(payload, None)`` if whole and CRC-valid,
    ``(None, reason)`` at damage, ``(None, None)`` at a clean end of file."""
    frame = read(RECORD_FRAME_SIZE)
    if len(frame) < RECORD_FRAME_SIZE:
        return None, (f"{len(frame)} bytes at the end, too short for a record frame" if frame else None)
    magic, length, crc = _RECORD_FRAME.unpack(frame)
    if magic != RECORD_MAGIC:
        return None, f"bad record magic {magic!r}"
    if not 0 < length <= MAX_PAYLOAD_BYTES:
        return None, f"bad record length {length}"
    payload = read(length)
    if len(payload) < length:
        return None, f"record of {length} bytes runs past the end of the segment"
    if zlib.crc32(payload) != crc:
        return None, "record CRC mismatch"
    return payload, None


def iter_records(f: BinaryIO, path: Path, state: ScanState) -> Iterator[Record]:
    """Yield the valid records of ``f`` from ``state.end`` (f is positioned there), updating ``state``.

    Stops at end of file or at the first damage point (recorded in ``state.damage``; the caller decides whether
    it is a torn tail or corruption). Raises JournalCorruptError for a CRC-valid record that does not decode or
    breaks seq continuity: its CRC proves it was written like that.
    """
    read = f.read
    offset = state.end
    next_seq = state.next_seq
    while True:
        payload, damage = read_frame(read)
        if payload is None:
            if damage is not None:
                state.damage = (offset, damage)
            return
        length = len(payload)
        try:
            rec = decode_record(payload)
        except OpError as exc:
            raise corrupt_error(path, offset, f"record does not decode: {exc.fields.get('reason', exc)}") from exc
        if rec.seq != next_seq:
            raise corrupt_error(path, offset, f"record has seq {rec.seq}, expected {next_seq}")
        offset += RECORD_FRAME_SIZE + length
        next_seq += 1
        state.end = offset
        state.next_seq = next_seq
        state.count += 1
        yield rec


_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


def payload_seq(payload: bytes) -> int | None:
    """The seq of a record payload read from its first bytes, without decoding the rest; None if unsure.

    ``codec.encode_record`` writes the seq first: a msgpack fixmap, the key ``"s"``, then the
    seq as an unsigned msgpack int (docs/FORMAT.md §4). Anything else (or a short payload)
    gives None and the caller decodes the payload instead.
    """
    if len(payload) < 4 or payload[0] & 0xF0 != 0x80 or payload[1:3] != b"\xa1s":
        return None
    tag = payload[3]
    if tag < 0x80:
        return tag
    for code, fmt in ((0xCC, _U8), (0xCD, _U16), (0xCE, _U32), (0xCF, _U64)):
        if tag == code:
            return fmt.unpack_from(payload, 4)[0] if len(payload) >= 4 + fmt.size else None
    return None


def iter_raw(f: BinaryIO, path: Path, state: ScanState) -> Iterator[tuple[int, bytes]]:
    """Like ``iter_records``, but yield ``(seq, payload)`` without decoding the payload.

    Frames and CRCs are checked as in ``iter_records``, and so is seq continuity: the seq is read
    from the payload's first bytes (``payload_seq``); only a payload laid out differently is decoded.
    """
    read = f.read
    offset = state.end
    next_seq = state.next_seq
    while True:
        payload, damage = read_frame(read)
        if payload is None:
            if damage is not None:
                state.damage = (offset, damage)
            return
        seq = payload_seq(payload)
        if seq is None:
            try:
                seq = decode_record(payload).seq
            except OpError as exc:
                raise corrupt_error(path, offset, f"record does not decode: {exc.fields.get('reason', exc)}") from exc
        if seq != next_seq:
            raise corrupt_error(path, offset, f"record has seq {seq}, expected {next_seq}")
        offset += RECORD_FRAME_SIZE + len(payload)
        next_seq += 1
        state.end = offset
        state.next_seq = next_seq
        state.count += 1
        yield seq, payload


def find_valid_record(path: Path, start: int, min_seq: int) -> int | None:
    """Offset of the first valid record at or after ``start`` whose seq is above ``min_seq``, or None.

    This is the forward scan of docs/FORMAT.md §3.2 (magic, length, CRC, decodable payload). It reads the rest of
    the file into memory; it runs only after damage was found.
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return None
    pos = data.find(RECORD_MAGIC)
    while pos >= 0:
        if pos + RECORD_FRAME_SIZE <= len(data):
            _, length, crc = _RECORD_FRAME.unpack_from(data, pos)
            end = pos + RECORD_FRAME_SIZE + length
            if 0 < length <= MAX_PAYLOAD_BYTES and end <= len(data):
                payload = data[pos + RECORD_FRAME_SIZE : end]
                if zlib.crc32(payload) == crc:
                    try:
                        rec = decode_record(payload)
                    except OpError:
                        rec = None
                    if rec is not None and rec.seq > min_seq:
                        return start + pos
        pos = data.find(RECORD_MAGIC, pos + 1)
    return None


def read_header(path: Path) -> SegmentHeader | str:
    with open(path, "rb") as f:
        return parse_header(f.read(HEADER_SIZE), path)


def scan_frames(path: Path, header: SegmentHeader) -> ScanState:
    """Recovery's scan of a segment: where the valid records end, and the damage, if any.

    Every record's frame and CRC are checked, but only the first and the last valid record are decoded; seq
    continuity is checked by count (the last seq must be first_seq + count - 1). Decoding every record costs
    about 10 us each (13 s for a 64 MiB segment of small ops), too slow for every mount; a record in between
    that does not decode is found by the reader, which decodes everything (docs/FORMAT.md §6).
    """
    state = ScanState(HEADER_SIZE, header.first_seq)
    offset = HEADER_SIZE
    first: tuple[int, bytes] | None = None
    last: tuple[int, bytes] | None = None
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        read = f.read
        while True:
            payload, damage = read_frame(read)
            if payload is None:
                if damage is not None:
                    state.damage = (offset, damage)
                break
            last = (offset, payload)
            if first is None:
                first = last
            offset += RECORD_FRAME_SIZE + len(payload)
            state.count += 1
    state.end = offset
    state.next_seq = header.first_seq + state.count
    for found, want in ((first, header.first_seq), (last, state.next_seq - 1)):
        if found is None:
            continue
        rec_offset, payload = found
        try:
            rec = decode_record(payload)
        except OpError as exc:
            raise corrupt_error(path, rec_offset, f"record does not decode: {exc.fields.get('reason', exc)}") from exc
        if rec.seq != want:
            raise corrupt_error(path, rec_offset, f"record has seq {rec.seq}, expected {want}")
    return state


def valid_at(path: Path, offset: int) -> bool:
    """Whether ``path`` now holds a valid header (offset 0) or a valid record frame and payload at ``offset``."""
    with open(path, "rb") as f:
        if offset == 0:
            return isinstance(parse_header(f.read(HEADER_SIZE), path), SegmentHeader)
        f.seek(offset)
        frame = f.read(RECORD_FRAME_SIZE)
        if len(frame) < RECORD_FRAME_SIZE:
            return False
        magic, length, crc = _RECORD_FRAME.unpack(frame)
        if magic != RECORD_MAGIC or not 0 < length <= MAX_PAYLOAD_BYTES:
            return False
        payload = f.read(length)
        return len(payload) == length and zlib.crc32(payload) == crc


def list_segments(journal_dir: Path) -> list[SegmentInfo]:
    """List the segment files of a journal, sorted by first seq.

    Files whose names are not ``<16 hex digits>.seg`` are ignored. A missing directory is an empty journal.

    Args:
        journal_dir: the ``journal/`` directory of a state dir.

    Returns:
        One ``SegmentInfo`` per segment, oldest first.
    """
    try:
        names = os.listdir(journal_dir)
    except FileNotFoundError:
        return []
    segs = []
    for name in names:
        if not name.endswith(SEGMENT_SUFFIX):
            continue
        path = journal_dir / name
        first_seq = segment_first_seq(path)
        if first_seq is None:
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:  # dropped while we listed
            continue
        segs.append(SegmentInfo(path, first_seq, st.st_size))
    segs.sort(key=lambda s: s.first_seq)
    return segs
