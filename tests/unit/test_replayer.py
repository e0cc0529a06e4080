"""The replayer against a fake primary: handshake, auth, resume, acks, and hostile input refused.

The server runs in-process (``serve_target`` on 127.0.0.1:0, real sockets); the fake
primary speaks the wire protocol with ``protocol.encode``, so a test can send
anything, including frames a real shipper never would.
"""

from __future__ import annotations

import logging
import os
import random
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from octofs import codec, control, protocol
from octofs.errors import DaemonRunningError, ProtocolError
from octofs.ops import CreateOp, FsyncOp, MkdirOp, Record, SymlinkOp, UnlinkOp, WriteOp
from octofs.replayer import HANDSHAKE_TIMEOUT_S, TargetServer, serve_target
from octofs.replica import control_socket_path
from tests.support.trees import tree_snapshot

SECRET = b"correct horse battery staple"
VID = bytes(range(16))
T = 1_700_000_000_000_000_000
UID, GID = os.getuid(), os.getgid()


def rec(seq: int, op) -> Record:
    return Record(seq, T + seq, op)


def file_ops(start: int, n: int, name: bytes = b"f") -> list[Record]:
    """Create ``name`` then append one line per op."""
    recs = [rec(start, CreateOp(name, 0o644, UID, GID, T))]
    for i in range(1, n):
        recs.append(rec(start + i, WriteOp(name, 8 * (i - 1), b"line %03d" % i, T)))
    return recs


class FakePrimary:
    """A test-side primary: the handshake and framing of protocol.py, nothing else."""

    def __init__(self, stream: trio.abc.Stream, *, vault: str = "v", vault_id: bytes = VID, epoch: int = 1,
                 secret: bytes = SECRET, versions: tuple[int, ...] = protocol.SUPPORTED_VERSIONS) -> None:
        self.stream = stream
        self.vault, self.vault_id, self.epoch, self.secret, self.versions = vault, vault_id, epoch, secret, versions
        self.decoder = protocol.FrameDecoder(peer="target")

    @classmethod
    async def connect(cls, addr: tuple[str, int], **kw) -> FakePrimary:
        p = cls(await trio.open_tcp_stream(*addr), **kw)
        _OPEN.append(p)
        return p

    async def send(self, msg: protocol.Message) -> None:
        await self.send_raw(protocol.encode(msg))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> protocol.Message | None:
        """The next message, or None once the target has closed the connection."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.decoder.feed(data)

    async def hello(self) -> protocol.Message | None:
        self.nonce = protocol.new_nonce()
        await self.send(protocol.Hello(self.versions, self.vault, self.vault_id, self.epoch, self.nonce, 15.0))
        return await self.recv()

    async def handshake(self) -> protocol.Message | None:
        """Hello, Challenge, Auth; returns the target's answer (Welcome or Error)."""
        challenge = await self.hello()
        assert isinstance(challenge, protocol.Challenge), challenge
        if self.secret == SECRET:
            assert challenge.proof == protocol.target_proof(SECRET, self.nonce, challenge.nonce, self.vault_id)
        await self.send(protocol.Auth(protocol.primary_proof(self.secret, self.nonce, challenge.nonce,
                                                             self.vault_id)))
        return await self.recv()

    async def send_records(self, recs: list[Record]) -> None:
        await self.send(protocol.OpBatch(tuple(codec.encode_record(r) for r in recs)))

    async def wait_ack(self, seq: int) -> int:
        while True:
            msg = await self.recv()
            assert isinstance(msg, protocol.Ack), msg
            if msg.seq >= seq:
                return msg.seq

    async def until_closed(self) -> list[protocol.Message]:
        """Everything the target sends until it closes the connection."""
        out = []
        while (msg := await self.recv()) is not None:
            out.append(msg)
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


_OPEN: list[FakePrimary] = []


