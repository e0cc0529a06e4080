"""The per-batch hot path of replication (docs/PERFORMANCE.md): the `ops`/`ack` frames' fast encode and
decode, the link's checkpoint-free send on real TCP, and a barrier that ends a run
of data ops on its own path without a second confined walk."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from octofs import codec, protocol, replayer, scan
from octofs.errors import OpError, ProtocolError
from octofs.link import send_now
from octofs.ops import CreateOp, FsyncOp, Record, WriteOp
from octofs.replica import Replica

T = 1_700_000_000_000_000_000
VID = bytes(range(16))


def _frame(body: object) -> bytes:
    payload = codec.packb(body)
    return struct.pack("<I", len(payload)) + payload


# -- frames ------------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=64), max_size=5), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_ops_and_ack_frames_are_the_generic_maps(records: list[bytes], epoch: int, seq: int) -> None:
    """Built directly, the bytes are still those of the documented maps (FORMAT §7.2), keys in order."""
    assert protocol.encode(protocol.OpBatch(tuple(records), epoch)) == _frame(
        {"t": "ops", "records": records, "epoch": epoch})
    assert protocol.encode(protocol.Ack(seq)) == _frame({"t": "ack", "seq": seq})


_VALUES = (st.none() | st.booleans() | st.integers(-5, 2**64 - 1) | st.floats(allow_nan=False)
           | st.binary(max_size=8) | st.text(max_size=4) | st.lists(st.binary(max_size=4) | st.integers(0, 9)
                                                                     | st.text(max_size=2), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ops", "ack"]), st.dictionaries(st.sampled_from(["records", "epoch", "seq", "x"]), _VALUES))
def test_ops_and_ack_decode_accepts_exactly_the_well_typed(tag: str, fields: dict) -> None:
    """The fast decode never accepts what §7.1's rules refuse, and refuses nothing they accept."""
    body = {"t": tag, **fields}
    if tag == "ops":
        records, epoch = fields.get("records"), fields.get("epoch", 0)
        valid = (type(records) is list and all(type(r) is bytes for r in records)
                 and type(epoch) is int and epoch >= 0)
        expected = protocol.OpBatch(tuple(records), epoch) if valid else None
    else:
        seq = fields.get("seq")
        valid = type(seq) is int and seq >= 0
        expected = protocol.Ack(seq) if valid else None
    if expected is None:
        with pytest.raises(ProtocolError):
            protocol.decode_payload(codec.packb(body))
    else:
        assert protocol.decode_payload(codec.packb(body)) == expected


@pytest.mark.parametrize(("body", "reason"), [
    ({"t": "ops", "records": [b"a", "b"]}, "records must be binary"),
    ({"t": "ops", "records": [b"a"], "epoch": True}, "field 'epoch' has type bool"),
    ({"t": "ops", "records": [b"a"], "epoch": -1}, "field 'epoch' is negative"),
    ({"t": "ops"}, "missing field 'records'"),
    ({"t": "ack", "seq": -2}, "field 'seq' is negative"),
    ({"t": "ack", "seq": False}, "field 'seq' has type bool"),
])
def test_a_bad_ops_or_ack_frame_is_refused_naming_the_fault(body: dict, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_payload(codec.packb(body))
    assert reason in str(info.value.fields.get("reason", info.value))


# -- the link ------------------------------------------------------------------------------------


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def test_send_now_on_tcp_keeps_every_byte_in_order() -> None:
    client, server = await _tcp_pair()
    async with client, server:
        frame = protocol.encode(protocol.Ack(7))
        assert send_now(client, frame) == len(frame)  # a small frame: taken at once
        got = b""
        while len(got) < len(frame):
            got += await server.receive_some(65536)
        assert got == frame
        # A socket that takes no more: send_now takes what fits (maybe nothing), send_all the rest.
        big = os.urandom(1 << 20)
        sent = 0
        chunks = []
        for _ in range(4):  # fill the socket's buffers, nobody reading
            sent += send_now(client, big)
        assert 0 < sent < 4 * len(big)
        assert send_now(client, big) == 0  # full: takes nothing, never waits

        async def drain() -> None:
            while sum(map(len, chunks)) < sent + 4 * len(big):
                chunks.append(await server.receive_some(65536))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            for _ in range(4):
                n = send_now(client, big)
                await client.send_all(memoryview(big)[n:])
        assert b"".join(chunks)[sent:] == big * 4
        await client.aclose()
        assert await server.receive_some(10) == b""  # EOF


async def test_send_now_leaves_other_streams_to_send_all() -> None:
    stream = trio.testing.MemorySendStream()
    assert send_now(stream, b"abc") == 0
    with pytest.raises(trio.WouldBlock):  # nothing was written
        stream.get_data_nowait()


async def test_send_now_on_a_closed_connection_is_broken_resource() -> None:
    client, server = await _tcp_pair()
    async with client:
        await server.aclose()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the first write may still be taken; the peer's RST breaks a later one
                send_now(client, b"x" * 4096)
                await trio.sleep(0.01)


# -- a barrier that ends a run on its own path --------------------------------------------------


@pytest.fixture
def replica(tmp_path: Path):
    rep = Replica.open(tmp_path, "v")
    rep.check_peer(VID, 1)
    rep.apply_record(Record(1, T, CreateOp(b"f", 0o644, os.getuid(), os.getgid(), T)))
    yield rep
    rep.close()


def test_a_commit_barrier_needs_no_second_walk(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    walks: list[bytes] = []
    real = scan.lstat
    monkeypatch.setattr(scan, "lstat", lambda fd, path: walks.append(path) or real(fd, path))
    replayer._apply_all(replica, [Record(2, T, WriteOp(b"f", 0, b"commit", T + 2)), Record(3, T, FsyncOp(b"f"))])
    assert walks == [] and replica.durable_seq == 3
    assert (replica.replica_dir / "f").read_bytes() == b"commit"
    assert os.stat(replica.replica_dir / "f").st_mtime_ns == T + 2
    # Not ending a run (nothing written since): the path is checked as before.
    replayer._apply_all(replica, [Record(4, T, FsyncOp(b"f"))])
    assert walks == [b"f"] and replica.durable_seq == 4


def test_a_barrier_after_a_run_on_another_path_is_still_checked(replica: Replica) -> None:
    with pytest.raises(OpError, match="cannot apply seq 3"):
        replayer._apply_all(replica, [Record(2, T, WriteOp(b"f", 0, b"x", T)), Record(3, T, FsyncOp(b"missing"))])
    assert replica.needs_resync is not None
