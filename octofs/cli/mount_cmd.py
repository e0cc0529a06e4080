"""cli/mount_cmd.py: `octofs mount VAULT.yaml MOUNTPOINT`."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from octofs import paths, state
from octofs.cli.common import add_command, setup_logging
from octofs.config import VaultConfig, load_vault_config
from octofs.errors import (
    DaemonRunningError,
    FuseUnavailableError,
    MountpointError,
    MountStartError,
)
from octofs.mounttab import (
    FS_TYPE,
    find_mount,
    fusermount_binary,
    fusermount_unmount,
    is_stale,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0


def add_parser(sub) -> None:
    p = add_command(sub, "mount", "Mount a vault: journal every change made under MOUNTPOINT.", run)
    p.add_argument("vault_yaml", metavar="VAULT.yaml", help="the vault's configuration file")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay attached and log to stderr (for systemd and tests)")
    p.add_argument("--ready-file", metavar="PATH",
                   help='once the mount is live, write {"pid": ..., "mountpoint": ...} to PATH')
    p.add_argument("--log-file", metavar="PATH", help=argparse.SUPPRESS)  # set for the background daemon


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailableError(reason="/dev/fuse does not exist")
    if fusermount_binary() is None:
        raise FuseUnavailableError(reason="fusermount3 is not installed")


def check_mountpoint(mnt: Path, cfg: VaultConfig) -> None:
    """Refuse a missing, non-directory, non-empty or already mounted mountpoint.

    A stale octofs mount of this same vault (its daemon is dead, so the vault lock
    is free) is cleaned up with a lazy unmount, so a crashed mount can simply be
    mounted again.
    """
    entry = find_mount(mnt)
    if entry is not None:
        if entry.fstype == FS_TYPE and is_stale(mnt) and not state.VaultLock(Path(entry.source), cfg.vault).is_held_elsewhere():
            rc, err = fusermount_unmount(mnt, lazy=True)
            if rc != 0:
                raise MountpointError(mountpoint=str(mnt), reason=f"stale mount could not be cleaned: {err}")
            log.warning("cleaned up a stale octofs mount on %s", mnt)
        else:
            raise MountpointError(mountpoint=str(mnt), reason=f"already mounted ({entry.fstype} from {entry.source})")
    if not mnt.exists():
        raise MountpointError(mountpoint=str(mnt), reason="no such directory")
    if not mnt.is_dir():
        raise MountpointError(mountpoint=str(mnt), reason="not a directory")
    with os.scandir(mnt) as it:
        empty = next(it, None) is None
    if not empty:
        raise MountpointError(mountpoint=str(mnt), reason="directory is not empty")


def run(args: argparse.Namespace) -> int:
    mnt = Path(os.path.abspath(args.mountpoint))
    cfg = load_vault_config(args.vault_yaml, mountpoint=mnt)
    check_fuse()
    state.ensure_state_dir(cfg.state_dir)
    if state.VaultLock(cfg.state_dir, cfg.vault).is_held_elsewhere():
        raise DaemonRunningError(vault=cfg.vault, state_dir=str(cfg.state_dir))
    check_mountpoint(mnt, cfg)
    if args.foreground:
        return _run_foreground(args, cfg, mnt)
    return _run_background(args, cfg, mnt)


def _run_foreground(args: argparse.Namespace, cfg: VaultConfig, mnt: Path) -> int:
    import trio

    from octofs.daemon import run_primary

    setup_logging(args, default_level=logging.INFO, log_file=args.log_file)
    ready = Path(args.ready_file) if args.ready_file else None
    trio.run(run_primary, cfg, mnt, ready)
    return 0


def _run_background(args: argparse.Namespace, cfg: VaultConfig, mnt: Path) -> int:
    log_path = paths.log_path(cfg.state_dir)
    ready = cfg.state_dir / "ready.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "octofs", "mount", "--foreground", "--log-file", str(log_path),
           "--ready-file", str(ready), os.path.abspath(args.vault_yaml), str(mnt)]
    cmd += ["-v"] * args.verbose + (["--debug"] if args.debug else [])
    for name in args.debug_module:
        cmd += ["--debug-module", name]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, cwd="/")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        code = proc.poll()
        if code is not None:
            raise MountStartError(mountpoint=str(mnt), reason=_last_error(log_path) or f"exit code {code}",
                                  log_path=str(log_path))
        if time.monotonic() > deadline:
            proc.terminate()
            raise MountStartError(mountpoint=str(mnt), reason=f"not live after {READY_TIMEOUT_S:.0f} s",
                                  log_path=str(log_path))
        time.sleep(0.05)
    ready.unlink(missing_ok=True)
    if not args.quiet:
        print(f"octofs: vault {cfg.vault} mounted on {mnt} (daemon pid {proc.pid}, log {log_path})")
    return 0


def _last_error(log_path: Path) -> str | None:
    """The daemon's last 'octofs: error:' line (or last line) from its log."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines[-50:]):
        if line.startswith("octofs: error: "):
            return line[len("octofs: error: "):]
    return lines[-1] if lines else None
