"""What octofs lets the kernel cache, and what it remembers itself, for speed (docs/PERFORMANCE.md):
none of it may ever show the application something stale."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from tests.support.daemons import mounted, wait_until, write_vault_yaml

pytestmark = pytest.mark.fuse


def _bdi_read_ahead_kb(mnt: Path) -> int | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt):
            return int(Path(f"/sys/class/bdi/{fields[2]}/read_ahead_kb").read_text())
    return None


def test_read_ahead_is_raised_to_one_mib(tmp_path: Path) -> None:
    """The kernel gives FUSE 128 KiB; the daemon raises it after INIT (fs/mount.py)."""
    with mounted(write_vault_yaml(tmp_path)) as m:
        assert wait_until(lambda: _bdi_read_ahead_kb(m.mnt) == 1024, timeout=10, what="read-ahead 1024 KiB")
        data = os.urandom(3 * 2**20 + 123)
        (m.mnt / "big").write_bytes(data)
        assert (m.mnt / "big").read_bytes() == data


def test_cached_negative_lookups_never_hide_a_new_name(tmp_path: Path) -> None:
    """A name looked up while missing is cached as missing for entry_timeout (60 s); every way
    a name can appear through the mount must still show it at once."""
    with mounted(write_vault_yaml(tmp_path)) as m:
        d = m.mnt / "d"
        d.mkdir()
        names = ["created", "renamed", "linked", "symlinked", "mkdired", "mknoded"]
        for name in names:
            assert not (d / name).exists()  # now a negative entry in the kernel
        (d / "created").write_bytes(b"1")
        (d / "src").write_bytes(b"2")
        os.rename(d / "src", d / "renamed")
        os.link(d / "created", d / "linked")
        os.symlink("created", d / "symlinked")
        os.mkdir(d / "mkdired")
        os.mkfifo(d / "mknoded")
        for name in names:
            assert os.path.lexists(d / name), name
        assert (d / "linked").read_bytes() == b"1" and (d / "symlinked").read_bytes() == b"1"
        for name in ("created", "renamed"):
            os.unlink(d / name)
            assert not (d / name).exists()
            (d / name).write_bytes(b"again")  # missing, then present again
            assert (d / name).read_bytes() == b"again"
        assert sorted(os.listdir(d)) == sorted(names)
        assert sorted(os.listdir(m.backing / "d")) == sorted(names)


def test_remembered_no_capability_is_forgotten_on_setxattr(tmp_path: Path) -> None:
    """The kernel asks for security.capability before every write; octofs answers "none" from
    memory after the first time, until a setxattr on that file."""
    with mounted(write_vault_yaml(tmp_path)) as m:
        f = m.mnt / "tool"
        f.write_bytes(b"#!/bin/sh\n")
        with open(f, "r+b") as fh:
            fh.write(b"#")  # a write: the kernel asked, octofs now remembers "none"
        with pytest.raises(OSError) as info:
            os.getxattr(f, "security.capability")
        assert info.value.errno == errno.ENODATA
        # VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_BIND_SERVICE (setcap cap_net_bind_service+ep)
        caps = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
        os.setxattr(f, "security.capability", caps)
        assert os.getxattr(f, "security.capability") == caps
        assert os.getxattr(m.backing / "tool", "security.capability") == caps
        with open(f, "r+b") as fh:
            fh.write(b"#")  # writing to a file clears its capabilities (the kernel removes them)
        with pytest.raises(OSError) as info:
            os.getxattr(f, "security.capability")
        assert info.value.errno == errno.ENODATA
        with pytest.raises(OSError):
            os.getxattr(m.backing / "tool", "security.capability")


def test_pending_request_probe_finds_the_one_fuse_device_fd() -> None:
    """fs/mount.py finds pyfuse3's /dev/fuse fd by elimination (for the inline-fsync probe and the
    request loop), and gives up rather than guess when there is not exactly one."""
    from octofs.fs.mount import _pending_probe, _session_fd

    assert _session_fd() is None and _pending_probe(None) is None  # no /dev/fuse open in this process
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert _session_fd() == fd
        probe = _pending_probe(fd)
        assert probe is not None
        # Not attached to a mount, the device polls as an error: "not idle", so never inline.
        assert probe() is True
        fd2 = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            assert _session_fd() is None  # two: cannot tell which one is the session's
        finally:
            os.close(fd2)
    finally:
        os.close(fd)


async def test_a_slow_fsync_sends_the_next_ones_to_worker_threads(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone fsync runs in the event loop's thread, unless the last ones were slow (a busy disk:
    the loop must keep answering heartbeats) or failover health answers from this loop.

    operations' clock moves only in the stand-in fsyncs, by their delay: on the real clock the journal's
    own fsync (real, on the disk) counted too, and a busy disk made a "fast" one slow (failed 28 times
    in 50 with another process writing and fsyncing 8 MiB files)."""
    import threading
    import time

    from octofs import ops as octofs_ops
    from octofs.fs import operations
    from octofs.journal import JournalWriter
    from octofs.recorder import Recorder

    (tmp_path / "b").mkdir()
    writer = JournalWriter.open(tmp_path / "j", vault_id=bytes(16), epoch=1)
    try:
        threads: list[bool] = []

        class Clock:
            now = 0.0

            def monotonic(self) -> float:
                return self.now

            def __getattr__(self, name: str):
                return getattr(time, name)

        clock = Clock()
        monkeypatch.setattr(operations, "time", clock)

        def sync(delay: float = 0.0):
            def run() -> None:
                threads.append(threading.current_thread() is threading.main_thread())
                clock.now += delay  # the fsync took ``delay``, whatever the disk did meanwhile
            return run

        fs = operations.PassthroughOperations(os.fsencode(tmp_path / "b"), Recorder(writer))
        fs.requests_pending = lambda: False
        for delay in (0.0, operations.INLINE_FSYNC_MAX_S * 2, 0.0, 0.0):
            seq = fs.recorder.record(octofs_ops.FsyncOp(b"f", datasync=False))
            await fs._sync_both(sync(delay), seq)
        assert threads == [True, True, False, False]  # inline until one was slow, then workers
        assert fs._not_inline == operations.INLINE_PAUSE - 2

        fs = operations.PassthroughOperations(os.fsencode(tmp_path / "b"), Recorder(writer), inline_fsync=False)
        fs.requests_pending = lambda: False
        threads.clear()
        seq = fs.recorder.record(octofs_ops.FsyncOp(b"f", datasync=False))
        await fs._sync_both(sync(), seq)
        assert threads == [False]
    finally:
        writer.close()
