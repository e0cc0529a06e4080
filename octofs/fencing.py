"""fencing.py: owns the primary's fenced state: read-only because another machine took over the vault.

A primary is fenced when a target refuses it for a stale epoch (its shipper gets an
``epoch`` Error: that target took over, docs/FORMAT.md §11). From then on the mount
refuses every change with EROFS, exactly as in failsafe (fs/operations.py ``_admit``),
status and the log say so, the health responder answers ``fenced`` instead of
``primary``, and the daemon waits (``octofs failback`` or an operator clears it).

Invariants:
- The fence is persisted (``STATE/fenced``, atomically) before it is reported, so a
  remount of the old primary stays read-only: it never again accepts a change that
  the new primary cannot see.
- Only ``clear`` lifts it, and only on request (failback).
"""

from __future__ import annotations

import logging
from pathlib import Path

from octofs import state
from octofs.health import Alive
from octofs.recorder import Recorder

log = logging.getLogger(__name__)

FENCED_FILE = "fenced"


def fenced_path(state_dir: Path) -> Path:
    return Path(state_dir) / FENCED_FILE


def load(state_dir: Path) -> str | None:
    """Why the vault is fenced (persisted), or None."""
    try:
        return fenced_path(state_dir).read_text().strip() or "fenced"
    except FileNotFoundError:
        return None


def fence(state_dir: Path, recorder: Recorder, message: str) -> None:
    """Make the vault read-only because a newer primary exists; persisted first."""
    if recorder.fenced is not None:
        return
    try:
        state.write_atomic(fenced_path(state_dir), message.encode() + b"\n", 0o600)
    except OSError as exc:  # still fenced in memory
        log.error("cannot record that the vault is fenced: %s", exc)
    recorder.fenced = message
    log.error("FENCED: another machine is the primary of this vault now; the mount is read-only (EROFS on "
              "changes) until `octofs failback`: %s", message)


def clear(state_dir: Path, recorder: Recorder | None) -> None:
    fenced_path(state_dir).unlink(missing_ok=True)
    if recorder is not None and recorder.fenced is not None:
        log.warning("fence lifted: the vault accepts changes again")
        recorder.fenced = None


def primary_lookup(vault: str, recorder: Recorder, epoch: int):
    """The health responder's answer for this mount: primary (or fenced) of ``vault`` at ``epoch``."""

    def lookup(name: str) -> Alive | None:
        if name != vault:
            return None
        role = "fenced" if recorder.fenced is not None else "primary"
        return Alive(vault, role, epoch, recorder.writer.last_seq)

    return lookup


__all__ = ["clear", "fence", "fenced_path", "load", "primary_lookup"]
