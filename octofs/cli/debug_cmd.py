"""debug_cmd.py: owns ``octofs debug ...``, starting with ``octofs debug dump-journal DIR``.

Invariants:
- Read-only: it never changes a journal (it uses ``JournalReader`` and plain reads, never ``JournalWriter``).
- Text mode prints one line per record; ``--json-lines`` prints one JSON object per record on stdout;
  ``--hex`` prints an annotated hexdump of the raw segment bytes (the format of docs/FORMAT.md §8).
- Errors (corruption, unsupported version) are raised as ``OctofsError``s for ``cli.main`` to report; records
  printed before the error stay printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

from octofs import codec
from octofs.errors import OpError, UsageError
from octofs.journal import JournalReader, list_segments
from octofs.ops import Op, Record
from octofs.paths import journal_dir
from octofs.segment import HEADER_SIZE, RECORD_FRAME_SIZE, RECORD_MAGIC, parse_header

log = logging.getLogger(__name__)

# Op fields shown as length + sha256 prefix instead of their bytes.
_BLOB_FIELDS = frozenset({"data", "value"})
_SHA_PREFIX_HEX = 12


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``debug`` and its subcommands to the top-level subparsers.

    Returns:
        The ``debug`` parser.
    """
    debug = subparsers.add_parser("debug", help="inspect octofs internals (read-only)")
    sub = debug.add_subparsers(dest="debug_command", metavar="COMMAND", required=True)
    dump = sub.add_parser(
        "dump-journal",
        help="print the records of a journal",
        description="Print the records of a vault's journal, one line per record. Read-only.",
    )
    dump.add_argument("dir", metavar="DIR", type=Path, help="a vault state dir, or its journal/ dir")
    fmt = dump.add_mutually_exclusive_group()
    fmt.add_argument(
        "--hex", action="store_true", help="annotated hexdump of the raw segment bytes (headers and records)"
    )
    fmt.add_argument("--json-lines", action="store_true", help="one JSON object per record")
    dump.add_argument(
        "--from",
        dest="from_seq",
        type=_seq_arg,
        default=1,
        metavar="SEQ",
        help="start at this seq (with --hex: skip segments that hold only older seqs)",
    )
    return debug


def run(args: argparse.Namespace) -> int:
    """Run a ``debug`` subcommand.

    Returns:
        The exit status (0).

    Raises:
        UsageError: DIR does not exist.
        JournalError: the journal is corrupt (31), has an unsupported version (32), or cannot be read.
    """
    if args.debug_command == "dump-journal":
        return _dump_journal(args)
    raise UsageError(detail=f"unknown debug command {args.debug_command!r}")


def _seq_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a seq: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a seq is at least 1, got {value}")
    return value


def _resolve_journal_dir(path: Path) -> Path:
    if journal_dir(path).is_dir():
        return journal_dir(path)
    if path.is_dir():
        return path
    raise UsageError(detail=f"{path}: no such directory (expected a vault state dir or its journal/ dir)")


def _dump_journal(args: argparse.Namespace) -> int:
    jdir = _resolve_journal_dir(args.dir)
    if args.hex:
        for line in hexdump_journal(jdir, args.from_seq):
            print(line)
        return 0
    fmt: Callable[[Record], str] = _json_line if args.json_lines else _text_line
    for rec in JournalReader(jdir).records(args.from_seq):
        print(fmt(rec))
    return 0


# -- record lines ---------------------------------------------------------------------


