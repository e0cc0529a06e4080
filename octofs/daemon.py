"""daemon.py: owns the composition roots: the primary's mount daemon (and later the target's).

Startup of a primary (docs/ARCHITECTURE.md, Startup):
lock the state dir → vault identity → open the journal (recovering a torn tail)
→ build the Operations → mount → start the control socket and the journal
flusher → write the ready file → serve FUSE requests until unmounted or signalled
→ flush the journal → release the lock.

Invariants:
- Every background activity is a task in the one nursery opened here.
- The journal is closed (fsynced) on every way out, including after a FUSE error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path

import trio

from octofs import fencing, paths, sdnotify, state
from octofs.config import VaultConfig
from octofs.control import ControlRequestError, serve_control
from octofs.errors import ConfigValueError, JournalError
from octofs.exclude import ExcludeFilter
from octofs.exporter import serve_metrics
from octofs.fs.loop import statistics as fuse_loop_statistics
from octofs.fs.mount import mount_options, open_mount, serve_mount, terminate
from octofs.fs.operations import PassthroughOperations
from octofs.health import serve_health
from octofs.intent import IntentRing
from octofs.journal import JournalReader, JournalWriter, drop_segments_before
from octofs.recorder import Recorder
from octofs.shipper import Forwarding, Shipper, wait_sync_targets
from octofs.syncer import SyncJob, save_pending

log = logging.getLogger(__name__)

# How often the journal is fsynced when nobody asks for it: bounds what a power
# cut can take from writes that no application fsynced.
FLUSH_INTERVAL_S = 1.0
# How often acked seqs are saved and fully acked segments dropped.
JANITOR_INTERVAL_S = 1.0


def write_ready_file(path: Path, info: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


class PrimaryDaemon:
    """One mounted vault: its journal, its FUSE session and its control socket."""

    def __init__(self, cfg: VaultConfig, mountpoint: Path) -> None:
        self.cfg = cfg
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.state_dir = cfg.state_dir
        self.started_at = time.time()
        self.recorder: Recorder | None = None
        self.ops: PassthroughOperations | None = None
        self.shippers: list[Shipper] = []
        self.forwarding = Forwarding(self._initial_forwarding())
        self.metrics_address: str | None = None  # the bound `metrics:` endpoint, once listening

    def _initial_forwarding(self) -> bool:
        """`octofs forward on|off` is saved in the state dir and wins over vault.yaml."""
        try:
            return paths.forwarding_path(self.state_dir).read_text().strip() != "off"
        except FileNotFoundError:
            return self.cfg.forwarding

    def _secret(self) -> bytes:
        cfg = self.cfg
        if cfg.secret_file is None:
            raise ConfigValueError(path=str(cfg.path), line="-", key="secret_file",
                                   reason="required when targets are configured")
        secret = cfg.secret_file.read_bytes().strip()
        if not secret:
            raise ConfigValueError(path=str(cfg.path), line="-", key="secret_file",
                                   reason=f"{cfg.secret_file} is empty")
        return secret

    def _on_journal_failure(self, message: str) -> None:
        try:
            state.mark_needs_resync(self.state_dir, f"journal failure: {message}")
        except OSError as exc:  # the state dir may be on the same full disk
            log.error("cannot mark vault %s for resync: %s", self.cfg.vault, exc)

    async def run(self, ready_file: Path | None = None) -> None:
        cfg = self.cfg
        state.ensure_state_dir(self.state_dir)
        lock = state.VaultLock(self.state_dir, cfg.vault)
        lock.acquire()
        try:
            vault_id = state.vault_id(self.state_dir)
            max_size = cfg.journal.max_size_bytes
            writer = JournalWriter.open(
                paths.journal_dir(self.state_dir),
                vault_id=vault_id,
                epoch=state.read_epoch(self.state_dir),
                # Several segments fit under max_size, so that acked ones can be dropped
                # while the live one fills (a live segment is never dropped).
                max_segment_bytes=max(64 * 2**10, min(64 * 2**20, max_size // 8)),
                max_total_bytes=max_size,
            )
            rec = writer.recovery
            log.info("journal open: last seq %d (recovery cut %d bytes)", rec.last_seq, rec.truncated_bytes)
            reason = state.needs_resync(self.state_dir)
            if reason:
                log.warning("vault %s is marked as needing a resync: %s", cfg.vault, reason)
            try:
                await self._serve(writer, ready_file)
            finally:
                writer.close()
                log.info("journal closed at seq %d", writer.last_seq)
        finally:
            paths.pid_path(self.state_dir).unlink(missing_ok=True)
            lock.release()

    async def _serve(self, writer: JournalWriter, ready_file: Path | None) -> None:
        cfg = self.cfg
        # Modes of new files come from the application (mode & ~its umask), never
        # from the daemon's own umask.
        os.umask(0)
        self.recorder = Recorder(writer, on_failure=self._on_journal_failure, when_full=cfg.journal.when_full,
                                 headroom_bytes=min(32 * 2**20, cfg.journal.max_size_bytes // 4))
        self.recorder.fenced = fencing.load(self.state_dir)  # a fenced vault stays read-only across remounts
        if self.recorder.fenced is not None:
            log.error("vault %s is FENCED (read-only): %s", cfg.vault, self.recorder.fenced)
        # Sync-mode targets are part of what an fsync waits for (DESIGN invariant 3).
        replicated = None
        if any(t.mode == "sync" for t in cfg.targets):
            async def replicated(seq: int) -> None:
                await wait_sync_targets(self.shippers, seq)
        self.ops = PassthroughOperations(os.fsencode(cfg.backing), self.recorder, exclude=cfg.exclude,
                                         replicated=replicated, inline_fsync=cfg.health is None)
        secret = self._secret() if cfg.targets or cfg.health else b""
        vault_id = state.vault_id(self.state_dir)
        # Synchronize reads the backing dir through this fd (confined, syncplan.py).
        self.backing_fd = os.open(cfg.backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        origin_empty = self._origin(writer) == "empty"
        for t in cfg.targets:
            self.shippers.append(Shipper(
                name=t.name, host=t.host, port=t.port, mode=t.mode, vault=cfg.vault, vault_id=vault_id,
                epoch=state.read_epoch(self.state_dir), secret=secret, heartbeat_s=cfg.heartbeat_s,
                journal_dir=paths.journal_dir(self.state_dir), recorder=self.recorder,
                forwarding=self.forwarding, acked_seq=_read_acked(self.state_dir, t.name),
                sync_timeout_s=t.sync_timeout_s, on_timeout=t.on_timeout,
                backing_fd=self.backing_fd, exclude=ExcludeFilter(cfg.exclude), state_dir=self.state_dir,
                origin_empty=origin_empty,
                tls=_client_tls(cfg, t), compress=t.compress, bandwidth_bps=t.bandwidth_bps,
                on_fenced=lambda message: fencing.fence(self.state_dir, self.recorder, message),
            ))
        reason = state.needs_resync(self.state_dir)
        if reason is not None and self.shippers:
            # The journal lost an op (failsafe): every target is synchronized (persisted first,
            # then the mark can go).
            for sh in self.shippers:
                sh.request_sync(SyncJob(target=sh.name, reason=f"the primary's journal lost an op: {reason}"))
            state.clear_needs_resync(self.state_dir)
        ring = None
        if self.shippers:
            ring, left = IntentRing.open(self.state_dir / "intent", last_seq=writer.last_seq,
                                         boot_id=state.current_boot_id())
            self._after_unclean_stop(left)
            self.recorder.intent = ring
        clean = False
        try:
            await self._mount_and_serve(ready_file)
            clean = True
        finally:
            if ring is not None:
                self.recorder.intent = None
                ring.close(clean=clean)

    def _after_unclean_stop(self, left: list[bytes] | None) -> None:
        """Queue a Synchronize of what the last run may have changed without journaling it (intent.py)."""
        if left == []:
            return
        if left is None:
            reason, scope = "the vault was not unmounted cleanly and the machine went down meanwhile", None
        else:
            reason, scope = (f"the vault was not unmounted cleanly: {len(left)} path(s) the last changes touched "
                             "are compared again"), left
        log.warning("%s", reason)
        for sh in self.shippers:
            job = sh.job
            if job is not None and not job.verify:
                if job.paths is None or scope is None:
                    job.paths = None
                else:
                    job.paths = sorted(set(job.paths) | set(scope))
                save_pending(self.state_dir, job)
                continue
            sh.request_sync(SyncJob(target=sh.name, reason=reason, paths=scope))

    async def _mount_and_serve(self, ready_file: Path | None) -> None:
        cfg = self.cfg
        self._seed_lag_index()
        options = mount_options(str(self.state_dir), allow_other=cfg.allow_other)
        async with open_mount(self.ops, self.mountpoint, options):
            log.info("vault %s mounted on %s (backing %s)", cfg.vault, self.mountpoint, cfg.backing)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_control, paths.control_socket_path(self.state_dir), {
                    "status": self._status, "wait_synced": self._wait_synced, "forward": self._forward,
                    "sync": self._sync, "failover": self._failover,
                })
                if cfg.metrics is not None:  # the same document as `status --json` (docs/METRICS.md)
                    self.metrics_address = await nursery.start(serve_metrics, *cfg.metrics, lambda: self._status({}))
                if cfg.health is not None:  # failover: what a target's direct query asks (docs/FORMAT.md §11)
                    await nursery.start(functools.partial(serve_health, failback=self._give_back), *cfg.health,
                                        self._secret(), fencing.primary_lookup(
                                            cfg.vault, self.recorder, state.read_epoch(self.state_dir)))
                if cfg.health is not None and self.shippers and self.recorder.fenced is None:
                    # Failover: a primary coming back must not take changes its targets would refuse
                    # (another machine may have taken over): they wait for the first contact.
                    self.recorder.pause()
                    nursery.start_soon(fencing.hold_until_first_contact, self.recorder, self.shippers,
                                       2 * cfg.heartbeat_s)
                for shipper in self.shippers:
                    nursery.start_soon(shipper.run)
                nursery.start_soon(self._janitor)
                nursery.start_soon(self._flush_periodically)
                nursery.start_soon(self._watch_signals)
                paths.pid_path(self.state_dir).write_text(f"{os.getpid()}\n")
                if ready_file is not None:
                    write_ready_file(ready_file, {"pid": os.getpid(), "mountpoint": str(self.mountpoint),
                                                  "metrics": self.metrics_address})
                sdnotify.notify("READY=1")  # systemd Type=notify (docs/systemd/octofs-mount@.service)
                await serve_mount()
                log.info("filesystem unmounted, shutting down")
                for shipper in self.shippers:  # so that no target takes the silence for a failure
                    await shipper.goodbye(f"vault {cfg.vault} unmounted")
                nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                with contextlib.suppress(JournalError):  # failsafe: already logged
                    await self.recorder.sync_all()
            for sh in self.shippers:  # so that status after a remount starts from the truth
                _write_acked(self.state_dir, sh.name, sh.acked_seq)

    def _origin(self, writer: JournalWriter) -> str:
        """"empty" if the backing dir was empty when this vault's journal began, else "existing".

        Recorded once, at the first mount. A target that streams the journal from seq 1 of an
        empty-born vault needs no Synchronize; any other new target gets one.
        """
        path = self.state_dir / "origin"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        fresh = writer.last_seq == 0 and writer.statistics().first_seq <= 1
        origin = "empty" if fresh and not os.listdir(self.cfg.backing) else "existing"
        state.write_atomic(path, origin.encode() + b"\n")
        return origin

    async def _give_back(self, body: dict) -> dict:
        """``octofs failback`` from the old primary (a health request): hand the vault back to it."""
        assert self.recorder is not None
        return await fencing.give_back(
            vault=self.cfg.vault, state_dir=self.state_dir, recorder=self.recorder, shippers=self.shippers,
            secret=self._secret(), epoch=state.read_epoch(self.state_dir), backing=self.cfg.backing, body=body,
            unmount=terminate)

    async def _failover(self, request: dict) -> dict:
        """A planned switch to a target (``octofs failover``; fencing.hand_over)."""
        assert self.recorder is not None
        to = request.get("to")
        if to is not None and not (isinstance(to, list) and len(to) == 2):
            raise ControlRequestError("'to' must be [host, port]")
        return await fencing.hand_over(
            vault=self.cfg.vault, state_dir=self.state_dir, recorder=self.recorder, shippers=self.shippers,
            secret=self._secret(), epoch=state.read_epoch(self.state_dir), target=request.get("target"),
            to=tuple(to) if to else None, timeout_s=float(request.get("timeout_s") or 60.0),
            become_target=(Path(request["become_target"]), self.cfg.backing, state.vault_id(self.state_dir))
            if request.get("become_target") else None)

    async def _sync(self, request: dict) -> dict:
        """Start a Synchronize (or verify-only pass) of one or every target (docs/CLI_JSON.md)."""
        name = request.get("target")
        verify = bool(request.get("verify"))
        chosen = [sh for sh in self.shippers if name in (None, sh.name)]
        if not self.shippers:
            raise ControlRequestError(f"vault {self.cfg.vault} has no targets")
        if not chosen:
            raise ControlRequestError(f"vault {self.cfg.vault} has no target named {name!r}; "
                                      f"targets: {', '.join(sh.name for sh in self.shippers)}")
        jobs = []
        for sh in chosen:
            try:
                job = sh.request_sync(SyncJob(target=sh.name, verify=verify,
                                              reason="verify requested" if verify else "requested"))
            except ValueError as exc:
                raise ControlRequestError(str(exc)) from None
            jobs.append({"target": sh.name, "id": job.sync_id.hex()})
        return {"jobs": jobs}

    def _seed_lag_index(self) -> None:
        """Tell the recorder when the oldest op each target still lacks was journaled (before this mount)."""
        assert self.recorder is not None
        last = self.recorder.writer.last_seq
        for seq in sorted({sh.acked_seq + 1 for sh in self.shippers if sh.acked_seq < last}):
            try:
                rec = next(JournalReader(paths.journal_dir(self.state_dir)).records(seq), None)
            except JournalError as exc:  # e.g. dropped: the target needs a resync; the shipper will say so
                log.debug("cannot read seq %d back for the lag index: %s", seq, exc)
                continue
            if rec is not None:
                self.recorder.note_append_time(rec.seq, rec.time_ns)

    async def _flush_periodically(self) -> None:
        assert self.recorder is not None
        while True:
            await trio.sleep(FLUSH_INTERVAL_S)
            # Also after failsafe: the records already appended are valid and must be made durable.
            if not self.recorder.writer.failed:
                try:
                    await self.recorder.sync_all()
                except JournalError:  # the recorder went failsafe and logged why
                    log.debug("periodic journal flush failed", exc_info=True)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s, unmounting", signal.Signals(signum).name)
                terminate()
                return

    async def _status(self, request: dict) -> dict:
        assert self.recorder is not None
        js = self.recorder.writer.statistics()
        return {
            "role": "primary",
            "vault": self.cfg.vault,
            "mountpoint": str(self.mountpoint),
            "backing": str(self.cfg.backing),
            "state_dir": str(self.state_dir),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "failsafe": self.recorder.failsafe,
            "epoch": state.read_epoch(self.state_dir),
            "fenced": self.recorder.fenced,
            "journal_full": self.recorder.full(),
            "blocked_changes": self.recorder.blocked,
            "failure": self.recorder.failure,
            "needs_resync": state.needs_resync(self.state_dir),
            "journal": {
                "first_seq": js.first_seq,
                "last_seq": js.last_seq,
                "durable_seq": js.durable_seq,
                "segments": js.segments,
                "bytes": js.bytes,
            },
            "forwarding": "on" if self.forwarding.on else "off",
            "fuse_requests": fuse_loop_statistics(),
            "metrics": self.metrics_address,
            "targets": [dataclasses.asdict(sh.statistics()) for sh in self.shippers],
        }

    async def _wait_synced(self, request: dict) -> dict:
        """The barrier: every target has acked ``seq`` (default: the last seq journaled now)."""
        assert self.recorder is not None
        seq = request.get("seq") or self.recorder.writer.last_seq
        timeout_s = float(request.get("timeout_s") or 60.0)
        if not isinstance(seq, int) or seq < 0:
            raise ControlRequestError("seq must be a non-negative integer")
        if self.shippers and not self.forwarding.on:
            return {"synced": False, "seq": seq, "reason": "forwarding is off"}
        with trio.move_on_after(timeout_s):
            for shipper in self.shippers:
                await shipper.wait_acked(seq)
                await shipper.wait_consistent()  # and no Synchronize is pending or under way
            return {"synced": True, "seq": seq}
        behind = {sh.name: sh.acked_seq for sh in self.shippers if sh.acked_seq < seq}
        syncing = [sh.name for sh in self.shippers if sh.consistent is not True]
        if syncing and not behind:
            return {"synced": False, "seq": seq, "reason": f"timed out after {timeout_s:g} s: not consistent yet "
                    f"(Synchronize pending or under way): {', '.join(syncing)}", "acked": {}}
        return {"synced": False, "seq": seq, "reason": f"timed out after {timeout_s:g} s", "acked": behind}

    async def _forward(self, request: dict) -> dict:
        on = request.get("on")
        if not isinstance(on, bool):
            raise ControlRequestError("'on' must be true or false")
        word = "on" if on else "off"
        if self.forwarding.on == on:
            return {"status": f"already_{word}"}
        state.write_atomic(paths.forwarding_path(self.state_dir), word.encode() + b"\n")
        self.forwarding.set(on)
        log.info("forwarding turned %s", word)
        return {"status": word}

    async def _janitor(self) -> None:
        """Save acked seqs; drop segments every target has acked (or, without targets,
        that are durable); wake changes waiting for room; trim the lag index."""
        assert self.recorder is not None
        saved: dict[str, int] = {}
        journal_dir = paths.journal_dir(self.state_dir)
        while True:
            with trio.move_on_after(JANITOR_INTERVAL_S):
                await self.recorder.wait_blocking()
            if self.recorder.blocked and not self.shippers and not self.recorder.writer.failed:
                with contextlib.suppress(JournalError):  # the recorder went failsafe and logged why
                    await self.recorder.sync_all()  # what is durable can go at once
            for sh in self.shippers:
                if saved.get(sh.name) != sh.acked_seq:
                    _write_acked(self.state_dir, sh.name, sh.acked_seq)
                    saved[sh.name] = sh.acked_seq
            # Without targets, nobody needs ops once they are durable here.
            low = min(sh.acked_seq for sh in self.shippers) if self.shippers else self.recorder.writer.durable_seq
            # A Synchronize resumes by re-reading the ops since its last checkpoint: keep them.
            for sh in self.shippers:
                if sh.job is not None and not sh.job.verify and sh.job.checkpoint_seq:
                    low = min(low, sh.job.checkpoint_seq)
            if low > 0:
                dropped = await trio.to_thread.run_sync(drop_segments_before, journal_dir, low + 1)
                if dropped:
                    log.info("dropped %d journal segment(s) no target needs any more", dropped)
                    self.recorder.segments_dropped()
                self.recorder.forget_before(low + 1)


def _client_tls(cfg: VaultConfig, target):
    """The primary's TLS for ``target`` (``tls:`` in vault.yaml, docs/FORMAT.md §7.12), or None."""
    if target.tls is None:
        return None
    from octofs import tlsconf

    try:
        return tlsconf.client_tls(target.tls)
    except ValueError as exc:
        index = cfg.targets.index(target)
        raise ConfigValueError(path=str(cfg.path), line="-", key=f"targets[{index}].tls", reason=str(exc)) from None


def _read_acked(state_dir: Path, target: str) -> int:
    try:
        return int(paths.target_acked_path(state_dir, target).read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def _write_acked(state_dir: Path, target: str, seq: int) -> None:
    p = paths.target_acked_path(state_dir, target)
    p.parent.mkdir(exist_ok=True)
    # Informational (the target is authoritative at each connect): no fsync needed.
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(f"{seq}\n")
    os.replace(tmp, p)


async def run_primary(cfg: VaultConfig, mountpoint: Path, ready_file: Path | None = None) -> None:
    """Mount ``cfg``'s vault on ``mountpoint`` and serve it until unmounted or signalled."""
    await PrimaryDaemon(cfg, mountpoint).run(ready_file)
