"""intent.py: owns the primary's intent ring: which paths the last changes were about to touch.

A change reaches the backing dir (syscall) just before its op is appended to the
journal (docs/CONCURRENCY.md §2). A mount daemon killed between the two leaves a
change on disk that no journal record describes, so no target will ever get it;
a torn journal tail cut at recovery does the same for a few more. To repair those
paths without scanning the whole vault, each mutating handler first writes the
vault paths it is about to change, with the seq its first op will get, into this
ring: a small file mapped ``MAP_SHARED``, so what was written survives the death
of the process (it is in the page cache) at the cost of a memory copy, no syscall.

After an unclean stop, ``IntentRing.open`` reports the paths of every entry whose
seq is near or beyond the journal's recovered last seq: those are re-compared with
each target by a path-scoped Synchronize (syncer.py).

What it does not cover: a machine that went down (power cut, kernel crash). Then
the page cache is gone — the ring's, and possibly the backing dir's unsynced data
— so the boot id in the header differs and the caller synchronizes the whole vault.

Layout (little-endian): a 64-byte header — magic ``OCTOINTN``, u32 version (1),
u32 slot count, u8 state (0 clean, 1 running), 7 reserved bytes, 16-byte boot id,
u64 next slot counter — then ``SLOTS`` slots of ``SLOT_BYTES``: u64 seq, u16 length
of path 1, u16 length of path 2, u32 reserved, the paths (a path too long for the
slot is stored with length 0xFFFF, meaning "unknown: compare everything").
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"OCTOINTN"
VERSION = 1
SLOTS = 512
SLOT_BYTES = 8192
_HEADER = struct.Struct("<8sIIB7x16sQ")
HEADER_BYTES = 64
_SLOT_HEAD = struct.Struct("<QHHI")
_COUNTER = struct.Struct("<Q")  # the header's next slot counter, its last field
_COUNTER_AT = _HEADER.size - _COUNTER.size
TOO_LONG = 0xFFFF
_MAX_PATHS_BYTES = SLOT_BYTES - _SLOT_HEAD.size
# Entries this close below the recovered last seq are re-compared too: a handler may
# append several records (a setattr, a copy across an exclude boundary), and only
# the first seq is in the ring.
SEQ_MARGIN = 64

CLEAN, RUNNING = 0, 1


class IntentRing:
    """The intent ring of one vault (``STATE/intent``). Use ``open``; ``close(clean=True)`` at a clean stop."""

    def __init__(self, fd: int, mm: mmap.mmap) -> None:
        self._fd = fd
        self._mm = mm
        self._counter = _HEADER.unpack_from(mm, 0)[5]

    @classmethod
    def open(cls, path: Path, *, last_seq: int, boot_id: bytes) -> tuple[IntentRing, list[bytes] | None]:
        """Open (creating) the ring and say what the last run left unjournaled.

        Returns:
            ``(ring, paths)``: ``paths`` is ``[]`` after a clean stop (or the first run), the
            vault paths to re-compare after a process crash, or None when the whole vault
            must be compared (the machine went down, the ring is damaged, or a path was too long).
        """
        size = HEADER_BYTES + SLOTS * SLOT_BYTES
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            existing = os.fstat(fd).st_size
            if existing != size:
                os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        paths: list[bytes] | None = []
        if existing == size:
            paths = _left_over(mm, last_seq, boot_id)
        elif existing:
            paths = None  # a ring of another layout: cannot tell
        _HEADER.pack_into(mm, 0, MAGIC, VERSION, SLOTS, RUNNING, boot_id, 0)
        return cls(fd, mm), paths

    def note(self, seq: int, *paths: bytes | None) -> None:
        """Before a change's syscall: it is about to touch ``paths``; its first op will be ``seq``."""
        counter = self._counter
        slot = HEADER_BYTES + (counter % SLOTS) * SLOT_BYTES
        self._counter = counter = counter + 1
        if len(paths) == 1 and paths[0] is not None:
            # The common case (a write, a setattr...): one path, slot head and path in one pack.
            path = paths[0]
            n = len(path)
            if n <= _MAX_PATHS_BYTES:
                _one_path_slot(n).pack_into(self._mm, slot, seq, n, 0, 0, path)
            else:
                _SLOT_HEAD.pack_into(self._mm, slot, seq, TOO_LONG, 0, 0)
            _COUNTER.pack_into(self._mm, _COUNTER_AT, counter)
            return
        real = [p for p in paths if p is not None]
        lengths = [len(p) for p in real[:2]] + [0] * (2 - len(real[:2]))
        if sum(lengths) > _MAX_PATHS_BYTES:
            _SLOT_HEAD.pack_into(self._mm, slot, seq, TOO_LONG, 0, 0)
        else:
            _SLOT_HEAD.pack_into(self._mm, slot, seq, lengths[0], lengths[1], 0)
            at = slot + _SLOT_HEAD.size
            for p in real[:2]:
                self._mm[at:at + len(p)] = p
                at += len(p)
        _COUNTER.pack_into(self._mm, _COUNTER_AT, counter)

    def close(self, *, clean: bool) -> None:
        if self._mm.closed:
            return
        if clean:
            struct.pack_into("<B", self._mm, 16, CLEAN)
            self._mm.flush()
        self._mm.close()
        os.close(self._fd)


@functools.lru_cache(maxsize=256)
def _one_path_slot(length: int) -> struct.Struct:
    """A slot head followed by one path of ``length`` bytes: the same bytes as ``_SLOT_HEAD`` then the path."""
    return struct.Struct(f"<QHHI{length}s")


def _left_over(mm: mmap.mmap, last_seq: int, boot_id: bytes) -> list[bytes] | None:
    magic, version, slots, state, boot, counter = _HEADER.unpack_from(mm, 0)
    if magic != MAGIC or version != VERSION or slots != SLOTS:
        return None if magic == MAGIC else []  # a zeroed (new) file is a first run
    if state == CLEAN:
        return []
    if boot != boot_id:
        log.warning("the machine went down while the vault was mounted: the whole vault is compared with its targets")
        return None
    out: set[bytes] = set()
    for i in range(min(counter, SLOTS)):
        slot = HEADER_BYTES + i * SLOT_BYTES
        seq, len1, len2, _ = _SLOT_HEAD.unpack_from(mm, slot)
        if seq + SEQ_MARGIN <= last_seq:
            continue
        if len1 == TOO_LONG:
            return None
        at = slot + _SLOT_HEAD.size
        for n in (len1, len2):
            if n:
                out.add(bytes(mm[at:at + n]))
                at += n
    return sorted(out)
