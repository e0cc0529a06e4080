"""state.py: owns a vault's small persistent state files: identity, epoch, lock, resync marker.

Invariants:
- Every file here is written atomically (write to a temporary name, fsync, rename,
  fsync the directory), so a crash leaves the old or the new content, never a mix.
- The lock is an flock on ``<state>/lock`` held by the one daemon serving the
  vault; the kernel drops it when that process dies, so a SIGKILLed daemon never
  leaves a lock behind.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

from octofs import paths
from octofs.errors import DaemonRunningError


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ensure_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def vault_id(state_dir: Path) -> bytes:
    """The vault's 16-byte identity, created on first use."""
    p = paths.vault_id_path(state_dir)
    try:
        return bytes.fromhex(p.read_text().strip())
    except FileNotFoundError:
        vid = secrets.token_bytes(16)
        write_atomic(p, vid.hex().encode() + b"\n")
        return vid


def read_epoch(state_dir: Path) -> int:
    try:
        return int(paths.epoch_path(state_dir).read_text().strip())
    except FileNotFoundError:
        return 1


def needs_resync(state_dir: Path) -> str | None:
    """The reason the vault needs a resync, or None."""
    try:
        return paths.needs_resync_path(state_dir).read_text().strip() or "unknown reason"
    except FileNotFoundError:
        return None


def clear_needs_resync(state_dir: Path) -> None:
    paths.needs_resync_path(state_dir).unlink(missing_ok=True)


def mark_needs_resync(state_dir: Path, reason: str) -> None:
    write_atomic(paths.needs_resync_path(state_dir), reason.encode() + b"\n")


class VaultLock:
    """Exclusive, process-lifetime lock of a vault's state dir."""

    def __init__(self, state_dir: Path, vault: str) -> None:
        self._path = paths.lock_path(state_dir)
        self._state_dir = state_dir
        self._vault = vault
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonRunningError(vault=self._vault, state_dir=str(self._state_dir)) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def is_held_elsewhere(self) -> bool:
        """True if another process holds the lock (checked without keeping it)."""
        try:
            self.acquire()
        except DaemonRunningError:
            return True
        self.release()
        return False


def current_boot_id() -> bytes:
    """This boot's id (16 bytes), or 16 zero bytes where /proc does not say.

    Tells "this process died" (same boot: the page cache survived) from "the
    machine went down" (another boot) after an unclean stop.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().decode().strip().replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return bytes(16)

