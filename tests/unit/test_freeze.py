"""Freezing a vault on the target (freeze.py) against a fake primary over real TCP: ops are held at a batch
boundary while heartbeats are still answered, a thaw applies what was held in order, refusals are clear, and
a freeze that outlives its maximum duration thaws by itself.

The end-to-end tests (real mounts, SQLite, PostgreSQL, `octofs snapshot`) are in
tests/integration/test_freeze.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from octofs import codec, control, freeze, protocol
from octofs.ops import CreateOp, Record, WriteOp
from octofs.replayer import TargetServer, serve_target
from octofs.replica import control_socket_path
from tests.support.trees import tree_snapshot

SECRET = b"correct horse battery staple"
VID = bytes(range(16))
T = 1_700_000_000_000_000_000
UID, GID = os.getuid(), os.getgid()


def file_ops(start: int, n: int, name: bytes = b"f") -> list[Record]:
    recs = [Record(start, T + start, CreateOp(name, 0o644, UID, GID, T))]
    for i in range(1, n):
        recs.append(Record(start + i, T + start + i, WriteOp(name, 8 * (i - 1), b"line %03d" % i, T)))
    return recs


class Primary:
    """Just enough of a primary: handshake, op batches, heartbeats, acks."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = protocol.FrameDecoder(peer="target")

    async def send(self, msg: protocol.Message) -> None:
        await self.stream.send_all(protocol.encode(msg))

    async def recv(self) -> protocol.Message:
        while (msg := self.decoder.next_message()) is None:
            data = await self.stream.receive_some(65536)
            assert data, "the target closed the connection"
            self.decoder.feed(data)
        return msg

    async def handshake(self, vault: str = "v") -> protocol.Welcome:
        nonce = protocol.new_nonce()
        await self.send(protocol.Hello(protocol.SUPPORTED_VERSIONS, vault, VID, 1, nonce, 15.0))
        challenge = await self.recv()
        assert isinstance(challenge, protocol.Challenge), challenge
        await self.send(protocol.Auth(protocol.primary_proof(SECRET, nonce, challenge.nonce, VID)))
        welcome = await self.recv()
        assert isinstance(welcome, protocol.Welcome), welcome
        return welcome

    async def send_records(self, recs: list[Record]) -> None:
        await self.send(protocol.OpBatch(tuple(codec.encode_record(r) for r in recs)))

    async def wait_ack(self, seq: int) -> int:
        while True:
            msg = await self.recv()
            assert isinstance(msg, protocol.Ack), msg
            if msg.seq >= seq:
                return msg.seq

    async def heartbeat_ack(self, last_seq: int) -> int:
        """Send a heartbeat; the seq of the Ack that answers it."""
        await self.send(protocol.Heartbeat(0, last_seq))
        msg = await self.recv()
        assert isinstance(msg, protocol.Ack), msg
        return msg.seq


@pytest.fixture
async def server(nursery, tmp_path: Path):
    root = tmp_path / "r"
    root.mkdir()
    got: list[TargetServer] = []

    async def keep(s: TargetServer) -> None:
        got.append(s)

    await nursery.start(lambda task_status: serve_target(root, "127.0.0.1", 0, SECRET, with_server=keep,
                                                         task_status=task_status))
    await trio.testing.wait_all_tasks_blocked()
    server = got[0]
    server.address = tuple(server.listen.rsplit(":", 1))  # type: ignore[attr-defined]
    yield server
    while _OPEN:
        await _OPEN.pop().aclose()


_OPEN: list[trio.abc.Stream] = []


async def connect(server: TargetServer) -> tuple[Primary, protocol.Welcome]:
    host, port = server.address  # type: ignore[attr-defined]
    p = Primary(await trio.open_tcp_stream(host, int(port)))
    _OPEN.append(p.stream)
    return p, await p.handshake()


async def ctl(server: TargetServer, cmd: str, **fields) -> dict:
    return await trio.to_thread.run_sync(lambda: control.request(control_socket_path(server.root), cmd, **fields))


async def vault_status(server: TargetServer, vault: str = "v") -> dict:
    [v] = [v for v in (await ctl(server, "status"))["vaults"] if v["vault"] == vault]
    return v


