"""shipper.py: owns streaming one vault's journal to one target.

Invariants:
- Records go out in seq order, starting after the seq the target says it has
  durably applied (its Welcome), so a reconnect resumes without loss and the
  target skips nothing and applies nothing twice.
- Only records that are durable in the primary's journal are sent (the shipper
  asks for a group-commit fsync when it has caught up with the durable seq). A
  primary that crashes can therefore never leave a target ahead of its journal.
- Back-pressure goes to disk: at most ``WINDOW_BYTES`` are in flight unacked;
  beyond that the shipper waits, and a target that is behind is served by
  reading further back in the journal, never from memory.
- Forwarding off closes the connection and sends nothing; the ops wait in the
  journal and all go out, in order, when forwarding is turned on again.

Cancellation: ``run`` runs until cancelled; the connection is closed on the way out.
Error handling: a peer that goes away (OSError, trio.BrokenResourceError, EOF)
or a heartbeat timeout → reconnect with exponential backoff (0.1 s … 5 s). A
protocol violation or a refusal (Error frame: auth, vault id, epoch) is logged
at ERROR, kept as ``last_error`` for status, and retried with the maximum backoff,
never silently.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from octofs import codec, protocol
from octofs.errors import (
    JournalError,
    PeerAuthError,
    PeerError,
    PeerVersionError,
    ProtocolError,
)
from octofs.journal import JournalReader
from octofs.recorder import Recorder

log = logging.getLogger(__name__)

BATCH_BYTES = 1 * 2**20
BATCH_OPS = 2000
WINDOW_BYTES = 16 * 2**20
CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


class Forwarding:
    """The on/off switch shared by a vault's shippers."""

    def __init__(self, on: bool) -> None:
        self._on = on
        self._changed = trio.Event()

    @property
    def on(self) -> bool:
        return self._on

    def set(self, on: bool) -> None:
        if on != self._on:
            self._on = on
            self._changed.set()
            self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def wait_on(self) -> None:
        while not self._on:
            await self.wait_changed()


@dataclass(frozen=True)
class TargetStatistics:
    """What `octofs status` shows per target (docs/CLI_JSON.md)."""

    name: str
    address: str
    mode: str
    state: str
    acked_seq: int
    pending_ops: int
    lag_s: float
    last_error: str | None
    connected_since: float | None
    bytes_sent: int
    reconnects: int
    owners: bool | None
    sync_state: str  # "async"; for mode sync: "sync", or "degraded" after sync_timeout
    sync_waiters: int  # fsyncs waiting for this target's durable ack right now
    degraded_reason: str | None


class _ForwardingOff(Exception):
    pass


class _AckTimeout(Exception):
    pass


