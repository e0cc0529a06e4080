"""Tests for octofs/codec.py: op <-> msgpack round trips, refusal of bad payloads, and FORMAT.md §4 agreement."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack  # the test may build hostile payloads by hand; octofs code itself imports msgpack only in codec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octofs import codec, ops
from octofs.errors import OpError
from tests.support.journal_helpers import GOLDEN_OPS, OP_STRATEGIES, any_op, golden_records, records

FORMAT_MD = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def _raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _payload_map(rec: ops.Record) -> dict:
    return msgpack.unpackb(codec.encode_record(rec), raw=False)


# -- round trips ---------------------------------------------------------------------


@given(records)
def test_round_trip_any_record(rec):
    assert codec.decode_record(codec.encode_record(rec)) == rec


@pytest.mark.parametrize("op_type", ops.OP_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=60)
@given(data=st.data())
def test_round_trip_every_op_type(op_type, data):
    op = data.draw(OP_STRATEGIES[op_type])
    rec = ops.Record(data.draw(st.integers(1, 2**64 - 1)), data.draw(st.integers(-(2**63), 2**63 - 1)), op)
    decoded = codec.decode_record(codec.encode_record(rec))
    assert decoded == rec
    assert type(decoded.op) is op_type


def test_strategies_and_golden_ops_cover_every_op_type():
    assert set(OP_STRATEGIES) == set(ops.OP_TYPES)
    assert {type(op) for op in GOLDEN_OPS} == set(ops.OP_TYPES) - ops.REPAIR_ONLY
    for rec in golden_records():
        assert codec.decode_record(codec.encode_record(rec)) == rec


def test_bytes_stay_bytes_and_str_stays_str():
    obj = {"k": [b"\xff\x00", "text", 1, None, True]}
    assert codec.unpackb(codec.packb(obj)) == obj


# -- the on-disk encoding (FORMAT.md §4) ----------------------------------------------


def test_write_op_payload_keys_and_types():
    m = _payload_map(ops.Record(7, 123, ops.WriteOp(b"a/b", 5, b"xyz", 9)))
    assert m == {"s": 7, "w": 123, "t": 9, "p": b"a/b", "o": 5, "d": b"xyz", "mt": 9}


def test_setattr_unchanged_fields_are_absent_keys():
    m = _payload_map(ops.Record(1, 0, ops.SetattrOp(b"f", mode=0o644)))
    assert m == {"s": 1, "w": 0, "t": 11, "p": b"f", "m": 0o644}


def test_op_codes_and_names_match_format_md():
    text = FORMAT_MD.read_text()
    rows = re.findall(r"^\| (\d+) \| (\w+) \| `(\w+)` \|$", text, flags=re.M)
    documented = {name: (int(code), op_name) for code, op_name, name in rows}
    implemented = {t.__name__: (codec.OP_CODES[t], codec.OP_NAMES[t]) for t in ops.OP_TYPES}
    assert documented == implemented
    assert len(set(codec.OP_CODES.values())) == len(ops.OP_TYPES)


def test_every_encoded_key_is_documented_in_format_md():
    text = FORMAT_MD.read_text()
    section = text.split("## 4. Op encoding", 1)[1].split("## 5.", 1)[0]
    documented = set(re.findall(r"`([a-z]{1,3})`", section))
    for rec in golden_records():
        assert set(_payload_map(rec)) <= documented, type(rec.op).__name__


# -- decoding is tolerant of additions, strict about everything else -------------------


def test_unknown_keys_are_ignored():
    rec = ops.Record(3, 4, ops.RenameOp(b"a", b"b", ops.RENAME_EXCHANGE))
    m = _payload_map(rec)
    m["zz"] = [1, 2, {"nested": b"x"}]
    m["future"] = "value"
    assert codec.decode_record(_raw(m)) == rec


def test_optional_keys_take_their_defaults():
    assert codec.decode_record(_raw({"s": 1, "w": 0, "t": 8, "src": b"a", "p": b"b"})).op == ops.RenameOp(b"a", b"b", 0)
    assert codec.decode_record(_raw({"s": 1, "w": 0, "t": 14, "p": b""})).op == ops.FsyncOp(b"", False)
    assert codec.decode_record(_raw({"s": 1, "w": 0, "t": 11, "p": b"x", "u": None})).op == ops.SetattrOp(b"x")


@pytest.mark.parametrize("rec", golden_records(), ids=lambda r: type(r.op).__name__)
def test_missing_required_key_is_refused(rec):
    m = _payload_map(rec)
    optional = {"f", "ds"} | ({"m", "u", "g", "at", "mt"} if isinstance(rec.op, ops.SetattrOp) else set())
    for key in m:
        if key in optional:
            continue
        broken = {k: v for k, v in m.items() if k != key}
        with pytest.raises(OpError, match=re.escape(repr(key))):
            codec.decode_record(_raw(broken))


@pytest.mark.parametrize(
    "change",
    [
        {"p": "a/b"},  # str path instead of bin
        {"p": b"/abs"},
        {"p": b"a/../b"},
        {"p": b"a\0b"},
        {"p": b""},  # the root is not writable
        {"o": -1},
        {"o": 1.0},
        {"o": True},
        {"mt": None},
        {"d": "text"},
        {"s": 0},
        {"s": -5},
        {"s": True},
        {"w": 1.5},
        {"t": 99},
        {"t": True},  # True == 1 in Python; must not select "create"
        {"t": "write"},
    ],
    ids=repr,
)
def test_bad_field_values_are_refused(change):
    m = _payload_map(ops.Record(1, 0, ops.WriteOp(b"a/b", 0, b"x", 1)))
    m.update(change)
    with pytest.raises(OpError):
        codec.decode_record(_raw(m))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        _raw([1, 2, 3]),
        _raw("s"),
        _raw({1: 2}),  # int map key (strict_map_key)
        _raw({"s": 1, "w": 0, "t": 6, "p": b"a"}) + b"\x00",  # trailing bytes
        _raw({"s": 1, "w": 0, "t": 6, "p": msgpack.ExtType(1, b"ab")}),
        _raw({"s": 1, "w": 0, "t": 6, "p": msgpack.Timestamp(1, 0)}),
        b"\x81\xa1s" + b"\x91" * 3000,  # deep nesting
        b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8 in a str key
        b"\xdf\xff\xff\xff\xff",  # map claiming 2**32-1 entries
        b"\xc6\xff\xff\xff\xff",  # bin claiming 4 GiB
    ],
    ids=lambda p: p[:12].hex() or "empty",
)
def test_malformed_payloads_are_refused(payload):
    with pytest.raises(OpError, match="Invalid op"):
        codec.decode_record(payload)


@given(records, st.data())
def test_every_truncation_is_refused(rec, data):
    payload = codec.encode_record(rec)
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    with pytest.raises(OpError):
        codec.decode_record(payload[:cut])


@given(st.binary(max_size=200))
def test_garbage_never_decodes_to_garbage(blob):
    try:
        rec = codec.decode_record(blob)
    except OpError:
        return
    # If random bytes do decode, the result must be a fully valid record.
    ops.validate(rec.op)
    assert codec.decode_record(codec.encode_record(rec)) == rec


@given(records, st.data())
def test_corrupted_payload_is_refused_or_valid(rec, data):
    payload = bytearray(codec.encode_record(rec))
    i = data.draw(st.integers(0, len(payload) - 1))
    payload[i] ^= data.draw(st.integers(1, 255))
    try:
        out = codec.decode_record(bytes(payload))
    except OpError:
        return
    ops.validate(out.op)  # a flipped byte may still be a valid record (e.g. another int), never an invalid one


# -- encoding refuses what decoding would refuse --------------------------------------


@pytest.mark.parametrize(
    "rec",
    [
        ops.Record(1, 0, ops.UnlinkOp(b"/etc/passwd")),
        ops.Record(1, 0, ops.UnlinkOp(b"../x")),
        ops.Record(1, 0, ops.UnlinkOp("text")),
        ops.Record(0, 0, ops.UnlinkOp(b"x")),
        ops.Record(2**64, 0, ops.UnlinkOp(b"x")),
        ops.Record(1, 0.5, ops.UnlinkOp(b"x")),
        ops.Record(1, 0, ops.CreateOp(b"x", 0o644, 2**64, 0, 0)),  # does not fit msgpack
        ops.Record(1, 0, ops.RenameOp(b"a", b"b", 8)),
        ops.Record(1, 0, "not an op"),
        # The ops of the per-request path are checked by a fast path (codec._valid_hot): the same refusals.
        ops.Record(1, 0, ops.WriteOp(b"/abs", 0, b"x", 0)),
        ops.Record(1, 0, ops.WriteOp(b"a/../b", 0, b"x", 0)),
        ops.Record(1, 0, ops.WriteOp(b"", 0, b"x", 0)),
        ops.Record(1, 0, ops.WriteOp(b"ok", -1, b"x", 0)),
        ops.Record(1, 0, ops.WriteOp(b"ok", 0, "text", 0)),
        ops.Record(1, 0, ops.WriteOp(b"ok", 0, b"x", None)),
        ops.Record(1, 0, ops.WriteOp(b"ok", True, b"x", 0)),
        ops.Record(1, 0, ops.TruncateOp(b"ok", -5, 0)),
        ops.Record(1, 0, ops.TruncateOp(b"a\0b", 0, 0)),
        ops.Record(1, 0, ops.FsyncOp(b"ok", datasync=1)),
        ops.Record(1, 0, ops.FsyncOp(b"a//b")),
    ],
    ids=repr,
)
def test_encode_refuses_invalid_records(rec):
    with pytest.raises(OpError):
        codec.encode_record(rec)


def test_fast_path_accepts_what_validate_accepts():
    for op in (ops.WriteOp(b"ok", 0, b"x", 0), ops.WriteOp(b"ok", 0, b"x", 0),  # the second from the path cache
               ops.FsyncOp(b""), ops.FsyncOp(b"d/f", datasync=True), ops.TruncateOp(b"d/f", 0, -1)):
        rec = ops.Record(7, 1, op)
        assert codec.decode_record(codec.encode_record(rec)) == rec
    with pytest.raises(OpError):  # a path refused once is not remembered as good
        codec.encode_record(ops.Record(1, 0, ops.WriteOp(b"../x", 0, b"", 0)))
    with pytest.raises(OpError):
        codec.encode_record(ops.Record(1, 0, ops.WriteOp(b"../x", 0, b"", 0)))


def test_encode_refuses_data_over_the_bin_limit():
    big = ops.Record(1, 0, ops.WriteOp(b"f", 0, bytes(codec.MAX_BIN_BYTES + 1), 0))
    with pytest.raises(OpError, match="longer than"):
        codec.encode_record(big)
    at_limit = ops.Record(1, 0, ops.WriteOp(b"f", 0, bytes(codec.MAX_BIN_BYTES), 0))
    payload = codec.encode_record(at_limit)
    assert len(payload) <= codec.MAX_PAYLOAD_BYTES
    assert codec.decode_record(payload) == at_limit


def test_unpackb_reports_codec_error():
    with pytest.raises(codec.CodecError, match="not valid msgpack"):
        codec.unpackb(b"\x92\x01")
    assert issubclass(codec.CodecError, ValueError)


@given(any_op)
def test_op_name_and_code_are_defined(op):
    assert codec.op_name(op) == codec.OP_NAMES[type(op)]
    assert 1 <= codec.op_code(op) <= len(ops.OP_TYPES)
