"""`octofs serve` as a real process: ready file, status, clean stop, and exactly once across SIGKILLs.

The primary is a test-side fake (blocking sockets, protocol.encode), so these tests
need neither FUSE nor a journal.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from octofs import apply, codec, control, protocol
from octofs.ops import CreateOp, FsyncOp, LinkOp, Record, RenameOp, WriteOp
from octofs.replica import control_socket_path
from tests.support.daemons import Serve, run_octofs, serving
from tests.support.trees import tree_snapshot

SECRET = b"s3cret"
VID = bytes(range(16))
T = 1_700_000_000_000_000_000


def workload(cycles: int) -> list[Record]:
    """Ops that are *not* harmless twice: each rename of ``t`` fails if re-applied."""
    uid, gid = os.getuid(), os.getgid()
    ops = []
    for i in range(cycles):
        ops += [CreateOp(b"t", 0o644, uid, gid, T + i), WriteOp(b"t", 0, b"generation %d\n" % i, T + i),
                RenameOp(b"t", b"cur")]
        if i % 3 == 0:
            ops.append(LinkOp(b"cur", b"snap%d" % i))
        if i % 10 == 0:
            ops.append(FsyncOp(b"cur"))
    return [Record(seq, T + seq, op) for seq, op in enumerate(ops, 1)]


def expected_tree(recs: list[Record], dest: Path) -> dict:
    dest.mkdir()
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for r in recs:
            apply.apply_op(fd, r.op)
    finally:
        os.close(fd)
    return tree_snapshot(dest)


class SyncPrimary:
    """A blocking fake primary."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.decoder = protocol.FrameDecoder(peer="target")

    def recv(self) -> protocol.Message | None:
        while (msg := self.decoder.next_message()) is None:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)
        return msg

    def handshake(self) -> protocol.Welcome:
        nonce = protocol.new_nonce()
        self.sock.sendall(protocol.encode(protocol.Hello((1,), "v", VID, 1, nonce, 15.0)))
        ch = self.recv()
        assert isinstance(ch, protocol.Challenge), ch
        assert ch.proof == protocol.target_proof(SECRET, nonce, ch.nonce, VID)
        self.sock.sendall(protocol.encode(protocol.Auth(protocol.primary_proof(SECRET, nonce, ch.nonce, VID))))
        welcome = self.recv()
        assert isinstance(welcome, protocol.Welcome), welcome
        return welcome

    def send_batch(self, recs: list[Record]) -> None:
        self.sock.sendall(protocol.encode(protocol.OpBatch(tuple(codec.encode_record(r) for r in recs))))

    def wait_ack(self, seq: int) -> None:
        while True:
            msg = self.recv()
            assert isinstance(msg, protocol.Ack), msg
            if msg.seq >= seq:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    with serving(tmp_path / "r", secret, workdir=tmp_path, start=False) as s:
        yield s


def position(root: Path) -> tuple[int, int]:
    return struct.unpack("<QQ", (root / ".octofs/vaults/v/position").read_bytes())