async def test_frozen_holds_ops_answers_heartbeats_and_thaw_applies_them(server: TargetServer) -> None:
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 5))
        assert await p.wait_ack(5) == 5
        reply = await ctl(server, "freeze", vault="v", max_s=60)
        assert reply["ok"] and reply["seq"] == 5 and reply["primary_time_ns"] == T + 5, reply
        assert reply["replica_dir"] == str(server.root / "v")
        before = tree_snapshot(server.root / "v")
        more = file_ops(6, 1, b"g") + [Record(7 + i, T + 7 + i, WriteOp(b"g", 8 * i, b"more %03d" % i, T))
                                      for i in range(4)]
        await p.send_records(more[:2])
        await p.send_records(more[2:])
        assert await p.heartbeat_ack(10) == 5  # heard, answered, and nothing more is durable
        v = await vault_status(server)
        fz = v["frozen"]
        assert (v["applied_seq"], fz["seq"], fz["held_frames"], fz["backlog_ops"], fz["reading"]) == (5, 5, 2, 5, True)
        assert fz["held_bytes"] == sum(len(codec.encode_record(r)) for r in more)
        assert tree_snapshot(server.root / "v") == before  # nothing of it reached the replica dir

        # A second freeze is refused while one is in force; a thaw naming another freeze changes nothing.
        again = await ctl(server, "freeze", vault="v", max_s=60)
        assert not again["ok"] and "already frozen" in again["error"], again
        other = await ctl(server, "thaw", vault="v", id="0" * 16)
        assert other["status"] == "not_this_freeze"

        thawed = await ctl(server, "thaw", vault="v", id=reply["id"])
        assert thawed["status"] == "thawed" and thawed["last_freeze"]["how"] == "thawed"
        assert await p.wait_ack(10) == 10  # held frames applied, in order, without new input
        assert (server.root / "v/g").read_bytes() == b"".join(b"more %03d" % i for i in range(4))
        v = await vault_status(server)
        assert v["frozen"] is None and v["last_freeze"]["seq"] == 5
        assert (await ctl(server, "thaw", vault="v"))["status"] == "already_thawed"


async def test_freeze_without_a_connection_and_primary_time_after_reconnect(server: TargetServer) -> None:
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 3))
        assert await p.wait_ack(3) == 3
        await p.stream.aclose()
        while (await vault_status(server))["connected"]:
            await trio.sleep(0.01)
        reply = await ctl(server, "freeze", vault="v", max_s=60)
        # The time of seq 3 comes from ROOT/.octofs/vaults/v/applied_time, written after the batch.
        assert reply["ok"] and reply["seq"] == 3 and reply["primary_time_ns"] == T + 3, reply
        p, welcome = await connect(server)  # a primary reconnecting while frozen
        assert welcome.acked_seq == 3
        await p.send_records(file_ops(4, 2, b"h"))
        assert await p.heartbeat_ack(5) == 3
        assert not (server.root / "v/h").exists()
        assert (await ctl(server, "thaw", vault="v"))["status"] == "thawed"
        assert await p.wait_ack(5) == 5
        assert (server.root / "v/h").is_file()


async def test_refusals(server: TargetServer) -> None:
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 2))
        await p.wait_ack(2)
        unknown = await ctl(server, "freeze", vault="nope", max_s=60)
        assert not unknown["ok"] and unknown["error"] == "vault nope is not received here (vaults: v)"
        bad = await ctl(server, "freeze", vault="v", max_s=-1)
        assert not bad["ok"] and "maximum duration" in bad["error"]
        replica = server.replica("v")
        assert replica is not None
        replica.sync = {"id": "00", "cursor": "", "seq": 2}  # as while a Synchronize is under way
        try:
            r = await ctl(server, "freeze", vault="v", max_s=60)
        finally:
            replica.sync = None
        assert not r["ok"] and "a Synchronize is under way" in r["error"], r
        replica.needs_resync = "a test says so"
        try:
            r = await ctl(server, "freeze", vault="v", max_s=60)
        finally:
            replica.needs_resync = None
        assert not r["ok"] and "needs a resync: a test says so" in r["error"], r
        assert (await vault_status(server))["frozen"] is None
        # Refused freezes hold nothing: the stream goes on.
        await p.send_records(file_ops(3, 2, b"k"))
        assert await p.wait_ack(4) == 4


async def test_a_freeze_thaws_by_itself_after_its_maximum_duration(server: TargetServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="octofs.freeze")
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 2))
        await p.wait_ack(2)
        reply = await ctl(server, "freeze", vault="v", max_s=0.5)
        await p.send_records(file_ops(3, 2, b"late"))
        assert (await vault_status(server))["frozen"]["seq"] == 2
        assert await p.wait_ack(4) == 4  # applied once the freeze has expired; no thaw was sent
        v = await vault_status(server)
        assert v["frozen"] is None
        last = v["last_freeze"]
        assert (last["id"], last["how"], last["seq"]) == (reply["id"], "expired", 2)
        assert last["duration_s"] >= 0.5
        assert (await ctl(server, "thaw", vault="v", id=reply["id"]))["status"] == "already_thawed"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "octofs.freeze"]
    assert len(warnings) == 1 and "outlived its maximum duration of 0.5 s" in warnings[0].getMessage()


