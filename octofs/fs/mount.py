"""fs/mount.py: owns the FUSE session of a primary: init, main loop, close.

Invariant: pyfuse3 has process-global state, so there is at most one mount per
process, and ``open_mount`` always closes the session, unmounting if it still can.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import select
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pyfuse3

from octofs.errors import MountError
from octofs.fs import loop
from octofs.mounttab import FS_TYPE

log = logging.getLogger(__name__)


def mount_options(fsname: str, *, allow_other: bool) -> set[str]:
    """The -o options of an octofs mount.

    ``default_permissions``: the kernel checks mode bits and owners against the
    caller, as on a native filesystem; the daemon itself runs as root and would
    otherwise let anyone do anything. ``fsname`` is the state dir (see mounttab).
    """
    opts = {f"fsname={fsname}", f"subtype={FS_TYPE.split('.', 1)[1]}", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    return opts


# The kernel gives a FUSE mount 128 KiB of read-ahead (and INIT can only lower it), so a cold
# sequential read arrives as 128 KiB READ requests, one round trip each. 1 MiB (the largest
# request libfuse takes) makes them 8x fewer; measured in docs/PERFORMANCE.md.
READ_AHEAD_KB = 1024


def _mount_device(mountpoint: Path) -> str | None:
    """The ``major:minor`` of the filesystem mounted on ``mountpoint`` (from mountinfo, no stat:
    a stat of our own mount before the main loop runs would wait for ourselves)."""
    want, dev = str(mountpoint), None
    # surrogateescape: any mount on the machine may have a name that is not UTF-8, like os.fsdecode.
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]) == want:
                dev = fields[2]  # the last match: the mount on top
    return dev


async def raise_read_ahead(mountpoint: Path, kb: int = READ_AHEAD_KB) -> None:
    """Best effort (needs root): set the mount's read-ahead to ``kb`` KiB, after the kernel processed INIT."""
    try:
        dev = _mount_device(mountpoint)
        if dev is not None:
            Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")
            log.debug("read-ahead of %s (bdi %s) set to %d KiB", mountpoint, dev, kb)
    except (OSError, ValueError) as exc:  # a system task must not raise: it would end the daemon
        log.info("cannot raise the read-ahead of %s (cold reads stay slower): %s", mountpoint, exc)


@contextlib.asynccontextmanager
async def open_mount(ops: pyfuse3.Operations, mountpoint: Path, options: set[str]) -> AsyncIterator[None]:
    """Mount ``ops`` on ``mountpoint`` for the duration of the block.

    The caller runs ``await pyfuse3.main()`` (via ``serve_mount``) inside, its workers waiting for
    requests through ``loop.RequestWait`` (fs/loop.py). Once the kernel's INIT
    has been answered, the mount's read-ahead is raised (``raise_read_ahead``) if ``ops`` has an
    ``after_init`` hook (PassthroughOperations does).
    """
    if hasattr(ops, "after_init"):
        ops.after_init = functools.partial(raise_read_ahead, Path(mountpoint))
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        raise MountError(mountpoint=str(mountpoint), reason=str(exc)) from exc
    fd = _session_fd()
    if hasattr(ops, "requests_pending"):
        ops.requests_pending = _pending_probe(fd)
    loop.install(fd)
    try:
        yield
    finally:
        # Unmounting after an external `fusermount3 -u` is a harmless no-op; after
        # terminate() or an error it is what releases the mountpoint.
        pyfuse3.close(unmount=True)


def _session_fd() -> int | None:
    """The /dev/fuse fd of the session pyfuse3 just opened, or None if it cannot be told.

    pyfuse3 keeps it to itself; it is the one fd of this process opened on /dev/fuse
    (one mount per daemon).
    """
    fds = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed meanwhile (listdir's own, say)
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.append(int(name))
    return fds[0] if len(fds) == 1 else None


def _pending_probe(fd: int | None) -> Callable[[], bool] | None:
    """A cheap "are FUSE requests queued?" for the session's fd, or None.

    ``poll`` with a zero timeout costs one syscall and does not disturb trio's own
    registration of the fd.
    """
    if fd is None:
        return None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda: bool(poller.poll(0))


async def serve_mount() -> None:
    """Serve FUSE requests until the filesystem is unmounted or ``terminate()`` is called."""
    await pyfuse3.main()


def terminate() -> None:
    loop.terminate()
