"""fs/mount.py: owns the FUSE session of a primary: init, main loop, close.

Invariant: pyfuse3 has process-global state, so there is at most one mount per
process, and ``open_mount`` always closes the session, unmounting if it still can.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3

from octofs.errors import MountError
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


@contextlib.asynccontextmanager
async def open_mount(ops: pyfuse3.Operations, mountpoint: Path, options: set[str]) -> AsyncIterator[None]:
    """Mount ``ops`` on ``mountpoint`` for the duration of the block.

    The caller runs ``await pyfuse3.main()`` (via ``serve_mount``) inside.
    """
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        raise MountError(mountpoint=str(mountpoint), reason=str(exc)) from exc
    try:
        yield
    finally:
        # Unmounting after an external `fusermount3 -u` is a harmless no-op; after
        # terminate() or an error it is what releases the mountpoint.
        pyfuse3.close(unmount=True)


async def serve_mount() -> None:
    """Serve FUSE requests until the filesystem is unmounted or ``terminate()`` is called."""
    await pyfuse3.main()


def terminate() -> None:
    pyfuse3.terminate()