def _rfc3339_ns(time_ns: int) -> str:
    seconds, nanos = divmod(time_ns, 10**9)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def _show_bytes(value: bytes) -> str:
    """Bytes as text: verbatim if printable UTF-8 without spaces or quotes, else a quoted escaped literal."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text and text.isprintable() and not any(c in text for c in " \"'\\="):
        return text
    return repr(value)[1:]  # b'...' -> '...', keeping Python's escapes


def _blob(value: bytes) -> str:
    return f"{len(value)}:{hashlib.sha256(value).hexdigest()[:_SHA_PREFIX_HEX]}"


def _op_fields(op: Op) -> Iterator[tuple[str, object]]:
    for f in dataclasses.fields(op):
        if f.name == "path":
            continue
        value = getattr(op, f.name)
        if value is None:  # setattr: unchanged
            continue
        yield f.name, value


def _text_line(rec: Record) -> str:
    """``seq time op-type path fields``; data shown as length:sha256-prefix."""
    op = rec.op
    path = _show_bytes(op.path) if op.path else "."  # "." is the vault root (no vault path can be ".")
    parts = [str(rec.seq), _rfc3339_ns(rec.time_ns), codec.op_name(op), path]
    for name, value in _op_fields(op):
        if isinstance(value, bytes):
            shown = _blob(value) if name in _BLOB_FIELDS else _show_bytes(value)
        elif name == "mode":
            shown = oct(value)
        else:
            shown = str(value)
        parts.append(f"{name}={shown}")
    return " ".join(parts)


def _json_line(rec: Record) -> str:
    op = rec.op
    obj: dict[str, object] = {
        "seq": rec.seq,
        "time": _rfc3339_ns(rec.time_ns),
        "time_ns": rec.time_ns,
        "op": codec.op_name(op),
        "path": os.fsdecode(op.path),
    }
    for name, value in _op_fields(op):
        if isinstance(value, bytes) and name in _BLOB_FIELDS:
            obj[f"{name}_len"] = len(value)
            obj[f"{name}_sha256"] = hashlib.sha256(value).hexdigest()
        elif isinstance(value, bytes):
            obj[name] = os.fsdecode(value)  # non-UTF-8 bytes become \udcXX escapes, reversible with fsencode
        else:
            obj[name] = value
    return json.dumps(obj)


# -- hexdump -----------------------------------------------------------------------------


def _hex_rows(data: bytes, offset: int, note: str) -> Iterator[str]:
    """16 bytes per row: offset, hex, |ascii|, and the note on the first row."""
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hex_part = " ".join(f"{b:02x}" for b in chunk)
        ascii_part = "|" + "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk) + "|"
        yield f"{offset + i:08x}  {hex_part:<47}  {ascii_part:<18}  {note if i == 0 else ''}".rstrip()


def _u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


def hexdump_journal(jdir: Path, from_seq: int = 1) -> Iterator[str]:
    """Annotated hexdump lines of every segment of ``jdir`` (lenient: damaged bytes are shown, not refused).

    Args:
        jdir: the ``journal/`` directory.
        from_seq: skip segments whose records are all older than this.
    """
    segs = list_segments(jdir)
    for k, seg in enumerate(segs):
        if k + 1 < len(segs) and segs[k + 1].first_seq <= from_seq:
            continue
        data = seg.path.read_bytes()
        yield f"# segment {seg.path.name}: {len(data)} bytes"
        yield from _hexdump_segment(seg.path, data)


def _hexdump_segment(path: Path, data: bytes) -> Iterator[str]:
    header = parse_header(data[:HEADER_SIZE], path)
    if isinstance(header, str):
        yield f"# damaged header: {header}"
        yield from _hex_rows(data, 0, "unparsed")
        return
    yield "# header"
    yield from _hex_rows(data[0:8], 0, "magic")
    yield from _hex_rows(data[8:9], 8, f"version {header.version}")
    yield from _hex_rows(data[9:16], 9, "reserved")
    yield from _hex_rows(data[16:32], 16, f"vault_id {header.vault_id.hex()}")
    yield from _hex_rows(data[32:40], 32, f"epoch {header.epoch}")
    yield from _hex_rows(data[40:48], 40, f"first_seq {header.first_seq}")
    yield from _hex_rows(data[48:52], 48, f"header_crc32 0x{_u32(data[48:52]):08x}")
    offset = HEADER_SIZE
    while offset < len(data):
        problem = _record_problem(data, offset)
        if problem is not None:
            yield f"# damage at offset {offset}: {problem}; {len(data) - offset} bytes not parsed"
            yield from _hex_rows(data[offset:], offset, "unparsed")
            return
        length = _u32(data[offset + 4 : offset + 8])
        payload = data[offset + RECORD_FRAME_SIZE : offset + RECORD_FRAME_SIZE + length]
        try:
            title = _text_line(codec.decode_record(payload))
        except OpError as exc:  # a debug dump shows what it can; the reader is the strict one
            title = f"undecodable payload: {exc}"
        yield f"# record {title}"
        yield from _hex_rows(data[offset : offset + 4], offset, "record magic")
        yield from _hex_rows(data[offset + 4 : offset + 8], offset + 4, f"length {length}")
        yield from _hex_rows(
            data[offset + 8 : offset + 12], offset + 8, f"crc32 0x{_u32(data[offset + 8 : offset + 12]):08x}"
        )
        yield from _payload_rows(payload, offset + RECORD_FRAME_SIZE)
        offset += RECORD_FRAME_SIZE + length


def _record_problem(data: bytes, offset: int) -> str | None:
    if len(data) - offset < RECORD_FRAME_SIZE:
        return "too short for a record frame"
    if data[offset : offset + 4] != RECORD_MAGIC:
        return "bad record magic"
    length = _u32(data[offset + 4 : offset + 8])
    if length == 0 or offset + RECORD_FRAME_SIZE + length > len(data):
        return f"record length {length} runs past the end"
    payload = data[offset + RECORD_FRAME_SIZE : offset + RECORD_FRAME_SIZE + length]
    if zlib.crc32(payload) != _u32(data[offset + 8 : offset + 12]):
        return "record CRC mismatch"
    return None


def _payload_rows(payload: bytes, offset: int) -> Iterator[str]:
    """The payload split into the map header and one ``key = value`` row group per entry, when it re-encodes
    byte for byte (octofs wrote it); otherwise as one raw block."""
    try:
        m = codec.unpackb(payload)
        exact = isinstance(m, dict) and codec.packb(m) == payload
    except (codec.CodecError, TypeError, OverflowError):
        exact = False
    if not exact:
        yield from _hex_rows(payload, offset, f"payload ({len(payload)} bytes, msgpack)")
        return
    entries = [(codec.packb(k) + codec.packb(v), k, v) for k, v in m.items()]
    head_len = len(payload) - sum(len(e[0]) for e in entries)
    yield from _hex_rows(payload[:head_len], offset, f"payload: msgpack map of {len(m)} entries")
    pos = offset + head_len
    for raw, key, value in entries:
        shown = _blob(value) if isinstance(value, bytes) and len(value) > 32 else repr(value)
        yield from _hex_rows(raw, pos, f"  {key} = {shown}")
        pos += len(raw)
