"""mounttab.py: owns reading the kernel's mount table and calling fusermount3.

Invariant: an octofs mount is recognised by its type ``fuse.octofs``; its source
field (``fsname``) is the vault's state dir, so ``umount`` and ``status`` can find
the daemon of any mountpoint without a registry of their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FS_TYPE = "fuse.octofs"


@dataclass(frozen=True)
class MountEntry:
    source: str
    mountpoint: Path
    fstype: str
    options: str


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts(path: str = "/proc/self/mounts") -> list[MountEntry]:
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            entries.append(MountEntry(_unescape(parts[0]), Path(_unescape(parts[1])), parts[2], parts[3]))
    return entries


def find_mount(mountpoint: Path) -> MountEntry | None:
    """The innermost mount whose mountpoint is exactly ``mountpoint`` (not resolved: it may be stale)."""
    target = Path(os.path.abspath(mountpoint))
    found = None
    for entry in read_mounts():
        if entry.mountpoint == target:
            found = entry
    return found


def octofs_mounts() -> list[MountEntry]:
    return [e for e in read_mounts() if e.fstype == FS_TYPE]


def fusermount_binary() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def fusermount_unmount(mountpoint: Path, *, lazy: bool = False) -> tuple[int, str]:
    """Run ``fusermount3 -u [-z] MOUNTPOINT``; return (exit code, stderr text)."""
    binary = fusermount_binary()
    if binary is None:
        return 127, "fusermount3 not found"
    cmd = [binary, "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stderr.strip()


def is_stale(mountpoint: Path) -> bool:
    """True if ``mountpoint`` is a FUSE mount whose daemon is gone (ENOTCONN).

    statvfs, not stat: the kernel may answer stat from its attribute cache without
    asking the (dead) daemon, but statfs always goes to the filesystem.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in (107, 103)  # ENOTCONN, ECONNABORTED
    return False