async def test_held_frames_over_the_budget_stop_reading(server: TargetServer,
                                                                          monkeypatch) -> None:
    monkeypatch.setattr(freeze, "HOLD_BYTES", 200)
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 2))
        await p.wait_ack(2)
        await ctl(server, "freeze", vault="v", max_s=60)
        await p.send_records(file_ops(3, 30, b"big"))  # more than 200 bytes of records: held, then no more reading
        while (await vault_status(server))["frozen"]["reading"]:
            await trio.sleep(0.01)
        await p.send_records(file_ops(33, 2, b"after"))  # waits in the socket
        v = await vault_status(server)
        assert v["frozen"]["held_frames"] == 1 and v["applied_seq"] == 2
        await ctl(server, "thaw", vault="v")
        assert await p.wait_ack(34) == 34
        assert (server.root / "v/after").is_file()


async def test_a_heartbeat_right_behind_a_batch_acks_that_batch(server: TargetServer) -> None:
    """After a thaw the held batches and a heartbeat often arrive together: the batch's make-durable is
    put off (more input is waiting), and the heartbeat's Ack must still cover it."""
    with trio.fail_after(10):
        p, _ = await connect(server)
        batch = protocol.encode(protocol.OpBatch(tuple(codec.encode_record(r) for r in file_ops(1, 3))))
        await p.stream.send_all(batch + protocol.encode(protocol.Heartbeat(0, 3)))  # one segment
        assert await p.wait_ack(3) == 3


async def test_a_synchronize_starting_while_frozen_waits_for_the_thaw(server: TargetServer) -> None:
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 2))
        await p.wait_ack(2)
        await ctl(server, "freeze", vault="v", max_s=60)
        await p.send(protocol.SyncBegin(b"\x01" * 16, 0, False))
        await p.send_records(file_ops(3, 1, b"k"))
        assert await p.heartbeat_ack(3) == 2
        v = await vault_status(server)
        assert v["sync"] is None and v["consistent"] is True and v["frozen"]["held_frames"] == 2
        await ctl(server, "thaw", vault="v")
        assert await p.wait_ack(3) == 3
        v = await vault_status(server)
        assert v["sync"]["id"] == "01" * 16 and v["consistent"] is False  # begun after the thaw, in order
        refused = await ctl(server, "freeze", vault="v", max_s=60)
        assert not refused["ok"] and "a Synchronize is under way" in refused["error"]


async def test_a_takeover_ends_the_freeze_and_drops_what_was_held(server: TargetServer) -> None:
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 2))
        await p.wait_ack(2)
        reply = await ctl(server, "freeze", vault="v", max_s=60)
        await p.send_records(file_ops(3, 2, b"late"))
        assert await p.heartbeat_ack(4) == 2
        replica, epoch = await server.release("v", "a test takes over")
        assert (replica.applied_seq, epoch) == (2, 2)
        assert not (server.root / "v/late").exists()  # held, never applied: the new primary's copy is seq 2
        v = await vault_status(server)
        assert v["frozen"] is None and (v["last_freeze"]["id"], v["last_freeze"]["how"]) == (reply["id"], "taken over")
        again = await ctl(server, "freeze", vault="v", max_s=60)
        assert not again["ok"] and "taken over here" in again["error"], again


async def test_the_primary_time_of_a_batch_comes_from_the_replayer_not_a_second_decode(
        server: TargetServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replayer hands the gate its last applied record's (seq, time): no record is decoded twice
    per batch (docs/PERFORMANCE.md), and a freeze still names the primary's time of its seq."""

    class NoDecode:
        @staticmethod
        def decode_record(payload: bytes):
            raise AssertionError("the freeze gate decoded a record the replayer had decoded")

    monkeypatch.setattr(freeze, "codec", NoDecode)
    with trio.fail_after(20):
        p, _ = await connect(server)
        await p.send_records(file_ops(1, 3))
        assert await p.wait_ack(3) == 3
        assert await p.heartbeat_ack(3) == 3  # the gate has been through the batch's end
        reply = await ctl(server, "freeze", vault="v", max_s=60)
        assert reply["ok"] and reply["seq"] == 3 and reply["primary_time_ns"] == T + 3, reply
        assert (await ctl(server, "thaw", vault="v"))["status"] == "thawed"