class Shipper:
    """Streams the journal of one vault to one target, reconnecting as needed.

    Args:
        name, host, port, mode: the target, from vault.yaml.
        vault, vault_id, epoch: who we are (sent in Hello).
        secret: the shared secret (never sent).
        heartbeat_s: heartbeat interval; a target silent for 3 intervals is considered gone.
        journal_dir: where to read records.
        recorder: the journal appender (to learn of appends and to make them durable).
        forwarding: the vault's on/off switch.
        acked_seq: what we last knew the target had acked (status before the first connect).
    """

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        mode: str,
        vault: str,
        vault_id: bytes,
        epoch: int,
        secret: bytes,
        heartbeat_s: float,
        journal_dir: Path,
        recorder: Recorder,
        forwarding: Forwarding,
        acked_seq: int = 0,
        sync_timeout_s: float = 5.0,
        on_timeout: str = "degrade",
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.mode = mode
        self._vault = vault
        self._vault_id = vault_id
        self._epoch = epoch
        self._secret = secret
        self.heartbeat_s = heartbeat_s
        self._journal_dir = journal_dir
        self._recorder = recorder
        self._forwarding = forwarding
        self.acked_seq = acked_seq
        self.state = "disconnected"
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.bytes_sent = 0
        self.reconnects = 0
        self.owners: bool | None = None
        self._acked_changed = trio.Event()
        self._inflight: collections.deque[tuple[int, int]] = collections.deque()  # (seq, bytes) sent, unacked
        self._inflight_bytes = 0
        self._last_heard = 0.0
        self.sync_timeout_s = sync_timeout_s
        self.on_timeout = on_timeout
        self.degraded_reason: str | None = None
        self.sync_waiters = 0

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- status -------------------------------------------------------------

    def statistics(self) -> TargetStatistics:
        last = self._recorder.writer.last_seq
        pending = max(0, last - self.acked_seq)
        return TargetStatistics(
            name=self.name,
            address=self.address,
            mode=self.mode,
            state="off" if not self._forwarding.on else self.state,
            acked_seq=self.acked_seq,
            pending_ops=pending,
            lag_s=self._recorder.age_of(self.acked_seq + 1) if pending else 0.0,
            last_error=self.last_error,
            connected_since=self.connected_since,
            bytes_sent=self.bytes_sent,
            reconnects=self.reconnects,
            owners=self.owners,
            sync_state="async" if self.mode != "sync" else ("degraded" if self.degraded_reason else "sync"),
            sync_waiters=self.sync_waiters,
            degraded_reason=self.degraded_reason,
        )

    async def wait_sync_ack(self, seq: int) -> None:
        """For an fsync in sync mode: wait until this target has made ``seq`` durable.

        After ``sync_timeout_s`` without that ack the target degrades to async (the
        fsync returns; status and the log say so) — unless ``on_timeout`` is
        ``block``, in which case the application waits as long as it takes. A
        degraded target becomes sync again by itself once it has caught up.
        """
        if self.mode != "sync" or self.degraded_reason is not None or self.acked_seq >= seq:
            return
        self.sync_waiters += 1
        try:
            if self.on_timeout == "block":
                await self.wait_acked(seq)
                return
            with trio.move_on_after(self.sync_timeout_s):
                await self.wait_acked(seq)
                return
            if self.degraded_reason is None:
                self.degraded_reason = (f"no durable ack for seq {seq} within sync_timeout "
                                        f"({self.sync_timeout_s:g} s): {self.last_error or self.state}")
                log.warning("target %s degraded to async: %s", self.name, self.degraded_reason)
        finally:
            self.sync_waiters -= 1

    async def wait_acked(self, seq: int) -> None:
        """Return once the target has acked ``seq``."""
        while self.acked_seq < seq:
            await self._acked_changed.wait()

    def _set_acked(self, seq: int) -> None:
        if seq > self.acked_seq:
            self.acked_seq = seq
            if self.degraded_reason is not None and seq >= self._recorder.writer.last_seq:
                self.degraded_reason = None
                log.info("target %s caught up: sync mode resumed", self.name)
            while self._inflight and self._inflight[0][0] <= seq:
                self._inflight_bytes -= self._inflight.popleft()[1]
            self._acked_changed.set()
            self._acked_changed = trio.Event()

    # -- main loop ----------------------------------------------------------

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            if not self._forwarding.on:
                self.state = "off"
                await self._forwarding.wait_on()
            self.state = "connecting"
            try:
                await self._connect_and_stream()
            except _ForwardingOff:
                log.info("forwarding off: disconnected from target %s", self.name)
                backoff = BACKOFF_MIN_S
                continue
            except (PeerAuthError, PeerVersionError, PeerError, ProtocolError) as exc:
                self._fail(exc.message, level=logging.ERROR)
                backoff = BACKOFF_MAX_S
            except JournalError as exc:
                # e.g. the target needs records already dropped: it must be resynchronized.
                self._fail(exc.message, level=logging.ERROR)
                backoff = BACKOFF_MAX_S
            except _AckTimeout:
                self._fail(f"no answer from the target for {3 * self.heartbeat_s:g} s", level=logging.WARNING)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as exc:
                self._fail(str(exc) or type(exc).__name__, level=logging.WARNING)
            else:
                backoff = BACKOFF_MIN_S
            if self.connected_since is not None:
                backoff = BACKOFF_MIN_S  # we were connected: retry quickly
            self.state = "disconnected"
            self.connected_since = None
            self.reconnects += 1
            with trio.move_on_after(backoff):
                await self._forwarding.wait_changed()
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    def _fail(self, message: str, *, level: int) -> None:
        if message != self.last_error:
            log.log(level, "target %s (%s): %s", self.name, self.address, message)
        self.last_error = message

    async def _connect_and_stream(self) -> None:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            decoder = protocol.FrameDecoder(peer=f"target {self.name} ({self.address})")
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                welcome = await self._handshake(stream, decoder)
            self.owners = welcome.owners
            self._inflight.clear()
            self._inflight_bytes = 0
            # The target is authoritative about what it holds.
            self.acked_seq = welcome.acked_seq
            self._acked_changed.set()
            self._acked_changed = trio.Event()
            self.state = "connected"
            self.connected_since = time.time()
            self.last_error = None
            self._last_heard = trio.current_time()
            log.info("target %s (%s) connected, resuming after seq %d", self.name, self.address, welcome.acked_seq)
            send_lock = trio.Lock()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, stream, decoder)
                    nursery.start_soon(self._heartbeat, stream, send_lock)
                    nursery.start_soon(self._watch_forwarding)
                    await self._send_loop(stream, send_lock)
            except BaseExceptionGroup as group:
                # trio wraps what the connection's tasks raised; the first real error
                # decides what run() does (reconnect, back off, report).
                raise _first_error(group) from None

    async def _handshake(self, stream: trio.abc.Stream, decoder: protocol.FrameDecoder) -> protocol.Welcome:
        nonce = protocol.new_nonce()
        await stream.send_all(protocol.encode(protocol.Hello(
            protocol.SUPPORTED_VERSIONS, self._vault, self._vault_id, self._epoch, nonce, float(self.heartbeat_s))))
        challenge = await _expect(stream, decoder, protocol.Challenge, self.name)
        expected = protocol.target_proof(self._secret, nonce, challenge.nonce, self._vault_id)
        if not protocol.proofs_equal(challenge.proof, expected):
            raise PeerAuthError(peer=self.address, reason="the target does not know the shared secret")
        await stream.send_all(protocol.encode(protocol.Auth(
            protocol.primary_proof(self._secret, nonce, challenge.nonce, self._vault_id))))
        return await _expect(stream, decoder, protocol.Welcome, self.name)

    async def _receive(self, stream: trio.abc.Stream, decoder: protocol.FrameDecoder) -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("the target closed the connection")
            self._last_heard = trio.current_time()
            decoder.feed(data)
            while (msg := decoder.next_message()) is not None:
                if isinstance(msg, protocol.Ack):
                    self._set_acked(msg.seq)
                elif isinstance(msg, protocol.Error):
                    raise _refusal(msg, self.address)
                else:
                    raise ProtocolError(peer=self.address, reason=f"unexpected {type(msg).__name__} from the target")

    async def _heartbeat(self, stream: trio.abc.Stream, send_lock: trio.Lock) -> None:
        while True:
            await trio.sleep(self.heartbeat_s)
            if trio.current_time() - self._last_heard > 3 * self.heartbeat_s:
                raise _AckTimeout()
            async with send_lock:
                await stream.send_all(protocol.encode(protocol.Heartbeat(time.time_ns(), self._recorder.writer.last_seq)))

    async def _watch_forwarding(self) -> None:
        while self._forwarding.on:
            await self._forwarding.wait_changed()
        raise _ForwardingOff()

    async def _send_loop(self, stream: trio.abc.Stream, send_lock: trio.Lock) -> None:
        recorder = self._recorder
        writer = recorder.writer
        reader = JournalReader(self._journal_dir)
        next_seq = self.acked_seq + 1
        held: collections.deque = collections.deque()  # read past the durable point; sent later
        while True:
            if next_seq > writer.last_seq:
                await recorder.wait_appended()
                continue
            if writer.durable_seq < writer.last_seq:
                # Only durable records leave the primary (see module docstring).
                await recorder.wait_durable(writer.last_seq)
            while self._inflight_bytes >= WINDOW_BYTES:
                await self._acked_changed.wait()
            limit = writer.durable_seq
            batch: list[bytes] = []
            size = 0
            last_seq = next_seq - 1
            while held and held[0].seq <= limit and size < BATCH_BYTES and len(batch) < BATCH_OPS:
                rec = held.popleft()
                payload = codec.encode_record(rec)
                batch.append(payload)
                size += len(payload)
                last_seq = rec.seq
            if not held:
                for rec in reader.records(last_seq + 1):
                    if rec.seq > limit:
                        held.append(rec)
                        break
                    payload = codec.encode_record(rec)
                    batch.append(payload)
                    size += len(payload)
                    last_seq = rec.seq
                    if size >= BATCH_BYTES or len(batch) >= BATCH_OPS:
                        break
            if not batch:
                # Nothing readable yet (cannot normally happen after wait_durable); do not spin.
                await trio.sleep(0.01)
                continue
            frame = protocol.encode(protocol.OpBatch(tuple(batch)))
            async with send_lock:
                await stream.send_all(frame)
            self.bytes_sent += len(frame)
            self._inflight.append((last_seq, len(frame)))
            self._inflight_bytes += len(frame)
            next_seq = last_seq + 1


