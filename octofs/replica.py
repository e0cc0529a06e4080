"""replica.py: owns one vault's replica dir on a target and the target's state beside it.

Layout of a target root (docs/FORMAT.md §7, Target state dir)::

    ROOT/NAME/                          the replica dir of vault NAME: exactly the vault's files
    ROOT/.octofs/lock                   flock held by the one `octofs serve` using ROOT
    ROOT/.octofs/control.sock           the serve daemon's control socket
    ROOT/.octofs/vaults/NAME/vault_id   the vault identity recorded at first contact (hex)
    ROOT/.octofs/vaults/NAME/epoch      the highest epoch seen (decimal)
    ROOT/.octofs/vaults/NAME/position   u64le durable seq, u64le touched seq (fdatasync'ed)
    ROOT/.octofs/vaults/NAME/progress   u64le applied seq, u64le in-flight seq, 16-byte boot id
    ROOT/.octofs/vaults/NAME/needs_resync   present (with the reason) when ops could not be applied
    ROOT/.octofs/vaults/NAME/syncing    present (JSON: id, cursor, seq) while a Synchronize is under way
    ROOT/.octofs/vaults/NAME/synced     present once a Synchronize has completed

Vault names never start with '.', so ``.octofs`` can never be a replica dir.

Invariants:

- **Seq order, exactly once (DESIGN invariant 1).** ``apply_record`` applies seq
  ``applied_seq + 1`` only; a lower seq is a duplicate (a resend after a reconnect)
  and is skipped, a higher one is a gap and is refused with ProtocolError.
- **Barriers (invariant 2).** An FsyncOp is followed by ``make_durable()`` before
  ``apply_record`` returns, so nothing after a barrier is applied before everything
  up to it is durable. ``make_durable`` runs ``syncfs`` *before* it writes
  ``position``: the durable seq is never on disk ahead of the data it names —
  except while "touched: unknown" is durable (a busy barrier), when the new
  durable seq is written just before the ``syncfs`` that makes it durable: a power
  cut then marks the vault ``needs_resync`` whatever the durable seq says.
- **Confinement (invariant 5).** Ops go through ``apply.apply_op`` relative to an fd
  of ``ROOT/NAME`` opened with ``O_NOFOLLOW``; the few look-ups made here (crash
  tolerance) walk the path the same way, never following a symlink.
- **Nothing silently lost (invariant 4).** An op that cannot be applied marks the
  vault ``needs_resync`` (with the reason) and nothing more is applied until a
  Synchronize clears it.

Crash safety. ``progress`` is written with ``pwrite`` and never fsynced: it lives in
the page cache, which survives a kill of this process but not of the machine.

- *Process killed* (SIGKILL, OOM, bug): every op up to ``progress.applied`` took
  full effect (in a run of data ops, all but its mtime: see below); the op named ``progress.in_flight`` (written just before it was
  started) may be half done. On open, ``applied_seq = max(position, progress)`` and
  for that one op only "already done" outcomes are tolerated: UnlinkOp/RmdirOp
  ENOENT; RenameOp with the source gone and the destination present; LinkOp EEXIST
  where the destination is the source's inode (Create/Mkdir/Mknod/Symlink and the
  data ops are already harmless twice, see apply.py). A half-done RENAME_EXCHANGE
  cannot be told from a done one (both names exist either way), so it marks the
  vault for resync instead. Exactly once holds across any number of kills.
- *Machine went down* (power cut, kernel crash, reboot without a clean stop): the
  page cache is gone, and with it the knowledge of which ops after the durable
  position reached the disk. The boot id in ``progress`` tells the two cases apart.
  ``position`` carries a second seq, *touched*: the highest seq whose effects may
  be on disk. It is made durable (``UNKNOWN_SEQ``) before the first op after each
  durable point is applied, and reset to the durable seq by ``make_durable``. After
  a reboot: touched == durable → nothing after the durable seq was applied, resume
  exactly; touched == durable + 1 → that op may be half done, tolerate it as above;
  otherwise ops after the durable seq may be partly on disk, in an order the primary
  never had: the vault is marked ``needs_resync`` (it is not guessed at). So a
  power cut during replay costs a Synchronize, never a silent divergence; a power
  cut while idle (the common case) costs nothing. The price is one extra
  ``fdatasync`` of a 16-byte file per durable point.

Runs of data ops. Consecutive data ops (WriteOp, TruncateOp) on one path — a buffered
write stream, a database commit — share one fd (``_DataRun``): opened by the first
through ``apply.open_data``, exactly ``apply_op``'s open (validated, the confined walk,
regular files only, ``O_NOFOLLOW``), so confinement is as strong as for any op. A CreateOp
starts a run with the new file's own fd (``apply.create_open``: apply_op's create, the fd
kept), with no mtime to set at its end, so the writes that follow a create (small files, a
SQLite rollback journal) need no walk and open of their own; the create itself is recorded
"done" at once, like any op that is not a data op. The
file's mtime is set once, to the run's last op's ``mtime_ns``, when the run ends
(``end_run``): before any other op is applied (any other path, any namespace, metadata
or xattr op, a barrier), before ``make_durable``/``settle``, at the end of every batch
(the replayer), before every Synchronize method (answer, repair, begin, checkpoint,
end) and at close. So whatever a barrier makes durable, a Synchronize answer describes,
a freeze shows or a status reports, files have their exact mtime; only a reader of the
replica dir *during* a batch may see a run's data with an earlier write's mtime.
Nothing else writes to the replica dir (apply.py's threat model), so the path still
names the fd's file for the whole run. Crash safety: before each op ``progress`` gets
``(applied, in flight)`` in one write, and a data op in a run records no "done" after
it (``end_run`` does, after the mtime). A process killed during a run therefore leaves
``applied`` = the seq before the last op started, ``in_flight`` = that op: the restart
re-applies it as the half-done op (through ``apply_op``, mtime included), which gives
the file its data and the run's mtime at that point; the earlier ops of the run took
full effect but for their mtime, which that last op's supersedes. Until the primary
resends that op the file's mtime may be older than its data (as a half-done op leaves
its file between two states); a kill between ops used to leave none, now it does
whenever a run was open. A power cut is unaffected: a run is always after the
durable point, where touched is unknown.

Thread use: one thread at a time calls the mutating methods (the replayer runs at
most one connection per vault and calls them in a worker thread (``threads.run_in_worker``)); reading
the plain attributes from another thread is fine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import NoReturn

from octofs import apply, scan, state
from octofs.errors import (
    DaemonRunningError,
    OpError,
    PeerEpochError,
    PeerError,
    ProtocolError,
)
from octofs.ops import (
    RENAME_EXCHANGE,
    CreateOp,
    FsyncOp,
    LinkOp,
    Op,
    Record,
    RenameOp,
    RmdirOp,
    TruncateOp,
    UnlinkOp,
    WriteOp,
    op_paths,
)
from octofs.state import current_boot_id

log = logging.getLogger(__name__)

STATE_DIR_NAME = ".octofs"
UNKNOWN_SEQ = 2**64 - 1  # "touched" value: ops after the durable seq may be on disk

# The same rule as config.py's vault names (a lower layer may not import config):
# a portable folder name that never starts with '.', '-' or '_'.
_VAULT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

_POSITION = struct.Struct("<QQ")  # durable seq, touched seq
_PROGRESS = struct.Struct("<QQ16s")  # applied seq, in-flight seq (0 = none), boot id
_PROGRESS_DONE = struct.Struct("<QQ")  # the first two fields, rewritten before and after each op


# -- target root layout ---------------------------------------------------------


def state_root(root: Path) -> Path:
    """``ROOT/.octofs``: everything of the target's own, beside the replica dirs."""
    return Path(root) / STATE_DIR_NAME


