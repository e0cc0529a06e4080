"""journal_helpers.py: test helpers for the journal and codec: Hypothesis strategies for ops, and the golden cases.

The golden cases in tests/data/journal/<case>/ are written by ``write_golden_cases`` (via
scripts/make_golden_journals.py). They are deterministic: fixed vault id, epoch and times, so regenerating them
with an unchanged format gives the same bytes (a test checks exactly that).
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

from hypothesis import strategies as st

from octofs import ops
from octofs.journal import JournalWriter, list_segments
from octofs.segment import HEADER_SIZE, RECORD_FRAME_SIZE, header_bytes
from octofs.paths import journal_dir

GOLDEN_VAULT_ID = b"octofs-golden-v1"
GOLDEN_EPOCH = 1
GOLDEN_TIME_NS = 1_700_000_000_123_456_788  # record seq N is journaled at GOLDEN_TIME_NS + N
GOLDEN_MTIME_NS = 1_700_000_000_000_000_000
GOLDEN_CASES = ("ok", "one-op", "torn-tail", "crc-mismatch", "future-version")

_T = GOLDEN_MTIME_NS

# One of every op type (so the golden files pin the encoding of each), in an order that makes sense on disk.
GOLDEN_OPS: tuple[ops.Op, ...] = (
    ops.MkdirOp(b"docs", 0o755, 1000, 1000, _T),
    ops.CreateOp(b"docs/readme.txt", 0o644, 1000, 1000, _T),
    ops.WriteOp(b"docs/readme.txt", 0, b"hello\n", _T),
    ops.TruncateOp(b"docs/readme.txt", 3, _T + 1),
    ops.SetattrOp(b"docs/readme.txt", mode=0o600, mtime_ns=_T + 2),
    ops.SetxattrOp(b"docs/readme.txt", b"user.tag", b"blue"),
    ops.RemovexattrOp(b"docs/readme.txt", b"user.tag"),
    ops.SymlinkOp(b"docs/link", b"readme.txt", 1000, 1000, _T),
    ops.LinkOp(b"docs/readme.txt", b"docs/hard"),
    ops.RenameOp(b"docs/hard", b"docs/caf\xe9", ops.RENAME_NOREPLACE),
    ops.MknodOp(b"fifo", stat.S_IFIFO | 0o644, 0, 1000, 1000, _T),
    ops.UnlinkOp(b"fifo"),
    ops.MkdirOp(b"empty", 0o700, 0, 0, _T),
    ops.RmdirOp(b"empty"),
    ops.SetattrOp(b"", uid=0, gid=0, atime_ns=_T, mtime_ns=_T),
    ops.FsyncOp(b"docs/readme.txt", datasync=True),
)

ONE_OP = ops.WriteOp(b"docs/readme.txt", 0, b"hello\n", GOLDEN_MTIME_NS)


def golden_records(op_list: tuple[ops.Op, ...] = GOLDEN_OPS) -> list[ops.Record]:
    return [ops.Record(i, GOLDEN_TIME_NS + i, op) for i, op in enumerate(op_list, start=1)]


def write_journal(jdir: Path, op_list, *, vault_id: bytes = GOLDEN_VAULT_ID, epoch: int = GOLDEN_EPOCH,
                  time_base: int = GOLDEN_TIME_NS, **writer_kw) -> list[int]:
    """Append ``op_list`` to the journal in ``jdir`` with deterministic times; return the seqs."""
    with JournalWriter.open(jdir, vault_id=vault_id, epoch=epoch, **writer_kw) as w:
        return [w.append(op, time_ns=time_base + w.last_seq + 1) for op in op_list]


def record_offsets(segment: Path) -> list[tuple[int, int]]:
    """(offset, size) of every whole record in a well-formed segment, by walking the frames."""
    data = segment.read_bytes()
    out = []
    pos = HEADER_SIZE
    while pos + RECORD_FRAME_SIZE <= len(data):
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        size = RECORD_FRAME_SIZE + length
        if pos + size > len(data):
            break
        out.append((pos, size))
        pos += size
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content), to compare directories byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_golden_cases(root: Path) -> None:
    """(Re)write every golden case under ``root`` (tests/data/journal), deterministically."""
    for case in GOLDEN_CASES:
        case_dir = root / case
        if case_dir.exists():
            shutil.rmtree(case_dir)
        jdir = journal_dir(case_dir)
        expected = _WRITERS[case](jdir)
        (case_dir / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


def _write_ok(jdir: Path) -> dict:
    # A small max_segment_bytes so the case also pins segment rotation and naming.
    write_journal(jdir, GOLDEN_OPS, max_segment_bytes=600)
    segs = list_segments(jdir)
    return {
        "outcome": "ok",
        "description": "every op type once, across two segments",
        "last_seq": len(GOLDEN_OPS),
        "segments": [s.path.name for s in segs],
    }


def _write_one_op(jdir: Path) -> dict:
    write_journal(jdir, (ONE_OP,))
    return {
        "outcome": "ok",
        "description": "the worked example of docs/FORMAT.md section 8",
        "last_seq": 1,
        "segments": [s.path.name for s in list_segments(jdir)],
    }


def _write_torn_tail(jdir: Path) -> dict:
    write_journal(jdir, GOLDEN_OPS)
    seg = list_segments(jdir)[0].path
    last_offset, last_size = record_offsets(seg)[-1]
    cut = last_offset + last_size // 2
    with open(seg, "r+b") as f:
        f.truncate(cut)
    return {
        "outcome": "torn-tail",
        "description": "the last record is cut in half, as by a crash during its append",
        "last_seq": len(GOLDEN_OPS) - 1,
        "segment": seg.name,
        "cut_offset": last_offset,
        "truncated_bytes": cut - last_offset,
    }


def _write_crc_mismatch(jdir: Path) -> dict:
    write_journal(jdir, GOLDEN_OPS[:5])
    seg = list_segments(jdir)[0].path
    offset, size = record_offsets(seg)[1]  # record seq 2; valid records follow it
    data = bytearray(seg.read_bytes())
    data[offset + size - 1] ^= 0xFF  # flip the last payload byte of record 2
    seg.write_bytes(bytes(data))
    return {
        "outcome": "corrupt",
        "description": "one payload byte of record seq 2 (of 5) flipped: a CRC mismatch before the tail",
        "exit_code": 31,
        "segment": seg.name,
        "offset": offset,
        "readable_records": 1,
    }


def _write_future_version(jdir: Path) -> dict:
    write_journal(jdir, (ONE_OP,))
    seg = list_segments(jdir)[0].path
    data = seg.read_bytes()
    seg.write_bytes(header_bytes(GOLDEN_VAULT_ID, GOLDEN_EPOCH, 1, version=2) + data[HEADER_SIZE:])
    return {
        "outcome": "unsupported-version",
        "description": "the one-op segment with format version 2 in its (CRC-valid) header",
        "exit_code": 32,
        "segment": seg.name,
        "version": 2,
    }


_WRITERS = {
    "ok": _write_ok,
    "one-op": _write_one_op,
    "torn-tail": _write_torn_tail,
    "crc-mismatch": _write_crc_mismatch,
    "future-version": _write_future_version,
}


# -- Hypothesis strategies -----------------------------------------------------------------

_component = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
paths = st.lists(_component, min_size=1, max_size=4).map(b"/".join)
root_or_path = st.one_of(st.just(b""), paths)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
uints = st.integers(min_value=0, max_value=2**64 - 1)
ids = st.integers(min_value=-(2**31), max_value=2**32)
perm = st.integers(min_value=0, max_value=0o7777)
blobs = st.binary(max_size=300)
rename_flags = st.sampled_from([0, ops.RENAME_NOREPLACE, ops.RENAME_EXCHANGE])
xattr_names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)


def _opt(strategy):
    return st.none() | strategy


OP_STRATEGIES = {
    ops.CreateOp: st.builds(ops.CreateOp, paths, perm, ids, ids, ints),
    ops.MkdirOp: st.builds(ops.MkdirOp, paths, perm, ids, ids, ints),
    ops.MknodOp: st.builds(ops.MknodOp, paths, uints, uints, ids, ids, ints),
    ops.SymlinkOp: st.builds(ops.SymlinkOp, paths, blobs, ids, ids, ints),
    ops.LinkOp: st.builds(ops.LinkOp, paths, paths),
    ops.UnlinkOp: st.builds(ops.UnlinkOp, paths),
    ops.RmdirOp: st.builds(ops.RmdirOp, paths),
    ops.RenameOp: st.builds(ops.RenameOp, paths, paths, rename_flags),
    ops.WriteOp: st.builds(ops.WriteOp, paths, uints, blobs, ints),
    ops.TruncateOp: st.builds(ops.TruncateOp, paths, uints, ints),
    ops.SetattrOp: st.builds(ops.SetattrOp, root_or_path, _opt(perm), _opt(ids), _opt(ids), _opt(ints), _opt(ints)),
    ops.SetxattrOp: st.builds(ops.SetxattrOp, root_or_path, xattr_names, blobs),
    ops.RemovexattrOp: st.builds(ops.RemovexattrOp, root_or_path, xattr_names),
    ops.FsyncOp: st.builds(ops.FsyncOp, root_or_path, st.booleans()),
    ops.RemoveTreeOp: st.builds(ops.RemoveTreeOp, paths),
}

any_op = st.one_of(*OP_STRATEGIES.values())
records = st.builds(ops.Record, st.integers(min_value=1, max_value=2**64 - 1), ints, any_op)