@pytest.fixture
async def _close_primaries():
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "r"
    r.mkdir()
    return r


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory beside the root that no peer may ever change."""
    s = tmp_path / "sentinel"
    s.mkdir()
    (s / "keep").write_bytes(b"precious")
    return s


@pytest.fixture
async def target(nursery, root: Path, _close_primaries) -> tuple[str, int]:
    return await nursery.start(serve_target, root, "127.0.0.1", 0, SECRET)


async def status(root: Path) -> dict:
    return await trio.to_thread.run_sync(control.request, control_socket_path(root), "status")


async def connect_ok(target, **kw) -> tuple[FakePrimary, protocol.Welcome]:
    p = await FakePrimary.connect(target, **kw)
    welcome = await p.handshake()
    assert isinstance(welcome, protocol.Welcome), welcome
    return p, welcome


async def good_connection_still_served(target, root: Path) -> None:
    p, welcome = await connect_ok(target, vault="good", vault_id=bytes(16))
    await p.send_records(file_ops(welcome.acked_seq + 1, 3, b"ok"))
    assert await p.wait_ack(welcome.acked_seq + 3) >= welcome.acked_seq + 3
    await p.aclose()
    assert (root / "good/ok").is_file()


# -- the happy path ---------------------------------------------------------------------


async def test_handshake_apply_ack_and_status(target, root: Path) -> None:
    with trio.fail_after(20):
        p, welcome = await connect_ok(target, epoch=2)
        assert (welcome.acked_seq, welcome.epoch, welcome.owners) == (0, 2, os.geteuid() == 0)
        await p.send_records(file_ops(1, 5))
        assert await p.wait_ack(5) == 5
        assert (root / "v/f").read_bytes() == b"".join(b"line %03d" % i for i in range(1, 5))
        await p.send(protocol.Heartbeat(0, 5))
        assert await p.wait_ack(5) == 5
        st_ = await status(root)
        assert st_["role"] == "target" and st_["listen"] == f"127.0.0.1:{target[1]}"
        [v] = st_["vaults"]
        assert v["vault"] == "v" and v["vault_id"] == VID.hex() and v["epoch"] == 2
        assert (v["applied_seq"], v["durable_seq"], v["connected"], v["needs_resync"]) == (5, 5, True, None)
        assert v["peer"].startswith("127.0.0.1:") and 0 <= v["last_heartbeat_age_s"] < 10
        await p.aclose()
        while (v := (await status(root))["vaults"][0])["connected"]:  # until the target has seen the close
            await trio.sleep(0.01)
        assert v["connected"] is False and v["peer"] is None


async def test_reconnect_resumes_and_skips_duplicates(target, root: Path) -> None:
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        await p.send_records(file_ops(1, 5))
        await p.wait_ack(5)
        await p.aclose()
        p, welcome = await connect_ok(target)
        assert welcome.acked_seq == 5
        # A primary that resends from an older seq: 3..5 are skipped, 6..7 applied.
        recs = file_ops(1, 7)
        await p.send_records(recs[2:])
        assert await p.wait_ack(7) == 7
        assert (root / "v/f").read_bytes() == b"".join(b"line %03d" % i for i in range(1, 7))


async def test_barrier_is_acked_as_durable(target, root: Path) -> None:
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        await p.send_records([*file_ops(1, 3), rec(4, FsyncOp(b"f"))])
        assert await p.wait_ack(4) == 4
        # durable 4; "touched" stays unknown (a busy barrier) until the replica settles
        assert struct.unpack("<QQ", (root / ".octofs/vaults/v/position").read_bytes())[0] == 4


async def test_a_heartbeat_settles_an_idle_replica(target, root: Path) -> None:
    """After a barrier the position says "touched: unknown" (cheap for the next op); once the stream is
    quiet, the next heartbeat writes the exact position, so a power cut then costs nothing."""
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        await p.send_records([*file_ops(1, 3), rec(4, FsyncOp(b"f"))])
        assert await p.wait_ack(4) == 4
        await p.send(protocol.Heartbeat(T, 4))
        assert await p.wait_ack(4) == 4
        assert struct.unpack("<QQ", (root / ".octofs/vaults/v/position").read_bytes()) == (4, 4)


async def test_newer_connection_supersedes_older(target, root: Path) -> None:
    with trio.fail_after(20):
        old, _ = await connect_ok(target)
        await old.send_records(file_ops(1, 2))
        await old.wait_ack(2)
        new, welcome = await connect_ok(target)
        assert welcome.acked_seq == 2
        msgs = await old.until_closed()
        assert isinstance(msgs[-1], protocol.Error) and msgs[-1].code == "busy"
        await new.send_records(file_ops(1, 4)[2:])
        assert await new.wait_ack(4) == 4


async def test_status_lists_vaults_on_disk(nursery, root: Path) -> None:
    (root / ".octofs/vaults/old").mkdir(parents=True)
    await nursery.start(serve_target, root, "127.0.0.1", 0, SECRET)
    vaults = (await status(root))["vaults"]
    assert [(v["vault"], v["connected"], v["applied_seq"]) for v in vaults] == [("old", False, 0)]


async def test_one_serve_per_root(target, root: Path) -> None:
    with pytest.raises(DaemonRunningError, match="Another octofs serve"):
        await serve_target(root, "127.0.0.1", 0, SECRET)  # fails before it would start serving


async def test_non_root_target_does_not_reproduce_owners(nursery, root: Path, monkeypatch, caplog,
                                                          _close_primaries) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    addr = await nursery.start(serve_target, root, "127.0.0.1", 0, SECRET)
    with trio.fail_after(20):
        p, welcome = await connect_ok(addr)
        assert welcome.owners is False
        await p.send_records([rec(1, CreateOp(b"f", 0o640, 4242, 4343, T))])
        await p.wait_ack(1)
        assert (await status(root))["owners"] is False
    st_ = (root / "v/f").stat()
    assert (st_.st_uid, st_.st_gid, st_.st_mode & 0o7777) == (UID, GID, 0o640)  # all but the owner
    assert sum("owners are not reproduced" in r.getMessage() for r in caplog.records) == 1


# -- refusals -----------------------------------------------------------------------------


async def test_wrong_secret_refused_before_any_op(target, root: Path, caplog) -> None:
    with trio.fail_after(20):
        p = await FakePrimary.connect(target, secret=b"wrong")
        answer = await p.handshake()
        assert isinstance(answer, protocol.Error) and answer.code == "auth"
        # Nothing of the vault exists: the replica is never opened before auth.
        assert not (root / "v").exists() and not (root / ".octofs/vaults/v").exists()
        with pytest.raises(trio.BrokenResourceError):  # closed: ops are never read
            for _ in range(50):
                await p.send_records(file_ops(1, 2))
                await trio.sleep(0.01)
        assert not (root / "v").exists()
    assert any(r.levelno == logging.WARNING and "authentication failed" in r.getMessage()
               and "127.0.0.1:" in r.getMessage() for r in caplog.records)


async def test_version_mismatch_refused_naming_both(target, root: Path) -> None:
    with trio.fail_after(20):
        p = await FakePrimary.connect(target, versions=(7, 8))
        answer = await p.hello()
        assert isinstance(answer, protocol.Error) and answer.code == "version"
        assert "[7, 8]" in answer.message and "[1]" in answer.message


async def test_other_vault_id_refused_loudly(target, root: Path, caplog) -> None:
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        await p.aclose()
        intruder = bytes(range(100, 116))
        p = await FakePrimary.connect(target, vault_id=intruder)
        answer = await p.handshake()
        assert isinstance(answer, protocol.Error) and answer.code == "vault_id"
        assert VID.hex() in answer.message and intruder.hex() in answer.message
    assert any(r.levelno == logging.ERROR and intruder.hex() in r.getMessage() for r in caplog.records)


async def test_intruder_does_not_displace_the_live_connection(target, root: Path) -> None:
    with trio.fail_after(20):
        good, _ = await connect_ok(target)
        bad = await FakePrimary.connect(target, vault_id=bytes(range(100, 116)))
        assert (await bad.handshake()).code == "vault_id"
        await good.send_records(file_ops(1, 2))
        assert await good.wait_ack(2) == 2


async def test_stale_epoch_refused(target, root: Path) -> None:
    with trio.fail_after(20):
        p, _ = await connect_ok(target, epoch=3)
        await p.aclose()
        p = await FakePrimary.connect(target, epoch=2)
        answer = await p.handshake()
        assert isinstance(answer, protocol.Error) and answer.code == "epoch"


async def test_vault_needing_resync_refused(target, root: Path) -> None:
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        await p.send_records([rec(1, UnlinkOp(b"missing"))])
        msgs = await p.until_closed()
        assert msgs[-1].code == "apply" and "unlink missing" in msgs[-1].message
        # Still served, so that the primary can answer with a Synchronize; the Welcome says why.
        p = await FakePrimary.connect(target)
        answer = await p.handshake()
        assert isinstance(answer, protocol.Welcome) and "unlink missing" in answer.needs_resync
        assert (await status(root))["vaults"][0]["needs_resync"]
        assert (await status(root))["vaults"][0]["consistent"] is False
        # ... but no op is applied until a Synchronize resets the vault.
        await p.send_records([rec(2, UnlinkOp(b"other"))])
        msgs = await p.until_closed()
        assert msgs[-1].code == "apply" and "needs a resync" in msgs[-1].message


def _payload(**fields) -> bytes:
    return codec.packb({"s": 1, "w": T, **fields})


def _frame(body: dict) -> bytes:
    payload = codec.packb(body)
    return struct.pack("<I", len(payload)) + payload


_RNG = random.Random(20231114)

# name -> (bytes to send after a successful handshake, expected Error code or None when the
# connection just ends, a phrase of the logged reason)
HOSTILE_AFTER_AUTH = {
    "absolute path": (_frame({"t": "ops", "records": [_payload(t=1, p=b"/etc/evil", m=0o644, u=0, g=0, mt=0)]}),
                      "protocol", "absolute path"),
    "dotdot": (_frame({"t": "ops", "records": [_payload(t=9, p=b"../sentinel/keep", o=0, d=b"x", mt=0)]}),
               "protocol", "'..'"),
    "dotdot inside": (_frame({"t": "ops", "records": [_payload(t=1, p=b"a/../../x", m=0o644, u=0, g=0, mt=0)]}),
                      "protocol", "'..'"),
    "nul": (_frame({"t": "ops", "records": [_payload(t=1, p=b"a\0b", m=0o644, u=0, g=0, mt=0)]}),
            "protocol", "NUL"),
    "unknown op": (_frame({"t": "ops", "records": [_payload(t=99, p=b"x")]}), "protocol", "unknown op type"),
    "not msgpack record": (_frame({"t": "ops", "records": [b"\xc1\xc1"]}), "protocol", "record 0"),
    "oversized length": (struct.pack("<I", 2**31) + b"xx", "protocol", "exceeds the limit"),
    "unknown message": (_frame({"t": "zzz"}), "protocol", "unknown message type"),
    "missing field": (_frame({"t": "ops"}), "protocol", "missing field"),
    "second hello": (protocol.encode(protocol.Hello((1,), "v", VID, 1, bytes(32), 15.0)), "protocol",
                     "unexpected hello"),
    "not a map": (struct.pack("<I", 1) + b"\x01", "protocol", "not a map"),
    "random bytes": (_RNG.randbytes(64), "protocol", ""),
    "truncated frame": (struct.pack("<I", 100) + b"\x81" * 10, None, "middle of a frame"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_AFTER_AUTH))
async def test_hostile_frames_after_auth(target, root: Path, sentinel: Path, tmp_path: Path, caplog,
                                         case: str) -> None:
    data, code, phrase = HOSTILE_AFTER_AUTH[case]
    before = tree_snapshot(tmp_path / "sentinel")
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        await p.send_records(file_ops(1, 2))
        await p.wait_ack(2)
        replica_before = tree_snapshot(root / "v")
        await p.send_raw(data)
        if code is None:
            await p.stream.send_eof()
        msgs = await p.until_closed()
        if code is not None:
            assert msgs and isinstance(msgs[-1], protocol.Error) and msgs[-1].code == code, msgs
        await trio.sleep(0.05)
        await good_connection_still_served(target, root)
    assert tree_snapshot(root / "v") == replica_before
    assert tree_snapshot(sentinel) == before
    assert sorted(os.listdir(tmp_path)) == ["r", "sentinel"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(phrase in m for m in warnings), warnings


async def test_gap_refused(target, root: Path, caplog) -> None:
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        recs = file_ops(1, 5)
        await p.send_records(recs[:2])
        await p.wait_ack(2)
        await p.send_records(recs[3:])  # seq 4 after 2
        msgs = await p.until_closed()
        assert msgs[-1].code == "protocol" and "gap" in msgs[-1].message
        [v] = (await status(root))["vaults"]
        assert v["applied_seq"] == 2 and v["needs_resync"] is None
        await good_connection_still_served(target, root)


async def test_symlink_in_path_refused_nothing_outside_changes(target, root: Path, sentinel: Path) -> None:
    before = tree_snapshot(sentinel)
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        await p.send_records([
            rec(1, SymlinkOp(b"link", os.fsencode(sentinel), UID, GID, T)),
            rec(2, WriteOp(b"link/keep", 0, b"overwritten", T)),
            rec(3, CreateOp(b"link/new", 0o644, UID, GID, T)),
        ])
        msgs = await p.until_closed()
        assert msgs[-1].code == "apply" and "link/keep" in msgs[-1].message
        await good_connection_still_served(target, root)
    assert tree_snapshot(sentinel) == before
    assert (root / "v/link").is_symlink()


async def test_bad_batch_applies_nothing_of_it(target, root: Path) -> None:
    with trio.fail_after(20):
        p, _ = await connect_ok(target)
        good = [codec.encode_record(r) for r in file_ops(1, 3)]
        bad = _payload(t=1, p=b"/abs", m=0o644, u=0, g=0, mt=0)
        await p.send(protocol.OpBatch((*good, bad)))
        msgs = await p.until_closed()
        assert msgs[-1].code == "protocol"
        assert not (root / "v/f").exists()


HOSTILE_BEFORE_AUTH = {
    "random bytes": _RNG.randbytes(200),
    "ops first": _frame({"t": "ops", "records": [codec.encode_record(rec(1, MkdirOp(b"d", 0o755, 0, 0, T)))]}),
    "huge hello": struct.pack("<I", 1 << 20) + b"\x80" * 100,
    "nan heartbeat": protocol.encode(protocol.Hello((1,), "v", VID, 1, bytes(32), float("nan"))),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BEFORE_AUTH))
async def test_hostile_frames_before_auth(target, root: Path, sentinel: Path, case: str) -> None:
    before = tree_snapshot(sentinel)
    with trio.fail_after(20):
        p = await FakePrimary.connect(target)
        await p.send_raw(HOSTILE_BEFORE_AUTH[case])
        msgs = await p.until_closed()
        assert msgs and isinstance(msgs[-1], protocol.Error) and msgs[-1].code == "protocol", msgs
        await good_connection_still_served(target, root)
    assert sorted(os.listdir(root)) == [".octofs", "good"]
    assert tree_snapshot(sentinel) == before


async def test_bad_vault_name_refused_after_auth(target, root: Path) -> None:
    with trio.fail_after(20):
        p = await FakePrimary.connect(target, vault="../sentinel")
        answer = await p.handshake()
        assert isinstance(answer, protocol.Error) and answer.code == "protocol" and "vault name" in answer.message
    assert os.listdir(root) == [".octofs"]


async def test_handshake_timeout(root: Path, autojump_clock, caplog) -> None:
    server = TargetServer(root, SECRET)
    client, server_end = trio.testing.memory_stream_pair()
    with trio.fail_after(HANDSHAKE_TIMEOUT_S + 5):
        await server.handle(server_end)  # the client never says anything
    assert await client.receive_some(100) == b""
    assert any("no handshake within" in r.getMessage() for r in caplog.records)


async def test_handle_survives_unexpected_errors(root: Path, monkeypatch, caplog) -> None:
    server = TargetServer(root, SECRET)

    async def boom(stream, peer):
        raise RuntimeError("bug")

    monkeypatch.setattr(server, "_session", boom)
    client, server_end = trio.testing.memory_stream_pair()
    await server.handle(server_end)  # logged, answered, not raised
    decoder = protocol.FrameDecoder()
    decoder.feed(await client.receive_some(4096))
    msg = decoder.next_message()
    assert isinstance(msg, protocol.Error) and msg.code == "internal"


# -- FrameDecoder fuzz --------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_frame_decoder_never_crashes(data: bytes, chunk: int) -> None:
    decoder = protocol.FrameDecoder(max_frame_bytes=4096)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i:i + chunk])
            while decoder.next_message() is not None:
                pass
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["t", "records", "seq", "proof", "versions", "vault", "vault_id", "epoch", "nonce", "heartbeat_s",
         "code", "message", "time_ns", "last_seq"]), inner, max_size=6),
    max_leaves=20,
), st.sampled_from(["hello", "challenge", "auth", "welcome", "ops", "ack", "hb", "error", "zzz"]))
def test_frame_decoder_refuses_wrong_shapes_cleanly(body, tag: str) -> None:
    if isinstance(body, dict):
        body = {**body, "t": tag}
    decoder = protocol.FrameDecoder()
    decoder.feed(_frame_any(body))
    try:
        msg = decoder.next_message()
    except ProtocolError:
        return
    assert msg is not None and protocol.decode_payload(codec.packb(body)) == msg


def _frame_any(body) -> bytes:
    payload = codec.packb(body)
    return struct.pack("<I", len(payload)) + payload


async def test_an_op_batch_below_the_targets_epoch_is_refused(target, root: Path) -> None:
    """Fencing per batch: a batch that says it comes from an epoch below the target's is never applied."""
    with trio.fail_after(20):
        p, _ = await connect_ok(target, epoch=2)  # the target now knows epoch 2
        await p.send_records(file_ops(1, 2))
        assert await p.wait_ack(2) == 2
        stale = protocol.OpBatch(tuple(codec.encode_record(r) for r in file_ops(1, 3)[2:]), epoch=1)
        await p.send(stale)
        msgs = await p.until_closed()
        assert msgs[-1].code == "epoch" and "stale" in msgs[-1].message
        assert (await status(root))["vaults"][0]["applied_seq"] == 2  # batch 3 was not applied
