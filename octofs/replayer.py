"""replayer.py: owns the target side of replication: accepting primaries, authenticating them, replaying their ops.

``serve_target`` listens for primaries; each connection is a task that runs the
handshake (docs/FORMAT.md §7), then receives op batches and applies them to the
vault's ``Replica`` (replica.py) in a worker thread, acking what is durable.

Invariants:
- **Authenticated peers (DESIGN invariant 6).** Nothing but Hello and Auth is read
  from a connection before the primary has proved it knows the shared secret; the
  replica dir is not even opened before that. Handshake frames are limited to
  ``HANDSHAKE_MAX_FRAME_BYTES``.
- **Bad input is refused, not obeyed (invariant 7).** A malformed frame, an
  undecodable record, an unknown message, a seq gap: the connection gets an Error
  frame (best effort), is closed, and the reason is logged at WARNING; a batch with
  an undecodable record is refused as a whole, so nothing of it is applied. One bad
  connection never takes the server down (each handler catches everything but
  cancellation).
- **One writer per vault.** At most one authenticated connection per vault is
  live: a newer one supersedes (cancels) the older one and waits until it has
  stopped, so two primaries never interleave ops in one replica dir. The vault id
  and epoch are checked *before* that, so a refused peer cannot displace a good one.
- **Acks are durable.** An Ack carries ``Replica.durable_seq``: only seqs that
  syncfs has made durable on this disk.

Cancellation: ``serve_target`` runs until cancelled; then every connection is
cancelled (an apply in a worker thread finishes first: trio does not abandon the
thread), every replica is made durable and closed, and the root lock is released.

Error handling: per connection, as above; a connection's end is logged with its
reason (INFO for a peer that went away). Only a failure to start (root locked,
address in use) propagates out of ``serve_target``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from octofs import codec, compression, probe, protocol, state
from octofs.control import serve_control
from octofs.errors import (
    DaemonError,
    OpError,
    PeerCertificateError,
    PeerEpochError,
    PeerError,
    ProtocolError,
)
from octofs.freeze import FreezeGate, Freezer
from octofs.link import accept_tls, send_now
from octofs.ops import Record
from octofs.replica import (
    Replica,
    TargetLock,
    check_vault_name,
    control_socket_path,
    known_vaults,
    vault_state_dir,
)
from octofs.threads import run_in_worker

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
HANDSHAKE_MAX_FRAME_BYTES = 64 * 1024  # Hello and Auth are a few hundred bytes
RECEIVE_BYTES = 1 * 2**20
# Make applied ops durable (and ack them) at least this often while a stream keeps
# the target busy; well inside the shipper's 16 MiB window.
DURABLE_EVERY_BYTES = 4 * 2**20
DURABLE_EVERY_S = 1.0
# A primary silent for this many heartbeat intervals is gone (the shipper uses 3 too).
HEARTBEAT_MISSES = 3
SEND_TIMEOUT_S = 30.0
# A batch this small from the only connected primary is applied without a thread hop,
# unless one took longer than INLINE_APPLY_MAX_S within the last INLINE_PAUSE batches.
INLINE_BATCH_BYTES = 256 * 1024
INLINE_APPLY_MAX_S = 0.02
INLINE_PAUSE = 1000
MAX_ERROR_MESSAGE_CHARS = 1000


class _Refused(Exception):
    """Close the connection with an Error frame of ``code``, logging ``message`` at ``level``."""

    def __init__(self, code: str, message: str, level: int = logging.WARNING) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.level = level


class _PeerGone(Exception):
    """The peer closed the connection, fell silent, or was superseded."""

    def __init__(self, message: str, level: int = logging.INFO) -> None:
        super().__init__(message)
        self.message = message
        self.level = level


@dataclass(eq=False)
class _Connection:
    peer: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    superseded_by: str | None = None
    refusal: tuple[str, str] | None = None  # (code, message) sent when the server ends it (a takeover)


@dataclass(eq=False)
class _VaultSlot:
    """Everything the server keeps about one vault."""

    lock: trio.Lock = field(default_factory=trio.Lock)  # serializes open, peer checks and takeover
    replica: Replica | None = None
    conn: _Connection | None = None
    last_heartbeat: float | None = None  # trio time
    said_goodbye: float | None = None  # trio time of the primary's clean-stop notice, until it connects again
    error: str | None = None  # why the replica could not be opened
    op_bytes_received: int = 0  # record payload bytes of op batches applied since serve started (status, metrics)
    # Failover: this target took the vault over at this epoch; the replica dir belongs to a
    # mount now, and every primary is refused (docs/FORMAT.md §11).
    released_epoch: int | None = None
    freeze: FreezeGate = field(default_factory=FreezeGate)  # octofs freeze / thaw (freeze.py)


class TargetServer:
    """The state shared by all connections of one ``serve_target``.

    Args:
        root: the target root (replica dirs ``ROOT/NAME``, state in ``ROOT/.octofs``).
        secret: the shared secret.
        listen: the bound address, for status.
        tls: the server side's SSL context (SERVE.yaml ``tls:``): every connection must
            then be TLS (docs/FORMAT.md §7.12); None for plain TCP.
    """

    def __init__(self, root: Path, secret: bytes, listen: str = "", tls: ssl.SSLContext | None = None) -> None:
        self.root = Path(root)
        self._secret = secret
        self.listen = listen
        self._tls = tls
        self._slots: dict[str, _VaultSlot] = {}
        self._not_inline = 0  # op batches still to apply in worker threads after a slow one
        # Failover (failover.py): vault name -> extra status fields (monitor state, takeover record).
        self.status_extra: dict[str, dict] = {}
        self.control_handlers: dict = {}
        self.freezer = Freezer(self._slots.get, lambda: sorted(self._slots))

    # -- lifetime ----------------------------------------------------------

    def open_known(self) -> None:
        """Open every vault that has state under the root (blocking; run in a thread)."""
        for name in known_vaults(self.root):
            slot = self._slots.setdefault(name, _VaultSlot())
            released = _released_epoch(self.root, name)
            if released is not None:
                slot.released_epoch = released
                log.info("vault %s: taken over here at epoch %d; its replica dir is the primary's now", name, released)
                continue
            try:
                slot.replica = Replica.open(self.root, name)
            except OSError as exc:
                slot.error = f"cannot open the replica dir: {exc}"
                log.error("vault %s: %s", name, slot.error)
                continue
            r = slot.replica
            log.info("vault %s: applied seq %d, durable seq %d, epoch %d%s", name, r.applied_seq,
                     r.durable_seq, r.epoch, f"; needs a resync: {r.needs_resync}" if r.needs_resync else "")

    def close_all(self) -> None:
        """Make every replica durable and close it (blocking; run in a thread)."""
        for name, slot in self._slots.items():
            if slot.replica is not None:
                slot.replica.close()
                log.info("vault %s closed at durable seq %d", name, slot.replica.durable_seq)

    # -- status --------------------------------------------------------------

    async def status(self, request: dict) -> dict:
        """The control socket's ``status`` reply (docs/CLI_JSON.md)."""
        now = trio.current_time()
        vaults = []
        for name in sorted(self._slots):
            slot = self._slots[name]
            r = slot.replica
            entry = {
                "vault": name,
                "vault_id": r.vault_id.hex() if r is not None and r.vault_id is not None else None,
                "epoch": r.epoch if r is not None else None,
                "applied_seq": r.applied_seq if r is not None else None,
                "durable_seq": r.durable_seq if r is not None else None,
                "connected": slot.conn is not None,
                "peer": slot.conn.peer if slot.conn is not None else None,
                "last_heartbeat_age_s": None if slot.last_heartbeat is None else round(now - slot.last_heartbeat, 3),
                "needs_resync": r.needs_resync if r is not None else None,
                "op_bytes_received": slot.op_bytes_received,
                "consistent": r.consistent if r is not None else None,
                "sync": r.sync if r is not None else None,
            }
            if slot.error is not None:
                entry["error"] = slot.error
            if slot.released_epoch is not None:
                entry["epoch"] = slot.released_epoch
                entry["role"] = "primary"
            entry.update(slot.freeze.status())
            entry.update(self.status_extra.get(name, {}))
            vaults.append(entry)
        for name in sorted(set(self.status_extra) - set(self._slots)):
            vaults.append({"vault": name, "connected": False, **self.status_extra[name]})
        return {
            "role": "target",
            "root": str(self.root),
            "listen": self.listen,
            "pid": os.getpid(),
            "owners": os.geteuid() == 0,
            "vaults": vaults,
        }

    # -- failover --------------------------------------------------------------

    def stopped_cleanly(self, vault: str) -> bool:
        """Whether ``vault``'s primary said it stopped cleanly (unmounted) and has not come back since."""
        slot = self._slots.get(vault)
        return slot is not None and slot.said_goodbye is not None

    def heard(self, vault: str) -> float | None:
        """The trio time of the last heartbeat from ``vault``'s primary, or None."""
        slot = self._slots.get(vault)
        return slot.last_heartbeat if slot is not None else None

    def replica(self, vault: str) -> Replica | None:
        slot = self._slots.get(vault)
        return slot.replica if slot is not None else None

    async def release(self, vault: str, reason: str) -> tuple[Replica, int]:
        """Take ``vault`` away from replication for a takeover: raise and persist the epoch, end
        the primary's connection (an ``epoch`` Error: fencing mid-connection), make everything
        applied durable and close the replica. Returns the closed replica and the new epoch.

        Raises:
            ValueError: the vault is unknown here, already released, or not consistent.
        """
        slot = self._slots.get(vault)
        if slot is None or slot.replica is None:
            raise ValueError(f"vault {vault} has no replica here")
        async with slot.lock:
            replica = slot.replica
            if slot.released_epoch is not None or replica is None:
                raise ValueError(f"vault {vault} is already taken over here")
            if replica.vault_id is None:
                raise ValueError(f"vault {vault}: no primary has ever connected here")
            if not replica.consistent:
                why = replica.needs_resync or "a Synchronize is under way"
                raise ValueError(f"vault {vault}: the replica is not a state the primary had ({why})")
            epoch = replica.epoch + 1
            # Persisted first: from here on a primary with the old epoch is refused, even after a restart.
            await trio.to_thread.run_sync(_write_epoch, replica, epoch)
            slot.released_epoch = epoch
            self.freezer.end(vault, slot.freeze, "taken over")
            conn = slot.conn
            if conn is not None:
                conn.refusal = ("epoch", f"vault {vault}: this target took over at epoch {epoch} ({reason})")
                conn.scope.cancel()
                await conn.done.wait()
            await trio.to_thread.run_sync(replica.close)
            slot.replica = None
            log.warning("vault %s released for takeover at epoch %d (durable seq %d): %s", vault, epoch,
                        replica.durable_seq, reason)
            return replica, epoch

    def unrelease(self, vault: str) -> None:
        """After a handover back (failover.py ``reclaim``): the vault is a replica again, opened at the next connection."""
        slot = self._slots.get(vault)
        if slot is not None:
            slot.released_epoch = None
            slot.replica = None
            slot.last_heartbeat = None

    def _connected(self) -> int:
        """How many vaults have a primary connected right now."""
        return sum(1 for slot in self._slots.values() if slot.conn is not None)

    # -- one connection --------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it ends. Never raises (except Cancelled)."""
        peer = _peer_name(stream)
        log.debug("connection from %s", peer)
        try:
            if self._tls is not None:  # no frame before the TLS handshake (FORMAT §7.12)
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    stream = await accept_tls(stream, self._tls)
            await self._session(stream, peer)
        except PeerCertificateError as exc:
            log.warning("refused %s: TLS handshake failed: %s", peer, exc.fields.get("reason", exc.message))
        except _Refused as exc:
            log.log(exc.level, "refused %s: %s", peer, exc.message)
            await _send_error(stream, exc.code, exc.message)
        except ProtocolError as exc:
            log.warning("closing the connection from %s: %s", peer, exc.message)
            await _send_error(stream, "protocol", exc.message)
        except trio.TooSlowError:
            log.warning("closing the connection from %s: no handshake within %g s", peer, HANDSHAKE_TIMEOUT_S)
        except _PeerGone as exc:
            log.log(exc.level, "connection from %s ended: %s", peer, exc.message)
        except trio.BrokenResourceError as exc:  # the peer went away (trio wraps socket errors in it)
            log.info("connection from %s ended: %s", peer, str(exc) or type(exc).__name__)
        except Exception as exc:  # one connection must never take the server down
            log.exception("internal error on the connection from %s", peer)
            await _send_error(stream, "internal", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await stream.aclose()

    async def _session(self, stream: trio.abc.Stream, peer: str) -> None:
        decoder = protocol.FrameDecoder(peer=peer, max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES)
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            hello = await _receive(stream, decoder)
            if not isinstance(hello, protocol.Hello):
                raise ProtocolError(peer=peer, reason=f"expected hello, got {_kind(hello)}")
            if not (math.isfinite(hello.heartbeat_s) and hello.heartbeat_s > 0):
                raise ProtocolError(peer=peer, reason=f"hello: bad heartbeat_s {hello.heartbeat_s!r}")
            version = protocol.choose_version(hello.versions)
            if version is None:
                raise _Refused(
                    "version",
                    f"no common protocol version: the primary speaks {sorted(hello.versions)}, "
                    f"this target speaks {list(protocol.SUPPORTED_VERSIONS)}",
                )
            nonce = protocol.new_nonce()
            proof = protocol.target_proof(self._secret, hello.nonce, nonce, hello.vault_id)
            await _send(stream, protocol.Challenge(version, nonce, proof))
            auth = await _receive(stream, decoder)
            if isinstance(auth, protocol.Error):
                raise _PeerGone(f"the primary refused: {auth.code}: {auth.message}", logging.WARNING)
            if not isinstance(auth, protocol.Auth):
                raise ProtocolError(peer=peer, reason=f"expected auth, got {_kind(auth)}")
            expected = protocol.primary_proof(self._secret, hello.nonce, nonce, hello.vault_id)
            if not protocol.proofs_equal(auth.proof, expected):
                raise _Refused("auth", "authentication failed: the primary does not know the shared secret")
            if decoder.buffered:
                raise ProtocolError(peer=peer, reason="data after auth, before welcome")
        # Authenticated: from here on the peer may touch the replica.
        try:
            vault = check_vault_name(hello.vault)
        except ValueError as exc:
            raise ProtocolError(peer=peer, reason=f"hello: {exc}") from None
        if hello.probe:  # `octofs check`: answer and close; the vault is not touched (FORMAT §7.11)
            slot = self._slots.get(vault)
            info = await trio.to_thread.run_sync(
                probe.probe_info, self.root, vault, hello.vault_id, version,
                slot.replica if slot is not None else None, slot is not None and slot.conn is not None)
            log.info("probe from %s for vault %s answered", peer, vault)
            await _send(stream, info)
            return
        await self._serve_vault(stream, peer, hello, vault)

    async def _serve_vault(self, stream: trio.abc.Stream, peer: str, hello: protocol.Hello, vault: str) -> None:
        slot = self._slots.setdefault(vault, _VaultSlot())
        async with slot.lock:
            if slot.released_epoch is not None:
                # Fencing: this target took over; no primary feeds its copy any more.
                if hello.epoch < slot.released_epoch:
                    raise _Refused("epoch", f"vault {vault}: this target took over at epoch {slot.released_epoch}; "
                                   f"the primary's epoch {hello.epoch} is stale")
                raise _Refused("busy", f"vault {vault} is mounted as the primary here (epoch {slot.released_epoch})")
            if slot.replica is None:
                try:
                    slot.replica = await trio.to_thread.run_sync(Replica.open, self.root, vault)
                except OSError as exc:
                    slot.error = f"cannot open the replica dir: {exc}"
                    raise _Refused("internal", f"vault {vault}: {slot.error}", logging.ERROR) from None
                slot.error = None
            replica = slot.replica
            try:
                await trio.to_thread.run_sync(
                    lambda: replica.check_peer(hello.vault_id, hello.epoch, peer=f"primary {peer}"))
            except PeerEpochError as exc:
                raise _Refused("epoch", exc.message) from None
            except PeerError as exc:
                raise _Refused("vault_id", exc.message, logging.ERROR) from None
            except OSError as exc:
                raise _Refused("internal", f"vault {vault}: cannot record the vault id or epoch: {exc}",
                               logging.ERROR) from None
            # A vault that needs a resync is still served: the Welcome says so, and the
            # primary answers with a Synchronize (ops are refused until it resets the vault).
            old = slot.conn
            if old is not None:
                log.info("vault %s: the connection from %s supersedes the one from %s", vault, peer, old.peer)
                old.superseded_by = peer
                old.scope.cancel()
                await old.done.wait()
            conn = _Connection(peer)
            slot.conn = conn
        try:
            with conn.scope, slot.freeze.attached(replica):
                await self._replay(stream, peer, hello, slot, replica)
            if conn.refusal is not None:
                raise _Refused(*conn.refusal)
            if conn.superseded_by is not None:
                await _send_error(stream, "busy", f"superseded by a newer connection from {conn.superseded_by}")
                raise _PeerGone(f"superseded by a newer connection from {conn.superseded_by}")
        finally:
            if slot.conn is conn:
                slot.conn = None
            conn.done.set()

    async def _replay(self, stream: trio.abc.Stream, peer: str, hello: protocol.Hello, slot: _VaultSlot,
                      replica: Replica) -> None:
        slot.last_heartbeat = trio.current_time()  # a primary that connects is alive (failover.py)
        slot.said_goodbye = None
        acked = replica.durable_seq if replica.needs_resync is not None else await _make_durable(replica)
        # Compression (FORMAT §7.13): the first codec of the hello's that this target decodes.
        codec_name = next((c for c in hello.compress if c in compression.CODECS), None)
        await _send(stream, protocol.Welcome(acked, replica.epoch, replica.owners, replica.needs_resync,
                                             replica.sync, replica.synced, compress=codec_name))
        log.info("primary %s connected for vault %s (epoch %d), resuming after seq %d%s",
                 peer, replica.vault, hello.epoch, acked, f", {codec_name} compression" if codec_name else "")
        decoder = protocol.FrameDecoder(peer=peer, compress=codec_name)
        silence_s = HEARTBEAT_MISSES * hello.heartbeat_s
        since_durable_bytes = 0
        last_durable = trio.current_time()
        while True:
            # Through the freeze gate (freeze.py): while the vault is frozen, op batches and Synchronize
            # frames are held and only the rest (heartbeats) comes out.
            msg = await slot.freeze.next_message(lambda: _receive(stream, decoder, silence_s=silence_s),
                                                 keepalive=lambda: _send(stream, protocol.Ack(replica.durable_seq)),
                                                 keepalive_s=hello.heartbeat_s)
            slot.last_heartbeat = trio.current_time()  # any frame shows the primary alive (failover.py)
            if isinstance(msg, protocol.OpBatch):
                if msg.epoch and msg.epoch < replica.epoch:
                    # Fencing (DESIGN, failover): a batch from a primary older than the epoch this
                    # target now knows is never applied, even on a connection made before.
                    raise _Refused("epoch", f"vault {replica.vault}: an op batch at epoch {msg.epoch}, below this "
                                   f"target's epoch {replica.epoch}: that primary is stale (a failover happened)")
                records = _decode_batch(msg, peer)
                batch_bytes = sum(len(r) for r in msg.records)
                try:
                    started = time.monotonic()
                    if batch_bytes <= INLINE_BATCH_BYTES and self._connected() == 1 and not self._not_inline:
                        # The only primary connected, a small batch (a database commit): applied in
                        # the loop's own thread, barrier included; the hop to a worker would cost
                        # more (docs/CONCURRENCY.md §3). Other connections wait at most that long,
                        # and after a slow one (a busy disk) the next INLINE_PAUSE go to workers.
                        _apply_all(replica, records)
                    else:
                        await run_in_worker(_apply_all, replica, records)
                    if time.monotonic() - started > INLINE_APPLY_MAX_S:
                        self._not_inline = INLINE_PAUSE
                    elif self._not_inline:
                        self._not_inline -= 1
                except OpError as exc:
                    raise _Refused("apply", exc.message, logging.ERROR) from None
                except ProtocolError as exc:  # a seq gap
                    raise ProtocolError(peer=peer, reason=str(exc.fields.get("reason", exc.message))) from None
                if records:
                    slot.freeze.applied(records[-1].seq, records[-1].time_ns)  # for its applied_time
                since_durable_bytes += batch_bytes
                slot.op_bytes_received += batch_bytes
                now = trio.current_time()
                # More input already here (frames held by a freeze too)? Asked (a poll) only when the
                # answer matters: not after a batch that ended with its barrier (a commit).
                if replica.applied_seq > replica.durable_seq and (
                        since_durable_bytes >= DURABLE_EVERY_BYTES or now - last_durable >= DURABLE_EVERY_S
                        or not (slot.freeze.held_frames > 0 or _more_waiting(stream, decoder))):
                    # (Nothing to do after a batch that ended with a barrier: no thread hop for it.)
                    await _make_durable(replica)
                    since_durable_bytes = 0
                    last_durable = now
                if replica.durable_seq > acked:  # also after a barrier inside the batch
                    acked = replica.durable_seq
                    await _send(stream, protocol.Ack(acked))
            elif isinstance(msg, protocol.Heartbeat):
                slot.last_heartbeat = trio.current_time()
                if replica.applied_seq > replica.durable_seq and replica.needs_resync is None:
                    # A batch whose make-durable was put off because this heartbeat was already waiting
                    # (_more_waiting) must not stay unacked until the next batch, which may never come.
                    await _make_durable(replica)
                elif replica.unsettled:
                    await run_in_worker(replica.settle)  # durable and quiet: a power cut costs nothing
                acked = replica.durable_seq
                await _send(stream, protocol.Ack(acked))
            elif isinstance(msg, protocol.Error):
                if msg.code == "bye":
                    slot.said_goodbye = trio.current_time()
                    raise _PeerGone(f"the primary stopped cleanly: {msg.message}")
                raise _PeerGone(f"the primary closed the connection: {msg.code}: {msg.message}", logging.WARNING)
            elif isinstance(msg, _SYNC_MESSAGES):
                await _sync_message(stream, peer, replica, msg)
                if isinstance(msg, (protocol.SyncCheckpoint, protocol.SyncEnd, protocol.SyncBegin)):
                    last_durable = trio.current_time()
                    since_durable_bytes = 0
                if replica.durable_seq > acked:
                    acked = replica.durable_seq
                    await _send(stream, protocol.Ack(acked))
            else:
                raise ProtocolError(peer=peer, reason=f"unexpected {_kind(msg)} after the handshake")


async def serve_target(
    root: Path,
    host: str,
    port: int,
    secret: bytes,
    *,
    tls: ssl.SSLContext | None = None,
    with_server: Callable[[TargetServer], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receive vaults from primaries into ``ROOT/NAME`` folders until cancelled.

    Args:
        root: the target root; it must exist. ``ROOT/.octofs`` is created.
        host: the address to listen on.
        port: the port; 0 picks a free one.
        secret: the shared secret (non-empty).
        tls: accept only TLS connections with this context (docs/FORMAT.md §7.12).

    Returns (through ``task_status.started``):
        ``(host, port)`` actually bound, so that ``port=0`` works.

    Raises:
        DaemonRunningError: another ``octofs serve`` uses this root.
        DaemonError: the root cannot be used.
        OSError: the address cannot be bound.

    Cancellation: connections are cancelled, replicas made durable and closed, the
    control socket removed and the root lock released.
    """
    if not secret:
        raise ValueError("the shared secret must not be empty")
    root = Path(root)
    lock = TargetLock(root)
    try:
        lock.acquire()
    except OSError as exc:
        raise DaemonError(f"Cannot use {root} as the target root: {exc.strerror or exc}", reason=str(exc)) from exc
    try:
        server = TargetServer(root, secret, tls=tls)
        try:
            await trio.to_thread.run_sync(server.open_known)
            listeners = await trio.open_tcp_listeners(port, host=host)
            sockname = listeners[0].socket.getsockname()
            bound = (sockname[0], sockname[1])
            server.listen = format_address(*bound)
            if os.geteuid() != 0:
                log.warning("running as uid %d, not root: file owners are not reproduced on this target",
                            os.geteuid())
            async with trio.open_nursery() as nursery:
                handlers = {"status": server.status, **server.freezer.handlers()}
                server.control_handlers = handlers  # live: failover.py adds `reclaim`
                await nursery.start(serve_control, control_socket_path(root), handlers)
                nursery.start_soon(server.freezer.run)  # a freeze's maximum duration
                await nursery.start(trio.serve_listeners, server.handle, listeners)
                if with_server is not None:  # failover.py's watchers and health responder
                    nursery.start_soon(with_server, server)
                log.info("serving target root %s on %s", root, server.listen)
                task_status.started(bound)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(server.close_all)
    finally:
        lock.release()


def _write_epoch(replica: Replica, epoch: int) -> None:
    state.write_atomic(replica.state_dir / "epoch", f"{epoch}\n".encode(), 0o600)
    replica.epoch = epoch


def _released_epoch(root: Path, vault: str) -> int | None:
    """The epoch of a takeover recorded for ``vault`` (failover.py writes ``takeover.json``), or None."""
    try:
        record = json.loads((vault_state_dir(root, vault) / "takeover.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) and record.get("released", True) else None


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- Synchronize (docs/FORMAT.md §7.6) ---------------------------------------------------

_SYNC_MESSAGES = (protocol.SyncBegin, protocol.SyncQuery, protocol.Repair, protocol.SyncCheckpoint,
                  protocol.SyncEnd)


async def _sync_message(stream: trio.abc.Stream, peer: str, replica: Replica, msg: protocol.Message) -> None:
    """One Synchronize frame, in stream order (after every record before it was applied)."""
    try:
        if isinstance(msg, protocol.SyncQuery):
            results = await trio.to_thread.run_sync(replica.answer, msg.items, msg.block_size)
            await _send(stream, protocol.SyncAnswer(msg.req, replica.applied_seq, tuple(results),
                                                    tuple(replica.take_skipped())))
        elif isinstance(msg, protocol.Repair):
            records = _decode_batch(protocol.OpBatch(msg.records), peer)
            await trio.to_thread.run_sync(_repair_all, replica, records)
        elif isinstance(msg, protocol.SyncBegin):
            await trio.to_thread.run_sync(replica.begin_sync, msg.sync_id, msg.reset_seq, msg.verify)
        elif isinstance(msg, protocol.SyncCheckpoint):
            await trio.to_thread.run_sync(replica.checkpoint_sync, msg.sync_id, msg.cursor)
        elif isinstance(msg, protocol.SyncEnd):
            await trio.to_thread.run_sync(replica.end_sync, msg.sync_id, msg.differences)
    except OpError as exc:
        raise _Refused("apply", exc.message, logging.ERROR) from None
    except OSError as exc:
        raise _Refused("apply", f"vault {replica.vault}: {type(msg).__name__}: {exc}", logging.ERROR) from None


def _repair_all(replica: Replica, records: list[Record]) -> None:
    for rec in records:
        replica.apply_repair(rec)


# -- helpers -------------------------------------------------------------------------


async def _make_durable(replica: Replica) -> int:
    try:
        return await run_in_worker(replica.make_durable)
    except OpError as exc:
        raise _Refused("apply", exc.message, logging.ERROR) from None


def _apply_all(replica: Replica, records: list[Record]) -> None:
    """Apply a decoded batch in order (runs in a worker thread, or inline for a small one)."""
    try:
        for rec in records:
            replica.apply_record(rec)
    finally:
        replica.end_run()  # between batches every file has its exact mtime (replica.py, runs of data ops)


def _decode_batch(batch: protocol.OpBatch, peer: str) -> list[Record]:
    """Decode every record of a batch, or refuse the whole batch."""
    records = []
    for i, payload in enumerate(batch.records):
        try:
            records.append(codec.decode_record(payload))
        except OpError as exc:
            raise ProtocolError(peer=peer, reason=f"record {i} of a batch: {exc.message}") from None
    return records


async def _receive(stream: trio.abc.Stream, decoder: protocol.FrameDecoder, *,
                   silence_s: float | None = None) -> protocol.Message:
    """The next message. Raises ProtocolError, or _PeerGone on EOF or silence.

    Before authentication (``silence_s`` None) reads are small, so that unauthenticated
    connections cost little memory.
    """
    max_bytes = HANDSHAKE_MAX_FRAME_BYTES if silence_s is None else RECEIVE_BYTES
    while True:
        msg = decoder.next_message()
        if msg is not None:
            return msg
        with trio.move_on_after(math.inf if silence_s is None else silence_s) as scope:
            data = await stream.receive_some(max_bytes)
        if scope.cancelled_caught:
            raise _PeerGone(f"nothing received for {silence_s:g} s (heartbeats missed)", logging.WARNING)
        if not data:
            if decoder.buffered:
                raise _PeerGone(f"closed in the middle of a frame ({decoder.buffered} bytes of it received)",
                                logging.WARNING)
            raise _PeerGone("the primary closed the connection")
        decoder.feed(data)


async def _send(stream: trio.abc.Stream, msg: protocol.Message) -> None:
    frame = protocol.encode(msg)
    # The connection's task is its only sender: an ack the kernel takes at once needs no timeout
    # scope and no scheduler pass (a sixth of the serve's instructions per write + fsync batch; PERFORMANCE.md).
    sent = send_now(stream, frame)
    if sent == len(frame):
        return
    with trio.move_on_after(SEND_TIMEOUT_S) as scope:
        await stream.send_all(memoryview(frame)[sent:])
    if scope.cancelled_caught:
        raise _PeerGone(f"the primary did not take a {_kind(msg)} frame within {SEND_TIMEOUT_S:g} s", logging.WARNING)


async def _send_error(stream: trio.abc.Stream, code: str, message: str) -> None:
    """Best effort: the connection is being closed anyway."""
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    with trio.move_on_after(2):
        try:
            await stream.send_all(protocol.encode(protocol.Error(code, message)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            log.debug("could not send the %s error frame", code)


def _more_waiting(stream: trio.abc.Stream, decoder: protocol.FrameDecoder) -> bool:
    """Whether more input is already here (so making durable can wait for the end of the burst)."""
    if decoder.buffered:
        return True
    sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)  # under TLS: the TCP socket
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))  # timeout 0: never blocks


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "peer"
    try:
        addr = sock.getpeername()
    except OSError:
        return "peer"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return format_address(addr[0], addr[1])
    return str(addr) or "peer"


def _kind(msg: protocol.Message) -> str:
    return type(msg).__name__.lower()


__all__ = ["HANDSHAKE_TIMEOUT_S", "TargetServer", "format_address", "serve_target"]
