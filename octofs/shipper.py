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
import contextlib
import errno
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from octofs import codec, compression, protocol, syncer
from octofs.errors import (
    JournalError,
    PeerAuthError,
    PeerEpochError,
    PeerError,
    PeerVersionError,
    ProtocolError,
)
from octofs.exclude import ExcludeFilter
from octofs.journal import JournalReader
from octofs.link import TokenBucket, open_link, send_now, tls_refusal
from octofs.ops import Record
from octofs.recorder import Recorder
from octofs.syncer import SyncJob
from octofs.tlsconf import ClientTls

log = logging.getLogger(__name__)

BATCH_BYTES = 1 * 2**20
BATCH_OPS = 2000
WINDOW_BYTES = 16 * 2**20
CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
# A degraded sync target returns to sync mode once it is at most this many ops behind.
RESUME_BEHIND_OPS = 1000
# A Synchronize repair holds the application's changes while the stream catches up, at most this long
# (else it tries again later); it sends its frame within this long or the connection is given up.
REPAIR_WAIT_MAX_S = 1.0
REPAIR_SEND_MAX_S = 10.0


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
    consistent: bool | None  # None until the target has been heard from
    synchronize: dict | None  # the Synchronize (or verify) under way or last finished (docs/CLI_JSON.md)
    # The link (issue 8): TLS on or off; compress as configured and as agreed on the live
    # connection (None: plain ops); the bandwidth limit (0 = none); op payload bytes before compression.
    tls: bool = False
    compress: str = "none"
    compression: str | None = None
    bandwidth_bps: int = 0
    op_bytes_sent: int = 0


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
        backing_fd: int | None = None,
        exclude: ExcludeFilter | None = None,
        state_dir: Path | None = None,
        origin_empty: bool = False,
        tls: ClientTls | None = None,
        compress: str = "none",
        bandwidth_bps: int = 0,
        on_fenced: Callable[[str], None] | None = None,
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
        # Synchronize (syncer.py): the job under way or pending, the last one finished.
        self._backing_fd = backing_fd
        self._exclude = exclude or ExcludeFilter()
        self._state_dir = state_dir
        self._origin_empty = origin_empty
        self.job: SyncJob | None = syncer.load_pending(state_dir, name) if state_dir is not None else None
        self.last_job: SyncJob | None = None
        self.target_consistent: bool | None = None
        self._job_changed = trio.Event()
        self._consistent_changed = trio.Event()
        self._sent_seq = 0
        self._sent_changed = trio.Event()
        self._answers: dict[int, list] = {}  # req -> [event, answer]
        self._live: tuple[trio.abc.Stream, trio.Lock] | None = None  # the connected stream and its send lock
        # The link (issue 8): TLS, compression (agreed per connection, FORMAT §7.13), bandwidth limit.
        self._tls = tls
        self.compress = compress
        self.compression: str | None = None
        self._compressor: compression.BatchCompressor | None = None
        self.bandwidth_bps = bandwidth_bps
        self._bucket = TokenBucket(bandwidth_bps) if bandwidth_bps > 0 else None
        # A frame takes at most ~1/4 s of the limit, so the rate stays even.
        self._batch_bytes = min(BATCH_BYTES, max(64 * 1024, bandwidth_bps // 4)) if bandwidth_bps > 0 else BATCH_BYTES
        self.op_bytes_sent = 0
        self._loopback = False  # the live connection's target is on this machine
        # Failover: called when the target refuses us for a stale epoch (another machine took over).
        self._on_fenced = on_fenced
        self.fenced = False

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
            state="off" if not self._forwarding.on else ("fenced" if self.fenced else self.state),
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
            consistent=self.consistent,
            synchronize=(self.job or self.last_job).status() if (self.job or self.last_job) else None,
            tls=self._tls is not None,
            compress=self.compress,
            compression=self.compression if self.state == "connected" else None,
            bandwidth_bps=self.bandwidth_bps,
            op_bytes_sent=self.op_bytes_sent,
        )

    # -- Synchronize ----------------------------------------------------------

    @property
    def consistent(self) -> bool | None:
        """Whether the target's copy is a state the primary had (no Synchronize pending or under way)."""
        if self.job is not None and not self.job.verify:
            return False
        return self.target_consistent

    def request_sync(self, job: SyncJob) -> SyncJob:
        """Queue a Synchronize or verify-only pass; it runs now if connected, else at the next connect.

        A Synchronize already pending or under way is returned instead of a new one; a verify-only
        pass is refused (ValueError) while a Synchronize is pending, since it would only report
        what that Synchronize is about to repair.
        """
        if self.job is not None:
            if job.verify or self.job.verify:
                raise ValueError(f"target {self.name}: a {'verify' if self.job.verify else 'Synchronize'} "
                                 "is already under way")
            return self.job
        if not job.verify and self._state_dir is not None:
            syncer.save_pending(self._state_dir, job)
        self.job = job
        self._job_changed.set()
        self._job_changed = trio.Event()
        self._consistent_changed.set()
        self._consistent_changed = trio.Event()
        return job

    def _job_finished(self, job: SyncJob) -> None:
        if not job.verify:
            if self._state_dir is not None:
                syncer.clear_pending(self._state_dir, job)
            self.target_consistent = True
        self.last_job = job
        if self.job is job:
            self.job = None
        self._consistent_changed.set()
        self._consistent_changed = trio.Event()

    async def wait_consistent(self) -> None:
        """Return once no Synchronize is pending or under way and the target has been heard from."""
        while self.consistent is not True:
            # Woken on every change of job or Welcome; the timeout is a guard only, so that a
            # transition this module forgot to signal costs a second, not the caller's deadline.
            with trio.move_on_after(1.0):
                await self._consistent_changed.wait()

    def _signal_consistency(self) -> None:
        self._consistent_changed.set()
        self._consistent_changed = trio.Event()

    async def _sync_driver(self, stream: trio.abc.Stream, send_lock: trio.Lock) -> None:
        """Run pending jobs on this connection, one at a time."""
        link = _Link(self, stream, send_lock)
        while True:
            job = self.job
            if job is None or self._backing_fd is None:
                await self._job_changed.wait()
                continue
            try:
                await syncer.drive(job, link, recorder=self._recorder, backing_fd=self._backing_fd,
                                   exclude=self._exclude, journal_ops=self._journal_ops)
            except ValueError as exc:  # a malformed answer from the target
                job.error = str(exc)
                raise ProtocolError(peer=self.address, reason=f"Synchronize: {exc}") from None
            except OSError as exc:
                job.error = f"reading the backing dir: {exc}"
                raise
            self._job_finished(job)

    def _journal_ops(self, after: int) -> list | None:
        """The journaled (seq, op) after ``after``, or None if some were dropped."""
        try:
            recs = list(JournalReader(self._journal_dir).records(after + 1))
        except JournalError:
            return None
        if recs and recs[0].seq != after + 1:
            return None
        return [(r.seq, r.op) for r in recs]

    def _plan_on_connect(self, welcome: protocol.Welcome) -> int | None:
        """Decide what the target needs now; return the reset seq if it must jump forward, else None."""
        writer = self._recorder.writer
        first = writer.statistics().first_seq
        need = welcome.acked_seq + 1
        lost = (need < first and need <= writer.last_seq) or welcome.acked_seq > writer.last_seq
        self.target_consistent = welcome.needs_resync is None and welcome.sync is None
        self._signal_consistency()
        job = self.job
        if welcome.needs_resync is not None or lost:
            reason = (f"the target needs a resync: {welcome.needs_resync}" if welcome.needs_resync is not None
                      else f"the target needs ops from seq {need}, but the journal starts at {first}"
                      if welcome.acked_seq <= writer.last_seq
                      else f"the target is at seq {welcome.acked_seq}, ahead of this journal ({writer.last_seq})")
            log.warning("target %s: %s; synchronizing", self.name, reason)
            if job is not None:
                self.job = None
            self.request_sync(SyncJob(target=self.name, reason=reason, reset=True))
            self.target_consistent = False
            return writer.last_seq
        if job is not None and job.verify:
            return None
        if welcome.sync is not None:
            if job is not None and welcome.sync.get("id") == job.sync_id.hex():
                job.resume = welcome.sync
            elif job is None:
                self.request_sync(SyncJob(target=self.name, reason="the target was in the middle of a "
                                          "Synchronize this primary does not know"))
            return None
        if job is None and not welcome.synced:
            trivial = self._origin_empty
            self.request_sync(SyncJob(target=self.name, trivial=trivial,
                                      reason="first contact (the vault was empty when its journal began)"
                                      if trivial else "first contact: the target has never been synchronized"))
        return None


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
            if self.degraded_reason is not None and self._recorder.writer.last_seq - seq <= RESUME_BEHIND_OPS:
                # Nearly caught up: resume. The fsyncs that wait for it from now on hold the
                # application back just enough for the last of the backlog to drain; waiting for
                # an exact catch-up instead may never happen while the application writes faster
                # than the target applies.
                self.degraded_reason = None
                log.info("target %s caught up: sync mode resumed (%d ops behind)", self.name,
                         self._recorder.writer.last_seq - seq)
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
            except PeerEpochError as exc:
                self._fail(exc.message, level=logging.ERROR)
                self.fenced = True
                if self._on_fenced is not None:
                    self._on_fenced(f"target {self.name} ({self.address}): {exc.message}")
                backoff = BACKOFF_MAX_S
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
        # TCP, then TLS when configured (link.py): a wrong certificate is a PeerCertificateError.
        stream = await open_link(self.host, self.port, tls=self._tls, peer=f"target {self.name} ({self.address})",
                                 connect_timeout_s=CONNECT_TIMEOUT_S)
        async with stream:
            decoder = protocol.FrameDecoder(peer=f"target {self.name} ({self.address})")
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    welcome = await self._handshake(stream, decoder)
            except trio.BrokenResourceError as exc:  # under TLS 1.3 a refused client certificate shows up here
                raise tls_refusal(exc, self.address) or exc
            self.owners = welcome.owners
            # Compression only if the target named a codec we offered (FORMAT §7.13).
            self.compression = welcome.compress if self.compress != "none" and welcome.compress in compression.CODECS \
                else None
            self._compressor = compression.BatchCompressor(self.compress) if self.compression else None
            # auto never compresses to a target on this machine: a loopback link is never the bottleneck.
            self._loopback = _is_loopback(stream)
            self._inflight.clear()
            self._inflight_bytes = 0
            self._answers.clear()
            reset_seq = self._plan_on_connect(welcome)
            if reset_seq is not None:
                # The target missed ops the journal no longer has: it jumps to reset_seq, and the
                # Synchronize that starts here repairs whatever those ops changed.
                job = self.job
                assert job is not None
                await stream.send_all(protocol.encode(protocol.SyncBegin(job.sync_id, max(1, reset_seq), False)))
                job.resume = {"cursor": "", "seq": max(1, reset_seq)}
                welcome = protocol.Welcome(max(1, reset_seq), welcome.epoch, welcome.owners)
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
            self._live = (stream, send_lock)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, stream, decoder)
                    nursery.start_soon(self._heartbeat, stream, send_lock)
                    nursery.start_soon(self._watch_forwarding)
                    nursery.start_soon(self._sync_driver, stream, send_lock)
                    await self._send_loop(stream, send_lock)
            except BaseExceptionGroup as group:
                # trio wraps what the connection's tasks raised; the first real error
                # decides what run() does (reconnect, back off, report).
                raise _first_error(group) from None
            finally:
                self._live = None

    async def goodbye(self, reason: str) -> None:
        """A clean stop (unmount): tell the connected target, so that its failover watcher does not
        take the silence that follows for a dead primary (FORMAT §7.8, code ``bye``). Best effort."""
        live = self._live
        if live is None:
            return
        stream, send_lock = live
        with trio.move_on_after(2):
            try:
                async with send_lock:
                    await stream.send_all(protocol.encode(protocol.Error("bye", reason)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                log.debug("target %s: could not say goodbye", self.name)

    async def _handshake(self, stream: trio.abc.Stream, decoder: protocol.FrameDecoder) -> protocol.Welcome:
        nonce = protocol.new_nonce()
        await stream.send_all(protocol.encode(protocol.Hello(
            protocol.SUPPORTED_VERSIONS, self._vault, self._vault_id, self._epoch, nonce, float(self.heartbeat_s),
            compress=compression.CODECS if self.compress != "none" else ())))
        challenge = await _expect(stream, decoder, protocol.Challenge, self.name)
        if challenge.version not in protocol.SUPPORTED_VERSIONS:  # FORMAT §7.10: never guess
            raise PeerVersionError(f"Target {self.address} chose protocol version {challenge.version}, which this "
                                   f"octofs does not speak (it speaks {list(protocol.SUPPORTED_VERSIONS)})",
                                   peer=self.address)
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
                elif isinstance(msg, protocol.SyncAnswer):
                    slot = self._answers.get(msg.req)
                    if slot is None:
                        raise ProtocolError(peer=self.address, reason=f"an answer to unknown query {msg.req}")
                    slot[1] = msg
                    slot[0].set()
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
        # keep_open: the live segment stays open between batches (no listing and re-opening per batch).
        with contextlib.closing(JournalReader(self._journal_dir, keep_open=True)) as reader:
            await self._send_from(reader, stream, send_lock)

    async def _send_from(self, reader: JournalReader, stream: trio.abc.Stream, send_lock: trio.Lock) -> None:
        recorder = self._recorder
        writer = recorder.writer
        next_seq = self.acked_seq + 1
        self._set_sent(self.acked_seq)
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
            # Payloads go out exactly as journaled (no decode and re-encode); the target decodes
            # and validates each one.
            while held and held[0][0] <= limit and size < self._batch_bytes and len(batch) < BATCH_OPS:
                seq, payload = held.popleft()
                batch.append(payload)
                size += len(payload)
                last_seq = seq
            if not held:
                for seq, payload in reader.raw_records(last_seq + 1):
                    if seq > limit:
                        held.append((seq, payload))
                        break
                    batch.append(payload)
                    size += len(payload)
                    last_seq = seq
                    if size >= self._batch_bytes or len(batch) >= BATCH_OPS:
                        break
            if not batch:
                # Nothing readable yet (cannot normally happen after wait_durable); do not spin.
                await trio.sleep(0.01)
                continue
            frame = await self._op_frame(batch, size)
            if self._bucket is not None:  # bandwidth: (bytes/s)
                await self._bucket.take(len(frame))
            if last_seq >= writer.last_seq and not send_lock.locked():
                # Caught up (a commit's batch; the next round waits for an append, a checkpoint):
                # the lock taken without waiting and the frame handed to the kernel at once, no
                # scheduler pass for either unless the socket is full (docs/PERFORMANCE.md).
                send_lock.acquire_nowait()
                try:
                    sent = send_now(stream, frame)
                    if sent < len(frame):
                        await stream.send_all(memoryview(frame)[sent:])
                    self._set_sent(last_seq)
                finally:
                    send_lock.release()
            else:
                async with send_lock:
                    await stream.send_all(frame)
                    self._set_sent(last_seq)
            self.bytes_sent += len(frame)
            self._inflight.append((last_seq, len(frame)))
            self._inflight_bytes += len(frame)
            next_seq = last_seq + 1

    async def _op_frame(self, batch: list[bytes], size: int) -> bytes:
        """An `ops` frame, or a `zops` frame when compression is agreed and pays (FORMAT §7.13).

        ``auto`` compresses only while the link is the bottleneck: the oldest op the target has
        not acked is ``compression.AUTO_LAG_S`` old or more, or a bandwidth limit is set. On a
        fast link the target keeps up and batches go out plain, at no CPU cost. (The lag, not
        the bytes in flight: compressed frames are small, so a byte count would switch itself off.)
        """
        self.op_bytes_sent += size
        comp = self._compressor
        if comp is not None and self.compression is not None and (
                comp.mode == "zstd" or self._bucket is not None
                or (not self._loopback and self._recorder.age_of(self.acked_seq + 1) >= compression.AUTO_LAG_S)):
            # zstandard releases the GIL: compress in a worker thread, never in the loop that
            # also serves the mount's FUSE requests (STYLE §6.5).
            data = await trio.to_thread.run_sync(comp.compress, protocol.pack_records(batch))
            if data is not None:
                return protocol.encode_zops(self.compression, data, self._epoch)
        return protocol.encode(protocol.OpBatch(tuple(batch), self._epoch))

    def _set_sent(self, seq: int) -> None:
        self._sent_seq = seq
        self._sent_changed.set()
        self._sent_changed = trio.Event()


class _Link:
    """The SyncLink (syncer.py) of one connection: frames in stream order, under the send lock."""

    def __init__(self, shipper: Shipper, stream: trio.abc.Stream, send_lock: trio.Lock) -> None:
        self._sh = shipper
        self._stream = stream
        self._lock = send_lock
        self.owners = bool(shipper.owners)

    async def send(self, msg: protocol.Message) -> int:
        frame = protocol.encode(msg)
        if self._sh._bucket is not None:
            await self._sh._bucket.take(len(frame))
        async with self._lock:
            pos = self._sh._sent_seq
            await self._stream.send_all(frame)
        self._sh.bytes_sent += len(frame)
        return pos

    async def query(self, req: int, block_size: int, items: list[tuple[str, bytes]]) -> tuple[int, protocol.SyncAnswer]:
        slot: list = [trio.Event(), None]
        self._sh._answers[req] = slot
        try:
            pos = await self.send(protocol.SyncQuery(req, block_size, tuple(items)))
            await slot[0].wait()
            return pos, slot[1]
        finally:
            self._sh._answers.pop(req, None)

    async def wait_sent(self, seq: int) -> None:
        while self._sh._sent_seq < seq:
            await self._sh._sent_changed.wait()

    async def fence(self) -> tuple[bytes, ...]:
        _, answer = await self.query(0, 65536, [])  # req 0 is never a plan's
        return answer.skipped

    async def repair(self, produce) -> int | None:
        sh = self._sh
        writer = sh._recorder.writer
        sh._recorder.pause()
        paused, locked = True, False
        try:
            # Everything journaled must be out first (the send loop makes it durable and sends it).
            # Changes are held meanwhile, so that wait is bounded: a slow or dead link must not
            # stall the application; the driver tries again a little later.
            with trio.move_on_after(REPAIR_WAIT_MAX_S):
                while sh._sent_seq < writer.last_seq:
                    await sh._sent_changed.wait()
                await self._lock.acquire()
                locked = True
            if not locked:
                return None
            seq = writer.last_seq
            if sh._sent_seq != seq:  # cannot happen while changes are held; never send out of place
                raise ProtocolError(peer=sh.address, reason="internal: a repair out of place")
            now = time.time_ns()
            ops = produce(seq)  # reads the backing dir at exactly `seq`: no await since the check above
            # Changes may go on now: what they journal goes out after this frame (the send lock is ours).
            sh._recorder.resume()
            paused = False
            if not ops:
                return 0
            frame = protocol.encode(protocol.Repair(tuple(codec.encode_record(Record(seq + 1, now, op))
                                                          for op in ops)))
            try:
                with trio.fail_after(REPAIR_SEND_MAX_S):
                    await self._stream.send_all(frame)
            except trio.TooSlowError:
                # Half a frame may be out: this connection is done for (the Synchronize resumes).
                raise OSError(errno.ETIMEDOUT, f"the target took no repair frame for {REPAIR_SEND_MAX_S:g} s") from None
        finally:
            if locked:
                self._lock.release()
            if paused:
                sh._recorder.resume()
        sh.bytes_sent += len(frame)
        if sh._bucket is not None:  # charged after the fact: nothing may wait between produce and send
            await sh._bucket.take(len(frame))
        return len(frame)


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


def _is_loopback(stream: trio.abc.Stream) -> bool:
    sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
    try:
        return sock is not None and ipaddress.ip_address(sock.getpeername()[0]).is_loopback
    except (OSError, ValueError, IndexError):
        return False


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
    if msg.code == "version":  # the target's message names both lists (FORMAT §7.10)
        return PeerVersionError(f"Target {peer} refused the protocol version: {msg.message}", peer=peer)
    if msg.code == "epoch":
        return PeerEpochError(f"Peer {peer} refused this primary's epoch: {msg.message}", peer=peer,
                              theirs="?", ours="?")
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
