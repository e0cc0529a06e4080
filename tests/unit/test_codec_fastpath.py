"""codec's fast validity checks (``_valid_hot``) agree with ``ops.validate``: never looser, and used for every captured op."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octofs import codec, ops
from octofs.errors import OpError
from tests.support.journal_helpers import OP_STRATEGIES

# Values of every kind a field might wrongly hold: paths the rules refuse, the root, bools
# (ints to isinstance), negative numbers, None, str, floats, and some valid ones.
_WILD = st.one_of(
    st.sampled_from([b"", b"/abs", b"a/../b", b"a//b", b".", b"a\0b", b"x" * 256, b"ok", b"d/f", b"user.x",
                     True, False, None, -1, 0, 1, 2, 3, 0o644, 2**63, "text", 1.5]),
    st.binary(max_size=8),
    st.integers(-(2**65), 2**65),
)

CAPTURED = [t for t in ops.OP_TYPES if t not in ops.REPAIR_ONLY]


def _validate_ok(op) -> bool:
    try:
        ops.validate(op)
    except OpError:
        return False
    return True


def _wild_op(op_type, data):
    """An op of ``op_type`` with every field drawn from _WILD: built by hand, never validated."""
    return op_type(**{f.name: data.draw(_WILD, label=f.name) for f in dataclasses.fields(op_type)})


@pytest.mark.parametrize("op_type", ops.OP_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=300)
@given(data=st.data())
def test_fast_check_never_accepts_what_validate_refuses(op_type, data):
    op = _wild_op(op_type, data)
    if codec._valid_hot(op):
        assert _validate_ok(op), op
    try:
        codec.encode_payload(1, 0, op)
    except OpError:
        return  # refused: by validate, or a value msgpack cannot hold (an int over 64 bits)
    assert _validate_ok(op), op  # nothing is journaled that validate refuses


@pytest.mark.parametrize("op_type", CAPTURED, ids=lambda t: t.__name__)
@settings(max_examples=100)
@given(data=st.data())
def test_fast_check_accepts_every_valid_captured_op(op_type, data):
    op = data.draw(OP_STRATEGIES[op_type])
    assert codec._valid_hot(op), op  # no validate() on the per-request path for a valid op
    assert codec.decode_record(codec.encode_payload(9, 1, op)).op == op


@pytest.mark.parametrize("op_type", ops.OP_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=300)
@given(data=st.data())
def test_decode_refuses_exactly_what_validate_refuses(op_type, data):
    # A peer's payload, built by hand with no validation: decode_record's fast check must not let
    # through anything validate would refuse (a target decodes every op it applies).
    op = _wild_op(op_type, data)
    try:
        payload = codec.packb(codec._ENCODERS[op_type](1, 0, op))
    except (OverflowError, TypeError, ValueError):
        return  # not representable in msgpack at all
    try:
        decoded = codec.decode_record(payload)
    except OpError:
        assert not _validate_ok(op), op  # refused only what validate refuses
        return
    assert _validate_ok(decoded.op), decoded
    assert _validate_ok(op), op
