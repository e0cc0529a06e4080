"""cli/umount_cmd.py: `octofs umount MOUNTPOINT`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from octofs import state
from octofs.cli.common import add_command
from octofs.errors import MountError, NotMountedError, WaitTimeoutError
from octofs.mounttab import FS_TYPE, find_mount, fusermount_unmount, is_stale

EXIT_TIMEOUT_S = 60.0


def add_parser(sub) -> None:
    p = add_command(sub, "umount", "Unmount a vault cleanly (journal flushed), or clean up a stale mount.", run)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now even if files are open (fusermount3 -z)")


def run(args: argparse.Namespace) -> int:
    mnt = Path(os.path.abspath(args.mountpoint))
    entry = find_mount(mnt)
    if entry is None or entry.fstype != FS_TYPE:
        raise NotMountedError(mountpoint=str(mnt))
    state_dir = Path(entry.source)
    stale = is_stale(mnt)
    rc, err = fusermount_unmount(mnt, lazy=stale or args.lazy)
    if rc != 0:
        reason = err or f"fusermount3 exited with {rc}"
        if "busy" in err.lower():
            reason = "the mount is busy (a process has a file or its working directory in it); close them or use --lazy"
        raise MountError(mountpoint=str(mnt), reason=f"cannot unmount: {reason}")
    # The daemon holds the vault lock until its journal is flushed and closed.
    lock = state.VaultLock(state_dir, state_dir.name)
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while lock.is_held_elsewhere():
        if time.monotonic() > deadline:
            raise WaitTimeoutError(timeout_s=EXIT_TIMEOUT_S, what=f"the daemon of {mnt} to exit")
        time.sleep(0.05)
    if not args.quiet:
        print(f"octofs: {'cleaned up stale mount' if stale else 'unmounted'} {mnt}")
    return 0
