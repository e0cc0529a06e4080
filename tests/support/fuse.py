"""FUSE test plumbing: the skip/fail marker, waiting for a mount, and a teardown that always unmounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from octofs.mounttab import FS_TYPE, find_mount


def fuse_problem() -> str | None:
    """Why real FUSE mounts cannot run here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 cannot be imported: {exc}"
    return None


def apply_fuse_marker(item: pytest.Item) -> None:
    """Skip a `fuse` test with a precise reason, or fail it when OCTOFS_REQUIRE_FUSE=1 (scripts/test)."""
    problem = fuse_problem()
    if problem is None:
        return
    if os.environ.get("OCTOFS_REQUIRE_FUSE") == "1":
        return  # scripts/test: no skipping into green; the test runs and fails on the real error
    item.add_marker(pytest.mark.skip(reason=f"no FUSE here: {problem}"))


def is_octofs_mounted(mnt: Path) -> bool:
    entry = find_mount(mnt)
    return entry is not None and entry.fstype == FS_TYPE


def wait_for_ready(proc: subprocess.Popen, ready_file: Path, mnt: Path, timeout: float, log_path: Path) -> None:
    """Wait until the daemon wrote its ready file and the mount is in the mount table; fail at once if it exits."""
    deadline = time.monotonic() + timeout
    while not (ready_file.exists() and is_octofs_mounted(mnt)):
        code = proc.poll()
        if code is not None:
            raise AssertionError(f"mount daemon exited with {code} before the mount was live:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"mount not live after {timeout} s:\n{_tail(log_path)}")
        time.sleep(0.02)


def unmount(proc: subprocess.Popen | None, mnt: Path, timeout: float = 30.0) -> int | None:
    """The one teardown path: fusermount3 -u, wait for the daemon; then -u -z, terminate, kill.

    Returns the daemon's exit code (None if there was no process).
    """
    if is_octofs_mounted(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
    if proc is None:
        if is_octofs_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        return None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
    proc.terminate()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


def sweep_stale_mounts(root: Path, *, live_too: bool = False) -> list[Path]:
    """Lazily unmount the octofs mounts below ``root`` whose daemon is dead (left by a crashed run).

    A live mount may belong to another test session running at the same time, so
    it is only swept with ``live_too`` (for this session's own temp dir at the end).
    """
    from octofs.mounttab import is_stale, octofs_mounts

    swept = []
    root = Path(os.path.abspath(root))
    for entry in octofs_mounts():
        if root == entry.mountpoint or root in entry.mountpoint.parents:
            if not live_too and not is_stale(entry.mountpoint):
                continue
            subprocess.run(["fusermount3", "-u", "-z", str(entry.mountpoint)], capture_output=True, check=False)
            swept.append(entry.mountpoint)
    return swept


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