def test_sigkill_mid_stream_applies_every_op_exactly_once(serve: Serve, tmp_path: Path) -> None:
    recs = workload(600)
    n = len(recs)
    batches = [recs[i:i + 40] for i in range(0, n, 40)]
    kills = [len(batches) // 3, 2 * len(batches) // 3]
    resumed_at = []
    serve.start()
    next_batch = 0
    while True:
        p = SyncPrimary(serve.address)
        acked = p.handshake().acked_seq
        resumed_at.append(acked)
        # Resend from a little before the acked seq: the target must skip what it has.
        next_batch = max(0, min(next_batch, acked // 40) - 1)
        kill_at = kills.pop(0) if kills else None
        while next_batch < len(batches):
            p.send_batch(batches[next_batch])
            next_batch += 1
            if next_batch == kill_at:
                p.wait_ack(batches[next_batch - 4][-1].seq)  # it is well under way ...
                break
        if kill_at is None:
            p.wait_ack(n)
            p.close()
            break
        serve.kill()  # ... and still applying what was just sent
        p.close()
        serve.start()
    st = control.request(control_socket_path(serve.root), "status")
    [v] = st["vaults"]
    assert (v["applied_seq"], v["durable_seq"], v["needs_resync"]) == (n, n, None), serve.log()
    assert serve.stop() == 0, serve.log()
    assert len(resumed_at) == 3 and resumed_at[0] == 0
    assert all(0 < a < n for a in resumed_at[1:]), (resumed_at, n)  # the kills really came mid-stream
    assert tree_snapshot(serve.root / "v") == expected_tree(recs, tmp_path / "expected")
    assert position(serve.root) == (n, n)
    assert "needs a resync" not in serve.log()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_makes_everything_durable(serve: Serve, signum: int) -> None:
    serve.start()
    p = SyncPrimary(serve.address)
    assert p.handshake().acked_seq == 0
    recs = workload(5)
    p.send_batch(recs)
    p.wait_ack(len(recs))
    p.close()
    assert serve.stop(signum) == 0
    assert position(serve.root) == (len(recs), len(recs))
    assert not control_socket_path(serve.root).exists()
    log = serve.log()
    assert f"received {signal.Signals(signum).name}" in log and "Traceback" not in log


# A non-root target (owners not reproduced) is tested in-process in
# tests/unit/test_replayer.py with geteuid faked: an unprivileged subprocess cannot
# run this machine's interpreter (it lives under /root, mode 0700).


def test_second_serve_on_the_same_root_refused(serve: Serve) -> None:
    serve.start()
    res = run_octofs("serve", "--root", str(serve.root), "--listen", "127.0.0.1:0",
                     "--secret-file", str(serve.secret_file), timeout=60)
    assert res.returncode == 52, res.stderr
    assert res.stderr.startswith("octofs: error: Another octofs serve is using root")
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("secret,code,phrase", [
    (None, 2, "no shared secret"),
    (b"\n", 11, "is empty"),
])
def test_secret_problems_are_one_line(tmp_path: Path, secret, code, phrase) -> None:
    (tmp_path / "r").mkdir()
    args = ["serve", "--root", str(tmp_path / "r"), "--listen", "127.0.0.1:0"]
    if secret is not None:
        (tmp_path / "secret").write_bytes(secret)
        args += ["--secret-file", str(tmp_path / "secret")]
    res = run_octofs(*args, timeout=60)
    assert res.returncode == code, res.stderr
    assert res.stderr.count("\n") == 1 and phrase in res.stderr


# -- the real shipper against the real replayer (in-process) -------------------------------


async def _ship(tmp_path: Path, *, restart_target: bool) -> None:
    """The contract between shipper.py and replayer.py: handshake, acks, and (optionally) a reconnect."""
    import trio

    from octofs.journal import JournalWriter
    from octofs.recorder import Recorder
    from octofs.replayer import serve_target
    from octofs.shipper import Forwarding, Shipper

    root = tmp_path / "r"
    root.mkdir()
    writer = JournalWriter.open(tmp_path / "journal", vault_id=VID, epoch=1)
    recorder = Recorder(writer)
    recs = workload(40)
    half = len(recs) // 2
    port = 0
    target_scope = trio.CancelScope()

    async def run_target(task_status=trio.TASK_STATUS_IGNORED):
        with target_scope:
            await serve_target(root, "127.0.0.1", port, SECRET, task_status=task_status)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                _, port = await nursery.start(run_target)
                shipper = Shipper(name="t1", host="127.0.0.1", port=port, mode="async", vault="v", vault_id=VID,
                                  epoch=1, secret=SECRET, heartbeat_s=0.5, journal_dir=tmp_path / "journal",
                                  recorder=recorder, forwarding=Forwarding(True))
                nursery.start_soon(shipper.run)
                for r in recs[:half]:
                    recorder.record(r.op)
                await shipper.wait_acked(half)
                if restart_target:
                    target_scope.cancel()  # the target goes away ...
                    await trio.sleep(0.2)
                for r in recs[half:]:
                    recorder.record(r.op)
                if restart_target:
                    target_scope = trio.CancelScope()
                    await nursery.start(run_target)  # ... and comes back on the same port
                await shipper.wait_acked(len(recs))
                assert shipper.statistics().owners == (os.geteuid() == 0)
                await trio.sleep(1.2)  # a couple of heartbeats, each answered with an ack
                assert shipper.statistics().state == "connected" and shipper.last_error is None
                nursery.cancel_scope.cancel()
    finally:
        writer.close()
    assert tree_snapshot(root / "v") == expected_tree(recs, tmp_path / "expected")


async def test_real_shipper_streams_to_target(tmp_path: Path) -> None:
    await _ship(tmp_path, restart_target=False)


async def test_real_shipper_resumes_after_target_restart(tmp_path: Path) -> None:
    await _ship(tmp_path, restart_target=True)