async def _expect(stream: trio.abc.Stream, decoder: protocol.FrameDecoder, cls: type, name: str):
    while True:
        msg = decoder.next_message()
        if msg is not None:
            if isinstance(msg, protocol.Error):
                raise _refusal(msg, name)
            if not isinstance(msg, cls):
                raise ProtocolError(peer=name, reason=f"expected {cls.__name__}, got {type(msg).__name__}")
            return msg
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError("the target closed the connection during the handshake")
        decoder.feed(data)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception in a (nested) group that is not a cancellation."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group.exceptions[0]


def _refusal(msg: protocol.Error, peer: str) -> PeerError:
    if msg.code == "auth":
        return PeerAuthError(peer=peer, reason=f"refused: {msg.message}")
    if msg.code == "version":
        return PeerVersionError(peer=peer, theirs=msg.message, ours=list(protocol.SUPPORTED_VERSIONS))
    return PeerError(peer=peer, reason=f"refused ({msg.code}): {msg.message}")



async def wait_sync_targets(shippers: list[Shipper], seq: int) -> None:
    """The replication half of an fsync (DESIGN invariant 3): every sync-mode target
    has made ``seq`` durable, or has degraded to async. Targets are waited for side by side."""
    waiting = [sh for sh in shippers if sh.mode == "sync" and sh.degraded_reason is None and sh.acked_seq < seq]
    if not waiting:
        return
    async with trio.open_nursery() as nursery:
        for sh in waiting:
            nursery.start_soon(sh.wait_sync_ack, seq)
