"""freeze.py: owns freezing a vault on a target, so that a backup reads a consistent replica dir.

``octofs freeze`` / ``octofs thaw`` / ``octofs snapshot`` (cli/freeze_cmd.py, cli/snapshot_cmd.py) talk to
the ``octofs serve`` daemon's control socket (commands ``freeze`` and ``thaw``, served by ``Freezer``).

How a freeze works. Every vault slot of the target server has a ``FreezeGate``. The replayer's connection
task reads its frames through ``FreezeGate.next_message``:

- not frozen: frames pass through unchanged;
- frozen: op batches and Synchronize frames are *held* in memory, in the order received, up to
  ``HOLD_BYTES``; heartbeats (and anything else) still pass, so the target keeps answering them with its
  unchanged durable seq and the primary keeps the connection. The primary's shipper stops sending when its
  window (16 MiB unacked) is full; everything after that waits durably in the primary's journal (its
  ``pending_ops`` grows). Beyond ``HOLD_BYTES`` (only possible with compressed batches) the gate stops
  reading the connection and sends an Ack of the durable seq every heartbeat interval instead, so that
  the primary still hears from the target;
- thawed: the held frames are handed out first, in order, then reading goes on.

``Freezer.freeze`` runs under the vault slot's lock (so no connection starts meanwhile): it marks the gate
holding, waits until the connection task has finished the frame it is working on (it then waits in the gate,
at a batch boundary), makes everything applied durable (syncfs) and records the seq, and the primary's time
of that seq (records carry ``time_ns``). Any prefix of the op stream, applied, is a state the primary had;
made durable, the replica dir is then crash-consistent (a database on a copy of it recovers as after a
power cut).

Invariants:
- **Nothing changes the replica dir while a vault is frozen**: no op, repair or Synchronize frame is applied
  (they are held). A freeze ends by ``thaw``, by its maximum duration (logged at WARNING and kept in status
  as ``last_freeze.how == "expired"``), by a takeover of the vault (failover), or when ``octofs serve`` stops.
- **Only a consistent copy is frozen**: a vault with a Synchronize under way, or needing one, is refused.
- **Frames are applied in the order received, exactly as without a freeze.** Held frames belong to their
  connection: when it ends they are dropped (the primary resends everything after the acked seq).
- **Nothing is lost**: what is not held here stays in the primary's journal.

The seq → primary time mapping survives restarts in ``ROOT/.octofs/vaults/NAME/applied_time`` (u64le seq,
u64le time_ns of that record; written with ``pwrite`` after each applied batch, never fsynced: it is only
used when its seq is exactly the replica's applied seq).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from octofs import codec, protocol
from octofs.control import ControlRequestError
from octofs.errors import OpError

log = logging.getLogger(__name__)

# Held frames (record payload bytes) beyond which the gate stops reading the connection.
HOLD_BYTES = 64 * 2**20
DEFAULT_MAX_S = 3600.0
# How long a freeze waits for the connection task to finish the frame it is working on.
IDLE_TIMEOUT_S = 60.0
# Frames that change the replica dir, or must be answered in stream order: held while frozen.
HOLDABLE = (protocol.OpBatch, protocol.SyncBegin, protocol.SyncQuery, protocol.Repair, protocol.SyncCheckpoint,
            protocol.SyncEnd)
_APPLIED_TIME = struct.Struct("<QQ")  # seq, time_ns
APPLIED_TIME_FILE = "applied_time"


def _frame_bytes(msg: object) -> int:
    records = getattr(msg, "records", None)
    return sum(len(r) for r in records) if records else 256


class FreezeGate:
    """One vault's freeze state, and the path its connection's frames take to the replayer.

    Attributes:
        info: the freeze in force (``id``, ``seq``, ``primary_time_ns``, ``since``, ``until``, ``max_s``;
            times in Unix seconds), or None.
        last: the last freeze that ended (``info`` plus ``ended`` and ``how``: thawed, expired, taken over),
            or None.
        primary_last_seq: the highest seq the primary is known to have journaled (its heartbeats, the
            batches held), or None.
    """

    def __init__(self, vault: str = "") -> None:
        self.vault = vault
        self.info: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self.holding = False  # frozen, or being frozen: frames that change the replica are held
        self.deadline: float | None = None  # trio time at which the freeze ends by itself
        self.primary_last_seq: int | None = None
        self.reading = True
        self._released = trio.Event()
        self._held: deque = deque()
        self._held_bytes = 0
        self._busy = False  # the connection task may be changing the replica (between two next_message calls)
        self._idle = trio.Event()
        self._idle.set()
        self._wake: trio.CancelScope | None = None
        self._exclusive: trio.Event | None = None  # set while a freeze makes the replica durable
        self._prev: object = None
        self._prev_last: tuple[int, int] | None = None  # (seq, time_ns) of _prev's last record, if told
        self._replica: Any = None
        self._time_fd: int | None = None
        self._applied_time: tuple[int, int] | None = None

    # -- the connection's side ---------------------------------------------------------

    @contextlib.contextmanager
    def attached(self, replica: Any) -> Iterator[FreezeGate]:
        """Around one connection's replay: from here until its first ``next_message`` it is busy
        (the Welcome's make-durable); on the way out its held frames are dropped."""
        self._replica = replica
        self.vault = replica.vault
        self._held.clear()
        self._held_bytes = 0
        self._set_busy(True)
        try:
            self._time_fd = os.open(replica.state_dir / APPLIED_TIME_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        except OSError as exc:
            log.warning("vault %s: cannot open %s: %s (the primary's time of a frozen seq may be unknown)",
                        self.vault, APPLIED_TIME_FILE, exc)
        try:
            yield self
        finally:
            self._prev = self._prev_last = None
            self._held.clear()
            self._held_bytes = 0
            self.reading = True
            if self._time_fd is not None:
                os.close(self._time_fd)
                self._time_fd = None
            self._replica = None
            self._set_busy(False)

    async def next_message(self, receive: Callable[[], Awaitable[object]], *,
                           keepalive: Callable[[], Awaitable[None]], keepalive_s: float) -> Any:
        """The next frame for the replayer to handle. Calling it again means the last one was handled.

        Args:
            receive: reads the next frame from the connection.
            keepalive: sends an Ack of the unchanged durable seq (while the gate does not read).
            keepalive_s: how often (the primary's heartbeat interval).
        """
        self._done_with_previous()
        while True:
            if not self.holding and self._held:
                msg = self._held.popleft()
                self._held_bytes -= _frame_bytes(msg)
                self._prev = msg
                self._set_busy(True)
                return msg
            if self.holding and self._held_bytes >= HOLD_BYTES:
                if self.reading:
                    log.info("vault %s: %d bytes of frames held while frozen; not reading more until the thaw",
                             self.vault, self._held_bytes)
                self.reading = False
                with trio.move_on_after(keepalive_s):
                    await self._released.wait()
                if self.holding:
                    await keepalive()
                continue
            self.reading = True
            if not self._held:
                # Nothing held: a thaw has nothing to hand out first, so nothing needs to wake this
                # receive (only this task adds to _held, after it returns). No cancel scope then: one
                # costs ≈ 8 µs, per op batch (docs/PERFORMANCE.md).
                msg = await receive()
            else:
                with trio.CancelScope() as scope:
                    self._wake = scope
                    try:
                        msg = await receive()
                    finally:
                        self._wake = None
                if scope.cancelled_caught:  # thawed while waiting, with frames held: hand those out first
                    continue
            if isinstance(msg, protocol.Heartbeat):
                self.primary_last_seq = max(self.primary_last_seq or 0, msg.last_seq)
            if isinstance(msg, HOLDABLE) and self.holding:
                self._held.append(msg)
                self._held_bytes += _frame_bytes(msg)
                self._note_received(msg)
                continue
            # Busy with any frame, not only the holdable ones: answering a heartbeat may make applied
            # ops durable, which must not run beside a freeze's own make-durable (which waits for it to
            # end, and which it waits for).
            while self._exclusive is not None:
                await self._exclusive.wait()
            self._prev = msg
            self._set_busy(True)
            return msg

    def _note_received(self, msg: object) -> None:
        """The primary has journaled at least the last seq of a held batch (for the backlog in status)."""
        if isinstance(msg, protocol.OpBatch) and msg.records:
            try:
                seq = codec.decode_record(msg.records[-1]).seq
            except OpError:
                return  # refused as a whole when it is applied
            self.primary_last_seq = max(self.primary_last_seq or 0, seq)

    def applied(self, seq: int, time_ns: int) -> None:
        """The connection task has applied the batch it was handed, ending with record ``seq`` of
        ``time_ns``: spares decoding that record again (docs/PERFORMANCE.md)."""
        self._prev_last = (seq, time_ns)

    def _done_with_previous(self) -> None:
        prev, self._prev = self._prev, None
        last, self._prev_last = self._prev_last, None
        if isinstance(prev, protocol.OpBatch) and prev.records and self._replica is not None:
            if last is None:
                try:
                    rec = codec.decode_record(prev.records[-1])
                except OpError:
                    rec = None
                last = (rec.seq, rec.time_ns) if rec is not None else None
            if last is not None and last[0] == self._replica.applied_seq:
                self._applied_time = last
                if self._time_fd is not None:
                    try:
                        os.pwrite(self._time_fd, _APPLIED_TIME.pack(*last), 0)
                    except OSError as exc:
                        log.debug("vault %s: cannot write %s: %s", self.vault, APPLIED_TIME_FILE, exc)
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        if busy and not self._busy:
            self._idle = trio.Event()
        elif not busy and self._busy:
            self._idle.set()
        self._busy = busy

    # -- the freezer's side ----------------------------------------------------------------

    def hold(self) -> None:
        """Start holding frames (the first step of a freeze)."""
        self.holding = True
        self._released = trio.Event()

    def release(self) -> None:
        """Stop holding frames; a connection task waiting for input hands the held ones out now."""
        self.holding = False
        self.deadline = None
        self._released.set()
        if self._held and self._wake is not None:
            self._wake.cancel()

    async def wait_idle(self, conn_done: trio.Event | None) -> None:
        """Until the connection task is not in the middle of a frame (or the connection has ended)."""
        if not self._busy or conn_done is None or conn_done.is_set():
            return
        async with trio.open_nursery() as nursery:
            for event in (self._idle, conn_done):
                nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)

    def primary_time_ns(self, seq: int, state_dir: os.PathLike) -> int | None:
        """The primary's time of the record ``seq`` if known (the last applied batch, or the file)."""
        if self._applied_time is not None and self._applied_time[0] == seq:
            return self._applied_time[1]
        try:
            with open(os.path.join(state_dir, APPLIED_TIME_FILE), "rb") as f:
                raw = f.read(_APPLIED_TIME.size)
        except OSError:
            return None
        if len(raw) != _APPLIED_TIME.size:
            return None
        file_seq, time_ns = _APPLIED_TIME.unpack(raw)
        return time_ns if file_seq == seq else None

    @property
    def held_frames(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def status(self) -> dict[str, Any]:
        """The vault's freeze fields for the target's status document (docs/CLI_JSON.md)."""
        frozen = None
        if self.info is not None:
            frozen = dict(self.info)
            frozen.update(
                held_frames=len(self._held),
                held_bytes=self._held_bytes,
                reading=self.reading,
                primary_last_seq=self.primary_last_seq,
                backlog_ops=None if self.primary_last_seq is None else max(0, self.primary_last_seq - frozen["seq"]),
            )
        return {"frozen": frozen, "last_freeze": self.last}


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class Freezer:
    """The target server's control commands ``freeze`` and ``thaw``, and the maximum-duration watch.

    Args:
        slot_of: vault name → the server's slot for it (``.lock``, ``.replica``, ``.conn``, ``.freeze``,
            ``.released_epoch``, ``.error``), or None.
        vaults: the names of the vaults the server knows (for messages).
    """

    def __init__(self, slot_of: Callable[[str], Any], vaults: Callable[[], list[str]]) -> None:
        self._slot_of = slot_of
        self._vaults = vaults
        self._frozen: dict[str, FreezeGate] = {}
        self._changed = trio.Event()

    def handlers(self) -> dict[str, Callable[[dict], Awaitable[dict]]]:
        return {"freeze": self.freeze_request, "thaw": self.thaw_request}

    # -- freeze ----------------------------------------------------------------------

    async def freeze_request(self, request: dict) -> dict:
        vault = request.get("vault")
        max_s = request.get("max_s", DEFAULT_MAX_S)
        if not isinstance(vault, str):
            raise ControlRequestError("freeze: no vault named")
        if not isinstance(max_s, (int, float)) or isinstance(max_s, bool) or not (0 < max_s < math.inf):
            raise ControlRequestError(f"freeze: bad maximum duration {max_s!r}")
        return await self.freeze(vault, float(max_s))

    async def freeze(self, vault: str, max_s: float) -> dict:
        """Freeze ``vault``; returns the freeze (``id``, ``seq``, ``primary_time_ns``, ``since``, ``until``, ...).

        Raises:
            ControlRequestError: the vault is unknown here, taken over, already frozen, not consistent.
        """
        slot = self._slot(vault)
        gate: FreezeGate = slot.freeze
        gate.vault = vault
        if gate.holding:
            raise ControlRequestError(self._already(vault, gate))
        async with slot.lock:
            if gate.holding:  # another freeze got the lock first
                raise ControlRequestError(self._already(vault, gate))
            replica = self._replica(vault, slot)
            _check_consistent(vault, replica)
            gate.hold()
            try:
                conn = slot.conn
                with trio.move_on_after(IDLE_TIMEOUT_S) as scope:
                    await gate.wait_idle(conn.done if conn is not None else None)
                if scope.cancelled_caught:
                    raise ControlRequestError(f"vault {vault}: the replay did not reach a batch boundary within "
                                              f"{IDLE_TIMEOUT_S:g} s; try again")
                _check_consistent(vault, replica)  # a Synchronize may have started with the last frame
                gate._exclusive = trio.Event()  # the connection task hands out no frame meanwhile
                try:
                    seq = await trio.to_thread.run_sync(replica.make_durable)
                except OpError as exc:
                    raise ControlRequestError(f"vault {vault}: cannot make the replica durable: {exc.message}") from None
                finally:
                    gate._exclusive.set()
                    gate._exclusive = None
            except BaseException:
                gate.release()
                raise
            now = time.time()
            gate.info = {
                "id": secrets.token_hex(8),
                "seq": seq,
                "primary_time_ns": gate.primary_time_ns(seq, replica.state_dir),
                "since": round(now, 3),
                "until": round(now + max_s, 3),
                "max_s": max_s,
                "replica_dir": str(replica.replica_dir),
            }
            gate.deadline = trio.current_time() + max_s
            self._frozen[vault] = gate
            self._changed.set()
        log.info("vault %s frozen at seq %d (freeze %s, at most %g s)", vault, seq, gate.info["id"], max_s)
        return {"vault": vault, **gate.info}

    # -- thaw ------------------------------------------------------------------------

    async def thaw_request(self, request: dict) -> dict:
        vault = request.get("vault")
        freeze_id = request.get("id")
        if not isinstance(vault, str):
            raise ControlRequestError("thaw: no vault named")
        if freeze_id is not None and not isinstance(freeze_id, str):
            raise ControlRequestError(f"thaw: bad freeze id {freeze_id!r}")
        return self.thaw(vault, freeze_id)

    def thaw(self, vault: str, freeze_id: str | None = None) -> dict:
        """Thaw ``vault``. With ``freeze_id``, only that freeze; the reply's ``status`` says what happened:
        ``thawed``, ``already_thawed`` (not frozen; ``last_freeze`` says how the last one ended), or
        ``not_this_freeze`` (another freeze is in force; nothing is changed)."""
        slot = self._slot(vault)
        gate: FreezeGate = slot.freeze
        info = gate.info
        if info is None:
            return {"vault": vault, "status": "already_thawed", "last_freeze": gate.last}
        if freeze_id is not None and freeze_id != info["id"]:
            return {"vault": vault, "status": "not_this_freeze", "frozen": gate.status()["frozen"],
                    "last_freeze": gate.last}
        ended = self.end(vault, gate, "thawed")
        return {"vault": vault, "status": "thawed", "last_freeze": ended}

    def end(self, vault: str, gate: FreezeGate, how: str) -> dict | None:
        """End the freeze of ``vault`` (thawed, expired, taken over); returns its record, or None."""
        info = gate.info
        if info is None:
            return None
        now = time.time()
        held = gate.held_frames
        gate.last = {**info, "ended": round(now, 3), "how": how, "duration_s": round(now - info["since"], 3)}
        gate.info = None
        gate.release()
        self._frozen.pop(vault, None)
        self._changed.set()
        if how == "expired":
            log.warning("vault %s: freeze %s (seq %d) outlived its maximum duration of %g s and thawed by itself; "
                        "a backup still reading %s no longer sees a consistent copy", vault, info["id"], info["seq"],
                        info["max_s"], info["replica_dir"])
        else:
            log.info("vault %s: freeze %s (seq %d) ended (%s) after %.1f s; %d held frame(s) applied next", vault,
                     info["id"], info["seq"], how, now - info["since"], held)
        return gate.last

    # -- the maximum duration ------------------------------------------------------------

    async def run(self) -> None:
        """End each freeze at its maximum duration, until cancelled."""
        while True:
            self._changed = trio.Event()
            now = trio.current_time()
            for vault, gate in list(self._frozen.items()):
                if gate.deadline is not None and gate.deadline <= now:
                    self.end(vault, gate, "expired")
            deadlines = [g.deadline for g in self._frozen.values() if g.deadline is not None]
            with trio.move_on_at(min(deadlines, default=math.inf)):
                await self._changed.wait()

    # -- helpers -----------------------------------------------------------------------

    def _slot(self, vault: str) -> Any:
        slot = self._slot_of(vault)
        if slot is None:
            known = ", ".join(self._vaults()) or "none"
            raise ControlRequestError(f"vault {vault} is not received here (vaults: {known})")
        return slot

    @staticmethod
    def _replica(vault: str, slot: Any) -> Any:
        if slot.released_epoch is not None:
            raise ControlRequestError(f"vault {vault} was taken over here (epoch {slot.released_epoch}): "
                                      "its replica dir belongs to a mount now")
        if slot.replica is None:
            raise ControlRequestError(f"vault {vault}: {slot.error or 'the replica is not open'}")
        return slot.replica

    @staticmethod
    def _already(vault: str, gate: FreezeGate) -> str:
        info = gate.info
        if info is None:
            return f"vault {vault} is being frozen by another request"
        return (f"vault {vault} is already frozen (freeze {info['id']} at seq {info['seq']}, since "
                f"{_iso(info['since'])}, until {_iso(info['until'])}); thaw it first")


def _check_consistent(vault: str, replica: Any) -> None:
    if replica.needs_resync is not None:
        raise ControlRequestError(f"vault {vault} is not a state the primary had (it needs a resync: "
                                  f"{replica.needs_resync}); it cannot be frozen for a backup")
    if replica.sync is not None:
        raise ControlRequestError(f"vault {vault}: a Synchronize is under way (the replica is inconsistent until "
                                  "it completes); freeze it after that (`octofs status --root` shows it)")


def _iso(unix_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


__all__ = ["DEFAULT_MAX_S", "HOLD_BYTES", "FreezeGate", "Freezer"]