def vault_state_dir(root: Path, vault: str) -> Path:
    return state_root(root) / "vaults" / vault


def control_socket_path(root: Path) -> Path:
    return state_root(root) / "control.sock"


def lock_path(root: Path) -> Path:
    return state_root(root) / "lock"


def check_vault_name(vault: object) -> str:
    """Return ``vault`` if it is a valid vault name (a safe folder name), else raise ValueError."""
    if not isinstance(vault, str) or not _VAULT_NAME_RE.match(vault):
        raise ValueError(
            f"bad vault name {vault!r}: expected 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return vault


def known_vaults(root: Path) -> list[str]:
    """Names of the vaults that have state under ``ROOT/.octofs/vaults/``, sorted."""
    try:
        entries = os.listdir(state_root(root) / "vaults")
    except FileNotFoundError:
        return []
    return sorted(name for name in entries if _VAULT_NAME_RE.match(name))


class TargetLock:
    """Exclusive, process-lifetime lock of a target root: one ``octofs serve`` per root.

    An flock, so the kernel drops it when the process dies (a SIGKILLed serve never
    leaves a stale lock).
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, creating ``ROOT/.octofs`` if needed.

        Raises:
            DaemonRunningError: another process holds it.
            OSError: ROOT/.octofs cannot be created or opened.
        """
        state_root(self._root).mkdir(mode=0o700, exist_ok=True)
        path = lock_path(self._root)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonRunningError(
                f"Another octofs serve is using root {self._root} ({path} is locked)",
                vault="", state_dir=str(state_root(self._root)),
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- the replica ------------------------------------------------------------------


class Replica:
    """One vault's replica dir on a target, and its replay position.

    Use ``Replica.open``; call ``close`` when done.

    Attributes:
        vault: the vault name (the folder ``ROOT/NAME``).
        replica_dir: ``ROOT/NAME``.
        state_dir: ``ROOT/.octofs/vaults/NAME``.
        vault_id: the identity recorded at first contact, or None before it.
        epoch: the highest epoch a primary presented (0 before first contact).
        applied_seq: the last seq applied (in the page cache; maybe not durable).
        durable_seq: the last seq made durable: what the target acks.
        owners: whether file owners are reproduced (only root may give files away).
        needs_resync: why the vault must be synchronized before more ops are
            applied, or None.
    """

    def __init__(self, vault: str, root: Path, fd: int) -> None:
        self.vault = vault
        self.root = Path(root)
        self.replica_dir = self.root / vault
        self.state_dir = vault_state_dir(self.root, vault)
        self.owners = os.geteuid() == 0
        self.vault_id: bytes | None = None
        self.epoch = 0
        self.applied_seq = 0
        self.durable_seq = 0
        self.needs_resync: str | None = None
        self._fd: int | None = fd
        self._pos_fd: int | None = None
        self._prog_fd: int | None = None
        self.sync: dict | None = None  # the Synchronize under way: {"id", "cursor", "seq"} (hex id, hex cursor)
        self.synced = False  # a Synchronize has completed here at least once
        self.verifying: bytes | None = None  # id of a --verify-only pass on the live connection
        self.skipped_paths: list[bytes] = []  # paths of ops skipped during a Synchronize, not yet reported
        self._touched = 0  # the touched seq currently durable in `position`
        self._half_done: int | None = None  # the one seq whose "already done" outcomes are tolerated
        self._run: _DataRun | None = None  # the data fd kept open across a run of data ops (module docstring)

    # -- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, vault: str) -> Replica:
        """Open (creating if needed) the replica dir ``ROOT/NAME`` and its state.

        Recovers from a crash of an earlier process (see the module docstring) and
        makes everything applied so far durable.

        Raises:
            ValueError: ``vault`` is not a valid vault name.
            OSError: the replica dir or the state dir cannot be created or opened
                (``ROOT/NAME`` is a symlink or not a directory: ELOOP/ENOTDIR).
        """
        check_vault_name(vault)
        root = Path(root)
        sdir = vault_state_dir(root, vault)
        sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            created = False
            try:
                os.mkdir(vault, 0o755, dir_fd=root_fd)
                created = True
            except FileExistsError:
                pass
            # O_NOFOLLOW: a symlink planted at ROOT/NAME must not redirect the replica.
            fd = os.open(vault, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
            if created:
                os.fsync(root_fd)
        finally:
            os.close(root_fd)
        replica = cls(vault, root, fd)
        try:
            replica._load(created)
        except BaseException:
            replica._close_fds()
            raise
        return replica

    def _load(self, created: bool) -> None:
        sdir = self.state_dir
        with contextlib.suppress(FileNotFoundError):
            self.vault_id = bytes.fromhex((sdir / "vault_id").read_text().strip())
        with contextlib.suppress(FileNotFoundError):
            self.epoch = int((sdir / "epoch").read_text().strip())
        self.needs_resync = state.needs_resync(sdir)
        with contextlib.suppress(FileNotFoundError, ValueError):
            loaded = json.loads((sdir / "syncing").read_text())
            if isinstance(loaded, dict) and {"id", "cursor", "seq"} <= loaded.keys():
                self.sync = loaded
        self.synced = (sdir / "synced").exists()

        pos_path = sdir / "position"
        if not pos_path.exists():
            state.write_atomic(pos_path, _POSITION.pack(0, 0), 0o600)
        self._pos_fd = os.open(pos_path, os.O_RDWR | os.O_CLOEXEC)
        raw = os.pread(self._pos_fd, _POSITION.size, 0)
        if len(raw) != _POSITION.size:
            self.mark_needs_resync(f"the position file {pos_path} is damaged ({len(raw)} bytes)")
            raw = _POSITION.pack(0, UNKNOWN_SEQ)
        durable, touched = _POSITION.unpack(raw)

        prog_path = sdir / "progress"
        self._prog_fd = os.open(prog_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        raw = os.pread(self._prog_fd, _PROGRESS.size, 0)
        boot = current_boot_id()
        if len(raw) == _PROGRESS.size and _PROGRESS.unpack(raw)[2] == boot:
            # Only this process died (or it stopped cleanly): the page cache holds
            # every op up to `applied`, and `in_flight` names the one that may be half done.
            applied, in_flight, _ = _PROGRESS.unpack(raw)
            applied = max(applied, durable)
            half = in_flight if in_flight == applied + 1 else None
        else:
            # First open, or the machine went down since: only `position` is known.
            applied = durable
            half = None
            if touched == durable + 1:
                half = touched
            elif touched != durable:
                self.mark_needs_resync(
                    f"the target went down (power cut or crash) while ops after seq {durable} were being "
                    "applied; some of them may be partly on disk"
                )
        if created and applied > 0:
            self.mark_needs_resync(f"the replica dir {self.replica_dir} was missing (applied seq was {applied})")
        self.applied_seq = applied
        self.durable_seq = durable
        self._touched = touched
        self._half_done = half
        os.pwrite(self._prog_fd, _PROGRESS.pack(applied, half or 0, boot), 0)
        if half is not None:
            log.info("vault %s: op seq %d may have been half applied when the last replay stopped; "
                     "it is re-applied, tolerating what is already done", self.vault, half)
        if self.needs_resync is None and (applied > durable or touched not in (durable, durable + 1)):
            self.make_durable()
            self.settle()

    # -- peers -----------------------------------------------------------------

    def check_peer(self, vault_id: bytes, epoch: int, *, peer: str = "the primary") -> None:
        """Check the identity and epoch a primary presents; record them at first contact.

        Args:
            vault_id: the 16-byte vault identity from the primary's Hello.
            epoch: the primary's epoch.
            peer: a name for messages.

        Raises:
            PeerError: this vault name belongs to another vault identity here.
            PeerEpochError: the primary's epoch is lower than one already seen (it is stale).
        """
        if self.vault_id is None:
            state.write_atomic(self.state_dir / "vault_id", vault_id.hex().encode() + b"\n", 0o600)
            self.vault_id = vault_id
            log.info("vault %s: first contact, recorded vault id %s", self.vault, vault_id.hex())
        elif vault_id != self.vault_id:
            reason = (
                f"vault {self.vault} on this target has vault id {self.vault_id.hex()}, but {peer} presents "
                f"vault id {vault_id.hex()}: a different vault with the same name is refused"
            )
            raise PeerError(f"Peer {peer}: {reason}", peer=peer, reason=reason)
        if epoch < self.epoch:
            raise PeerEpochError(
                f"Peer {peer} has epoch {epoch} for vault {self.vault}, lower than the epoch {self.epoch} "
                "this target has seen: that primary is stale (a failover happened)",
                peer=peer, theirs=epoch, ours=self.epoch,
            )
        if epoch > self.epoch:
            state.write_atomic(self.state_dir / "epoch", f"{epoch}\n".encode(), 0o600)
            self.epoch = epoch

    # -- applying ----------------------------------------------------------------

    def apply_record(self, rec: Record) -> None:
        """Apply one record in seq order (exactly once).

        Raises:
            ProtocolError: ``rec.seq`` leaves a gap after ``applied_seq``.
            OpError: the vault needs a resync, or the op could not be applied; in the
                latter case the vault is now marked ``needs_resync`` with the reason.
        """
        seq = rec.seq
        if self.needs_resync is not None:
            raise OpError(f"Vault {self.vault} needs a resync ({self.needs_resync}): seq {seq} is not applied")
        if seq <= self.applied_seq:
            log.debug("vault %s: skipping seq %d, already applied (applied seq %d)", self.vault, seq, self.applied_seq)
            return
        if seq != self.applied_seq + 1:
            raise ProtocolError(
                peer="the primary",
                reason=f"record seq {seq} for vault {self.vault} does not follow the applied seq "
                f"{self.applied_seq} (a gap)",
            )
        assert self._fd is not None and self._prog_fd is not None
        op = rec.op
        joins = type(op) in apply.DATA_OPS and seq != self._half_done  # a data op: it may join a run
        run = self._run
        ran = None  # the path of the run this op ends, if any
        if run is not None and not (joins and op.path == run.path):
            ran = run.path
            self.end_run()  # anything else: the run's mtime is set and its fd closed first
        try:
            if self._touched != UNKNOWN_SEQ:
                # Durable before this op can reach the disk: "ops after the durable seq
                # may be on disk" (module docstring, machine went down).
                self._write_position(self.durable_seq, UNKNOWN_SEQ)
            # (applied, in flight) in one write: during a run, ``applied`` on disk stays one
            # behind, so a restart re-applies this op, whose mtime is the one that counts.
            os.pwrite(self._prog_fd, _PROGRESS_DONE.pack(self.applied_seq, seq), 0)
        except OSError as exc:
            self._fail(f"cannot record progress before seq {seq}: {exc.strerror or exc}", exc)
        deferred = False
        try:
            if joins:
                self._apply_data(seq, op)
                deferred = True
            elif seq == self._half_done:
                self._apply_half_done(rec.op)
            elif isinstance(rec.op, FsyncOp):
                # The barrier below (syncfs) makes this file durable with everything else: an
                # fsync of it first would be a second flush for nothing. Still checked: the path
                # must be a file or directory of the replica — known already when it ends a run of
                # data ops on that path (the run's fd was opened through the same confined walk and
                # nothing was applied since), the usual commit: write(s) + fsync of one file.
                if rec.op.path != ran and scan.lstat(self._fd, rec.op.path) is None:
                    raise FileNotFoundError(errno.ENOENT, "No such file or directory", rec.op.path)
            elif type(op) is CreateOp:
                # The new file's fd starts a run (with nothing to set at its end: the create set
                # the mtime), so the writes that usually follow need no walk and open of their own.
                self._run = _DataRun(op.path, apply.create_open(self._fd, op, chown=self.owners))
            else:
                apply.apply_op(self._fd, rec.op, chown=self.owners)
        except (OSError, OpError) as exc:
            if self._run is not None:  # the run ends at the last op that was applied
                with contextlib.suppress(OSError, OpError):
                    self.end_run()
                self._drop_run()
            if self.sync is not None and _state_mismatch(exc):
                # A Synchronize is under way: this path is not repaired yet. Skip the op and tell
                # the primary, which compares the paths again (repairs are state-setting).
                log.debug("vault %s: seq %d (%s) skipped during a Synchronize: %s", self.vault, seq,
                          _describe(rec.op), exc)
                self.skipped_paths.extend(op_paths(rec.op))
            else:
                detail = exc.message if isinstance(exc, OpError) else (exc.strerror or str(exc))
                self._fail(f"cannot apply seq {seq} ({_describe(rec.op)}): {detail}", exc)
        self._half_done = None
        self.applied_seq = seq
        if deferred:
            return  # "done" is recorded when the run ends (end_run)
        try:
            os.pwrite(self._prog_fd, _PROGRESS_DONE.pack(seq, 0), 0)
        except OSError as exc:
            self._fail(f"cannot record progress after seq {seq}: {exc.strerror or exc}", exc)
        if isinstance(rec.op, FsyncOp):
            # A barrier (DESIGN invariant 2). Written as "busy" whether or not more ops are in hand:
            # the next op (the common case: databases commit again) then needs no flush of its own,
            # and ``settle`` (on a heartbeat, at close) marks an idle replica clean again.
            self.make_durable(busy=True)

    def _apply_data(self, seq: int, op: WriteOp | TruncateOp) -> None:
        """Apply a data op through the run's fd (opened now if no run is open), its mtime deferred."""
        run = self._run
        if run is None:
            assert self._fd is not None
            # Exactly apply_op's open: validated, confined walk, regular file only, O_NOFOLLOW.
            run = self._run = _DataRun(op.path, apply.open_data(self._fd, op))
        apply.apply_data(run.fd, op)
        run.seq, run.mtime_ns = seq, op.mtime_ns

    def end_run(self) -> None:
        """End the run of data ops, if any: set the file's mtime to its last op's, close the fd,
        record the last op as done in ``progress``. Called before anything else is applied or
        can look at the replica (module docstring, runs of data ops); the replayer calls it at
        the end of every batch.

        Raises:
            OpError: the mtime or progress could not be written; the vault is marked ``needs_resync``.
        """
        run = self._run
        if run is None:
            return
        try:
            if run.mtime_ns is not None:
                try:
                    apply.set_mtime(run.fd, run.mtime_ns, run.path)
                except (OSError, OpError) as exc:
                    detail = exc.message if isinstance(exc, OpError) else (exc.strerror or str(exc))
                    self._fail(f"cannot apply seq {run.seq} (set the mtime of {os.fsdecode(run.path)}): "
                               f"{detail}", exc)
                if run.seq == self.applied_seq and self._prog_fd is not None:
                    try:
                        os.pwrite(self._prog_fd, _PROGRESS_DONE.pack(run.seq, 0), 0)
                    except OSError as exc:
                        self._fail(f"cannot record progress after seq {run.seq}: {exc.strerror or exc}", exc)
        finally:
            self._drop_run()

    def _drop_run(self) -> None:
        """Close the run's fd as it is (what a kill does): no mtime, no progress."""
        run, self._run = self._run, None
        if run is not None:
            os.close(run.fd)

    def _apply_half_done(self, op: Op) -> None:
        """Apply the op that may have been half done when the last process died."""
        assert self._fd is not None
        if isinstance(op, RenameOp) and op.flags & RENAME_EXCHANGE:
            # Both names exist before and after an exchange: there is no telling.
            raise OpError(reason="a rename exchange was interrupted; cannot tell whether it took effect")
        try:
            apply.apply_op(self._fd, op, chown=self.owners)
        except FileNotFoundError:
            if isinstance(op, (UnlinkOp, RmdirOp)):
                pass  # already removed
            elif isinstance(op, RenameOp) and _lstat(self._fd, op.src) is None and _lstat(self._fd, op.path):
                pass  # already moved
            else:
                raise
        except FileExistsError:
            if not isinstance(op, LinkOp):
                raise
            src, dst = _lstat(self._fd, op.src), _lstat(self._fd, op.path)
            if src is None or dst is None or (src.st_dev, src.st_ino) != (dst.st_dev, dst.st_ino):
                raise
        log.info("vault %s: re-applied the interrupted %s", self.vault, _describe(op))

    def make_durable(self, *, busy: bool = False) -> int:
        """Make everything applied so far durable, then record that in ``position``.

        ``busy``: more ops are about to be applied. ``position`` then says "touched: unknown"
        at once, which the next op would otherwise write (and flush) before it starts. The
        price: a power cut before that next op is applied costs a Synchronize that was not
        strictly needed (module docstring, machine went down) — only while busy.

        Returns:
            The new ``durable_seq`` (= ``applied_seq``).

        Raises:
            OpError: syncfs or the position write failed (e.g. EIO); the vault is
                marked ``needs_resync``.
        """
        self.end_run()
        touched = self.applied_seq + 1 if self._half_done is not None else self.applied_seq
        if busy:
            touched = UNKNOWN_SEQ
        if self.durable_seq == self.applied_seq and self._touched in (touched, UNKNOWN_SEQ):
            # Already durable; "touched: unknown" is only ever more cautious (settle clears it).
            return self.durable_seq
        assert self._fd is not None
        try:
            if touched == UNKNOWN_SEQ and self._touched == UNKNOWN_SEQ:
                # "touched: unknown" is already durable, and stays: the new durable seq rides on the
                # barrier's own flush instead of one of its own (one device flush less per barrier).
                # Until the flush returns the disk may hold the old or the new durable seq; either
                # way, with touched unknown, a power cut marks the vault needs_resync, so a durable
                # seq ahead of its data is never resumed from (module docstring, machine went down).
                self._write_position(self.applied_seq, UNKNOWN_SEQ, flush=False)
                apply.barrier(self._fd)
            else:
                apply.barrier(self._fd)  # first the data ...
                self._write_position(self.applied_seq, touched)  # ... then the seq that names it
        except OSError as exc:
            self._fail(f"cannot make seq {self.applied_seq} durable: {exc.strerror or exc}", exc)
        self.durable_seq = self.applied_seq
        return self.durable_seq

    @property
    def unsettled(self) -> bool:
        """Durable, but ``position`` still says "touched: unknown" (a busy barrier)."""
        return self._touched == UNKNOWN_SEQ and self.durable_seq == self.applied_seq and self._half_done is None

    def settle(self) -> None:
        """Idle: make ``position`` say exactly what is durable, so a power cut now costs nothing."""
        self.end_run()
        if self.unsettled and self.needs_resync is None and self._pos_fd is not None:
            try:
                self._write_position(self.durable_seq, self.durable_seq)
            except OSError as exc:
                self._fail(f"cannot record the durable position: {exc.strerror or exc}", exc)

    def _write_position(self, durable: int, touched: int, *, flush: bool = True) -> None:
        assert self._pos_fd is not None
        # 16 bytes at offset 0 of a file that is never shorter: one sector, no torn write.
        os.pwrite(self._pos_fd, _POSITION.pack(durable, touched), 0)
        if flush:
            os.fdatasync(self._pos_fd)
        self._touched = touched

    def _fail(self, reason: str, cause: BaseException) -> NoReturn:
        """Mark the vault for resync with ``reason`` and raise OpError."""
        self.mark_needs_resync(reason)
        raise OpError(f"Vault {self.vault}: {reason}", reason=reason) from cause

    def mark_needs_resync(self, reason: str) -> None:
        """Record (durably) that the vault must be synchronized; nothing more is applied."""
        if self.needs_resync is None:
            log.error("vault %s needs a resync: %s", self.vault, reason)
            self.needs_resync = reason
            try:
                state.mark_needs_resync(self.state_dir, reason)
            except OSError as exc:  # e.g. the same full disk; still refused in memory
                log.error("cannot record that vault %s needs a resync: %s", self.vault, exc)

    # -- Synchronize (docs/FORMAT.md §7.6) ---------------------------------------

    @property
    def consistent(self) -> bool:
        """Whether the replica is a state the primary had (no Synchronize under way, nothing to resync)."""
        return self.sync is None and self.needs_resync is None

    def begin_sync(self, sync_id: bytes, reset_seq: int, verify: bool) -> None:
        """Start a Synchronize (or a verify-only pass) at this point in the stream.

        ``reset_seq`` > 0: the target missed ops that the primary no longer has; it takes
        ``reset_seq`` as its applied and durable position and forgets its needs-resync
        mark, since the Synchronize now repairs whatever those ops would have changed.
        """
        self.end_run()
        if verify:
            self.verifying = sync_id
            return
        self.verifying = None
        if reset_seq:
            assert self._prog_fd is not None
            log.warning("vault %s: resetting the replay position from seq %d to %d for a Synchronize",
                        self.vault, self.applied_seq, reset_seq)
            self.applied_seq = reset_seq
            self._half_done = None
            os.pwrite(self._prog_fd, _PROGRESS_DONE.pack(reset_seq, 0), 0)
            self.durable_seq = -1  # forces make_durable to write the new position
            if self.needs_resync is not None:
                state.clear_needs_resync(self.state_dir)
                self.needs_resync = None
        elif self.needs_resync is not None:
            raise OpError(f"Vault {self.vault} needs a resync ({self.needs_resync}): a Synchronize must reset it")
        self.sync = {"id": sync_id.hex(), "cursor": "", "seq": reset_seq or self.applied_seq}
        self._write_sync_state()
        self.make_durable()
        log.info("vault %s: Synchronize %s started at seq %d", self.vault, sync_id.hex()[:8], self.applied_seq)

    def checkpoint_sync(self, sync_id: bytes, cursor: bytes) -> None:
        """Everything before ``cursor`` is verified: make it durable, then remember the cursor and the seq."""
        self.end_run()
        if self.sync is None or self.sync["id"] != sync_id.hex():
            return  # a verify-only pass, or a stale id: nothing to persist
        self.make_durable()
        self.sync = {"id": sync_id.hex(), "cursor": cursor.hex(), "seq": self.applied_seq}
        self._write_sync_state()

    def end_sync(self, sync_id: bytes, differences: int) -> None:
        """The Synchronize is complete: durable, then marked consistent."""
        self.end_run()
        if self.verifying == sync_id:
            self.verifying = None
            return
        if self.sync is None or self.sync["id"] != sync_id.hex():
            raise ProtocolError(peer="the primary", reason=f"sync_end for unknown Synchronize {sync_id.hex()}")
        if self.skipped_paths:
            # Ops failed after the primary's last look: it cannot know these paths are right.
            self.mark_needs_resync(f"{len(self.skipped_paths)} op(s) could not be applied at the end of a "
                                   f"Synchronize (first: {self.skipped_paths[0]!r})")
            return
        self.make_durable()
        (self.state_dir / "syncing").unlink(missing_ok=True)
        state.write_atomic(self.state_dir / "synced", sync_id.hex().encode() + b"\n", 0o600)
        self.sync = None
        self.synced = True
        log.info("vault %s: Synchronize %s complete (%d difference(s) repaired); consistent at seq %d",
                 self.vault, sync_id.hex()[:8], differences, self.applied_seq)

    def _write_sync_state(self) -> None:
        state.write_atomic(self.state_dir / "syncing", json.dumps(self.sync).encode() + b"\n", 0o600)

    def take_skipped(self) -> list[bytes]:
        """The paths of ops skipped since the last call (sent back with a SyncAnswer)."""
        out, self.skipped_paths = self.skipped_paths, []
        return out

    def answer(self, items: tuple[tuple[str, bytes], ...], block_size: int) -> list:
        """Describe paths of the replica for a SyncQuery (see scan.py); ``None`` for what is absent."""
        assert self._fd is not None
        self.end_run()  # the answer shows every file with its exact mtime
        out: list = []
        for kind, path in items:
            try:
                if kind == "list":
                    listing = scan.list_dir(self._fd, path)
                    out.append(None if listing is None else [scan.entry_to_wire(e) for e in listing])
                elif kind == "stat":
                    info = scan.stat_path(self._fd, path)
                    out.append(None if info is None else scan.entry_to_wire(info))
                else:
                    hashed = scan.file_hashes(self._fd, path, block_size)
                    out.append(None if hashed is None else list(hashed))
            except OpError as exc:
                raise ProtocolError(peer="the primary", reason=f"sync_query for {path!r}: {exc.message}") from None
        return out

    def apply_repair(self, rec: Record) -> None:
        """Apply one repair op; ``rec.seq`` must be ``applied_seq + 1`` (it goes right before that record).

        Raises:
            ProtocolError: no Synchronize is under way, or the repair is out of place.
            OpError: the op could not be applied (the vault is marked ``needs_resync``).
        """
        self.end_run()
        if self.sync is None:
            raise ProtocolError(peer="the primary", reason="a repair outside a Synchronize")
        if rec.seq != self.applied_seq + 1:
            raise ProtocolError(peer="the primary", reason=f"a repair positioned before seq {rec.seq}, but the "
                                f"applied seq is {self.applied_seq}")
        if self.needs_resync is not None:
            raise OpError(f"Vault {self.vault} needs a resync ({self.needs_resync})")
        assert self._fd is not None
        try:
            if self._touched != UNKNOWN_SEQ:
                self._write_position(self.durable_seq, UNKNOWN_SEQ)
            apply.apply_op(self._fd, rec.op, chown=self.owners)
        except (OSError, OpError) as exc:
            detail = exc.message if isinstance(exc, OpError) else (exc.strerror or str(exc))
            self._fail(f"cannot apply a repair ({_describe(rec.op)}): {detail}", exc)

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Make everything applied durable (when the vault is healthy) and close the fds."""
        try:
            with contextlib.suppress(OpError):  # already logged and marked
                self.end_run()
            if self._fd is not None and self.needs_resync is None:
                with contextlib.suppress(OpError):  # already logged and marked
                    self.make_durable()
                    self.settle()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        self._drop_run()
        for name in ("_fd", "_pos_fd", "_prog_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


# -- helpers ----------------------------------------------------------------------


class _DataRun:
    """The fd kept open across a run of data ops on one path, and the mtime still to set."""

    __slots__ = ("fd", "mtime_ns", "path", "seq")

    def __init__(self, path: bytes, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.seq = 0  # the last op applied through it
        self.mtime_ns: int | None = None  # that op's mtime, not yet set (None: nothing applied yet)



def _lstat(root_fd: int, path: bytes) -> os.stat_result | None:
    """lstat of a validated vault path under ``root_fd``, never following a symlink; None if absent."""
    parts = path.split(b"/")
    fd = root_fd
    try:
        for part in parts[:-1]:
            old, fd = fd, os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if old != root_fd:
                os.close(old)
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    finally:
        if fd != root_fd:
            os.close(fd)


_MISMATCH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR,
                              errno.ELOOP, errno.EINVAL, errno.EXDEV})


def _state_mismatch(exc: BaseException) -> bool:
    """Whether applying an op failed because the replica's tree is not what the op expects (as opposed
    to the disk failing: ENOSPC, EIO, EACCES...). An OpError here comes from apply's kind checks: ops
    were validated when decoded."""
    if isinstance(exc, OpError):
        return True
    return isinstance(exc, OSError) and exc.errno in _MISMATCH_ERRNOS


def _describe(op: Op) -> str:
    name = type(op).__name__.removesuffix("Op").lower()
    names = (op.src, op.path) if isinstance(op, (RenameOp, LinkOp)) else (op.path,)
    return f"{name} {' -> '.join(os.fsdecode(p) or '/' for p in names)}"


__all__ = [
    "UNKNOWN_SEQ",
    "Replica",
    "TargetLock",
    "check_vault_name",
    "control_socket_path",
    "current_boot_id",
    "known_vaults",
    "lock_path",
    "state_root",
    "vault_state_dir",
]
