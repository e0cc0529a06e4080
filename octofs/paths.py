"""paths.py: owns the layout of a vault's state directory (see docs/FORMAT.md, State-dir tree).

Invariant: every octofs-owned file of a vault lives under its state dir and is
named here, nowhere else.
"""

from __future__ import annotations

from pathlib import Path

SEGMENT_SUFFIX = ".seg"


def journal_dir(state_dir: Path) -> Path:
    return state_dir / "journal"


def segment_path(journal_dir: Path, first_seq: int) -> Path:
    """Segment files are named by their first seq, zero-padded hex, so they sort by name."""
    return journal_dir / f"{first_seq:016x}{SEGMENT_SUFFIX}"


def segment_first_seq(path: Path) -> int | None:
    """The first seq encoded in a segment's file name, or None if it is not a segment name."""
    if path.suffix != SEGMENT_SUFFIX or len(path.stem) != 16:
        return None
    try:
        return int(path.stem, 16)
    except ValueError:
        return None


def vault_id_path(state_dir: Path) -> Path:
    return state_dir / "vault_id"


def epoch_path(state_dir: Path) -> Path:
    return state_dir / "epoch"


def lock_path(state_dir: Path) -> Path:
    return state_dir / "lock"


def control_socket_path(state_dir: Path) -> Path:
    return state_dir / "control.sock"


def needs_resync_path(state_dir: Path) -> Path:
    return state_dir / "needs_resync"


def log_path(state_dir: Path) -> Path:
    return state_dir / "mount.log"


def pid_path(state_dir: Path) -> Path:
    return state_dir / "pid"


def forwarding_path(state_dir: Path) -> Path:
    """``on`` or ``off``, as last set by `octofs forward` (wins over vault.yaml)."""
    return state_dir / "forwarding"


def target_acked_path(state_dir: Path, target: str) -> Path:
    """The last acked seq we heard from a target (informational; the target is authoritative)."""
    return state_dir / "targets" / f"{target}.acked"
