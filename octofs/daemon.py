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

import json
import logging
import os
import signal
import time
from pathlib import Path

import trio

from octofs import paths, state
from octofs.config import VaultConfig
from octofs.control import serve_control
from octofs.fs.mount import mount_options, open_mount, serve_mount, terminate
from octofs.fs.operations import PassthroughOperations
from octofs.fs.recorder import Recorder
from octofs.journal import JournalWriter

log = logging.getLogger(__name__)

# How often the journal is fsynced when nobody asks for it: bounds what a power
# cut can take from writes that no application fsynced.
FLUSH_INTERVAL_S = 1.0


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
            writer = JournalWriter.open(
                paths.journal_dir(self.state_dir),
                vault_id=vault_id,
                epoch=state.read_epoch(self.state_dir),
                max_total_bytes=cfg.journal.max_size_bytes,
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
        self.recorder = Recorder(writer, on_failure=self._on_journal_failure)
        self.ops = PassthroughOperations(os.fsencode(cfg.backing), self.recorder)
        options = mount_options(str(self.state_dir), allow_other=cfg.allow_other)
        async with open_mount(self.ops, self.mountpoint, options):
            log.info("vault %s mounted on %s (backing %s)", cfg.vault, self.mountpoint, cfg.backing)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    serve_control, paths.control_socket_path(self.state_dir), {"status": self._status}
                )
                nursery.start_soon(self._flush_periodically)
                nursery.start_soon(self._watch_signals)
                paths.pid_path(self.state_dir).write_text(f"{os.getpid()}\n")
                if ready_file is not None:
                    write_ready_file(ready_file, {"pid": os.getpid(), "mountpoint": str(self.mountpoint)})
                await serve_mount()
                log.info("filesystem unmounted, shutting down")
                nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await self.recorder.sync_all()

    async def _flush_periodically(self) -> None:
        assert self.recorder is not None
        while True:
            await trio.sleep(FLUSH_INTERVAL_S)
            if not self.recorder.failsafe:
                try:
                    await self.recorder.sync_all()
                except Exception:  # noqa: BLE001 - FUSEError after failsafe; already logged
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
            "failure": self.recorder.failure,
            "needs_resync": state.needs_resync(self.state_dir),
            "journal": {
                "first_seq": js.first_seq,
                "last_seq": js.last_seq,
                "durable_seq": js.durable_seq,
                "segments": js.segments,
                "bytes": js.bytes,
            },
            "targets": [],
        }


async def run_primary(cfg: VaultConfig, mountpoint: Path, ready_file: Path | None = None) -> None:
    """Mount ``cfg``'s vault on ``mountpoint`` and serve it until unmounted or signalled."""
    await PrimaryDaemon(cfg, mountpoint).run(ready_file)
