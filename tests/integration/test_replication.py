"""Replication end to end (issue 3, "Done means"): real mounts, real `octofs serve` processes, real TCP on 127.0.0.1.

Every test ends with ``assert_trees_equal(backing, ROOT/<vault>, mtime=True)`` (or, with
``exclude``, the same comparison minus the excluded paths). The barrier before a
comparison is always ``wait_synced`` (the control socket, or `octofs status
--wait-synced` where the CLI is under test); state changes without a barrier of their
own (a target noticed as gone, a refusal, lag growing) are awaited by polling status
with a deadline (``wait_until``), never by sleeping.

Randomized tests (target kills, link cuts) print their seed; set OCTOFS_TEST_SEED to
replay one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import threading
from pathlib import Path

import pytest

from octofs.journal import JournalReader
from tests.support.daemons import (
    MountHandle,
    Serve,
    free_port,
    mounted,
    run_octofs,
    serving,
    wait_until,
    write_vault_yaml,
)
from tests.support.proxy import CuttingProxy
from tests.support.trees import (
    assert_trees_equal,
    diff_snapshots,
    snapshot_minus_excluded,
    tree_snapshot,
)

pytestmark = pytest.mark.fuse

SYNC_TIMEOUT_S = 90.0  # the shipper's reconnect backoff grows to 5 s while a target is down


def seed_for(name: str) -> int:
    seed = int(os.environ.get("OCTOFS_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{name}: seed {seed} (OCTOFS_TEST_SEED={seed} replays it)")
    return seed


def vault_yaml(workdir: Path, secret: Path, targets: dict[str, str], *, name: str = "vault", **extra) -> Path:
    """``workdir/vault.yaml`` for vault ``name`` (backing ``workdir/backing``, state ``workdir/state``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    doc = {"secret_file": str(secret), "targets": [{"name": n, "address": a} for n, a in targets.items()], **extra}
    return write_vault_yaml(workdir, name=name, extra=doc)


def last_seq(m: MountHandle) -> int:
    return m.status()["journal"]["last_seq"]


def assert_replica_exact(m: MountHandle, target: Serve, vault: str = "vault") -> None:
    """The end of every test: same tree (mtimes included), and exactly the primary's ops applied, once."""
    seq = last_seq(m)
    v = target.vault_status(vault)
    assert v is not None, target.status()
    assert (v["applied_seq"], v["durable_seq"], v["needs_resync"]) == (seq, seq, None), (v, seq)
    assert_trees_equal(m.backing, target.root / vault, mtime=True)


def write_file(path: Path, data: bytes, *, fsync: bool = False, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


class Workload(threading.Thread):
    """A mixed write workload on a mount, in a thread, until ``stop()``.

    Writes in place and appends, write-temp-then-rename, hard links, symlinks,
    chmod, truncate, xattrs, utimens, unlinks, directories; some fsyncs. Any
    exception is a failure: writes on the primary never fail because of a target.
    """

    def __init__(self, root: Path, seed: int, *, pace_s: float = 0.0) -> None:
        super().__init__(name="workload", daemon=True)
        self.pace_s = pace_s  # a pause after each iteration (a gentler load), not a synchronisation
        self.dir = root / "w"
        self.rng = random.Random(seed)
        self.iterations = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self.files: set[str] = set()  # regular files in self.dir, hard links included
        self.dirs: set[str] = set()

    def run(self) -> None:
        try:
            self.dir.mkdir()
            write_file(self.dir / "db", bytes(64 * 4096))
            while not self._stop_event.is_set():
                self.step(self.iterations)
                self.iterations += 1
                if self.pace_s:
                    self._stop_event.wait(self.pace_s)
        except Exception as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> int:
        """Stop, join, and re-raise what went wrong; returns the iterations done."""
        self._stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the workload is stuck on the mount"
        if self.error is not None:
            raise AssertionError(f"a write on the primary failed after {self.iterations} iterations") from self.error
        return self.iterations

    def wait_for(self, iterations: int, timeout: float = 60.0) -> None:
        """Until the workload has done ``iterations`` in all (it keeps running)."""
        wait_until(lambda: self.iterations >= iterations or self.error is not None, timeout=timeout,
                   what=f"{iterations} workload iterations")
        if self.error is not None:
            raise AssertionError("a write on the primary failed") from self.error

    def step(self, i: int) -> None:
        rng, d = self.rng, self.dir
        # Publish a file the safe way: write a temp file (maybe fsync), rename over.
        name = f"f{rng.randrange(30)}"
        tmp = d / f".tmp{i}"
        write_file(tmp, rng.randbytes(rng.choice([0, 1, 100, 4096, rng.randrange(40000)])),
                   fsync=rng.random() < 0.15)
        os.rename(tmp, d / name)
        self.files.add(name)
        # A database-like in-place page update; sometimes a commit (fsync).
        fd = os.open(d / "db", os.O_RDWR)
        try:
            os.pwrite(fd, rng.randbytes(4096), rng.randrange(64) * 4096)
            if rng.random() < 0.2:
                os.fsync(fd)
        finally:
            os.close(fd)
        # An append-only log.
        fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, b"line %d %s\n" % (i, rng.randbytes(rng.randrange(200)).hex().encode()))
        finally:
            os.close(fd)
        files = sorted(self.files)
        r = rng.random()
        if r < 0.08:
            link = f"l{rng.randrange(4)}"
            sources = [f for f in files if f != link]
            if sources:
                if link in self.files:
                    os.unlink(d / link)
                os.link(d / rng.choice(sources), d / link)
                self.files.add(link)
        elif r < 0.14:
            link = d / f"s{rng.randrange(3)}"
            if link.is_symlink():
                link.unlink()
            os.symlink(rng.choice([*files, "dangling"]), link)
        elif r < 0.20:
            os.chmod(d / rng.choice(files), rng.choice([0o600, 0o644, 0o640, 0o755, 0o400]))
        elif r < 0.26:
            os.truncate(d / rng.choice(files), rng.randrange(50000))
        elif r < 0.31:
            os.setxattr(d / rng.choice(files), f"user.k{rng.randrange(3)}", rng.randbytes(rng.randrange(1, 50)))
        elif r < 0.35:
            t = 1_600_000_000_000_000_000 + rng.randrange(10**15)
            os.utime(d / rng.choice(files), ns=(t, t + 1))
        elif r < 0.42 and len(files) > 3:
            victim = rng.choice(files)
            os.unlink(d / victim)
            self.files.discard(victim)
        elif r < 0.50:
            sub = f"dir{rng.randrange(3)}"
            if sub in self.dirs and rng.random() < 0.4:
                shutil.rmtree(d / sub)
                self.dirs.discard(sub)
            else:
                (d / sub / "deeper").mkdir(parents=True, exist_ok=True)
                self.dirs.add(sub)
                write_file(d / sub / "deeper" / f"g{rng.randrange(5)}", rng.randbytes(rng.randrange(3000)))
        elif r < 0.53 and self.dirs:
            old = rng.choice(sorted(self.dirs))
            new = f"dir{rng.randrange(3)}"
            if new not in self.dirs:
                os.rename(d / old, d / new)
                self.dirs.discard(old)
                self.dirs.add(new)


# -- 1. basic ---------------------------------------------------------------------------------


def mixed_workload(mnt: Path) -> None:
    """Files, dirs, renames, hard links, symlinks, xattrs, chmod, truncate, and SQLite in WAL mode."""
    (mnt / "docs" / "old").mkdir(parents=True)
    write_file(mnt / "docs" / "a.txt", b"alpha\n" * 1000)
    write_file(mnt / "docs" / "b.bin", os.urandom(300_000), fsync=True)
    write_file(mnt / "docs" / "empty", b"")
    fd = os.open(mnt / "docs" / "b.bin", os.O_RDWR)
    os.pwrite(fd, b"PATCHED", 123_456)
    os.ftruncate(fd, 200_001)
    os.close(fd)
    os.truncate(mnt / "docs" / "a.txt", 10_000)  # grows: a hole at the end
    os.rename(mnt / "docs" / "a.txt", mnt / "docs" / "old" / "a.txt")
    os.rename(mnt / "docs" / "old", mnt / "archive")
    os.link(mnt / "docs" / "b.bin", mnt / "b-hardlink")
    os.symlink("docs/b.bin", mnt / "b-symlink")
    os.symlink("/nonexistent/target", mnt / "dangling")
    os.setxattr(mnt / "docs" / "b.bin", "user.checksum", b"sha256:abc")
    os.setxattr(mnt / "docs", "user.owner", b"team-\x00-bytes")
    os.setxattr(mnt / "archive" / "a.txt", "user.gone", b"x")
    os.removexattr(mnt / "archive" / "a.txt", "user.gone")
    os.chmod(mnt / "docs" / "empty", 0o600)
    os.chmod(mnt / "archive", 0o750)
    os.mkdir(mnt / "tmpdir")
    write_file(mnt / "tmpdir" / "x", b"x")
    os.unlink(mnt / "tmpdir" / "x")
    os.rmdir(mnt / "tmpdir")
    os.utime(mnt / "docs" / "empty", ns=(1_500_000_000_123_456_789, 1_500_000_000_987_654_321))
    db = sqlite3.connect(mnt / "app.db")
    try:
        assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(300):
            db.execute("INSERT INTO t (v) VALUES (?)", (f"row {i} " + "y" * (i % 97),))
            if i % 20 == 0:
                db.commit()
        db.execute("DELETE FROM t WHERE id % 3 = 0")
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def test_basic_replication(tmp_path: Path, secret: Path, target: Serve) -> None:
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str})
    with mounted(vault) as m:
        mixed_workload(m.mnt)
        res = run_octofs("status", "--wait-synced", "--timeout", str(SYNC_TIMEOUT_S), str(m.mnt))
        assert res.returncode == 0, res.stderr + m.log()
        res = run_octofs("status", "--json", str(m.mnt))
        assert res.returncode == 0, res.stderr
        [doc] = json.loads(res.stdout)["vaults"]
        [t] = doc["targets"]
        assert doc["forwarding"] == "on"
        assert (t["name"], t["address"], t["mode"], t["state"]) == ("t1", target.address_str, "async", "connected")
        assert t["acked_seq"] == doc["journal"]["last_seq"] > 0
        assert (t["pending_ops"], t["lag_s"], t["last_error"]) == (0, 0, None)
        assert t["owners"] is True and t["bytes_sent"] > 300_000
        assert_replica_exact(m, target)
    # The replica's database is a consistent SQLite database with every committed row.
    copy = tmp_path / "copy.db"
    shutil.copyfile(target.root / "vault" / "app.db", copy)
    con = sqlite3.connect(copy)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 200
    finally:
        con.close()
    assert "Traceback" not in target.log()


_NOBODY = 65534
_OTHER_GID = 5678
# Run as nobody inside a directory of the mount: files and nodes in set-group-ID directories of
# nobody's own group and of another one, and in a plain one; a few small files written and removed.
_AS_NOBODY = """
import os
for d in ("own", "other", "plain"):
    os.close(os.open(d + "/f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o2775))
    os.close(os.open(d + "/u", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o4755))  # (a write would clear it)
    os.mkdir(d + "/sub", 0o2755)
    os.mkfifo(d + "/fifo", 0o644)
    os.symlink("f", d + "/link")
    for i in range(20):
        fd = os.open(f"{d}/small{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, bytes([i]) * 4096)
        os.close(fd)
    for i in range(0, 20, 3):
        os.unlink(f"{d}/small{i}")
"""


def test_new_nodes_owner_group_and_set_id_bits_replicate(tmp_path: Path, secret: Path, target: Serve) -> None:
    """The mount's create reads the new node's owner through its fd and skips the parent's lstat
    and the chown when the kernel already gave the right ones; the target keeps each new file's
    fd for the writes after its create. Owners, groups, inherited set-group-ID bits, requested
    set-ID bits and data must be the same on the backing dir and the replica."""
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str}, allow_other=True)
    with mounted(vault) as m:
        sg = m.mnt / "sg"
        sg.mkdir(mode=0o755)
        for name, gid in (("own", _NOBODY), ("other", _OTHER_GID)):
            (sg / name).mkdir()
            os.chown(sg / name, 0, gid)
            os.chmod(sg / name, 0o2777)
        (sg / "plain").mkdir()
        os.chmod(sg / "plain", 0o777)
        pid = os.fork()  # (nobody cannot run this venv's python: a fork that becomes nobody)
        if pid == 0:
            status = 1
            try:
                os.chdir(sg)
                os.setgroups([])
                os.setgid(_NOBODY)
                os.setuid(_NOBODY)
                exec(_AS_NOBODY, {})
                status = 0
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0
        write_file(sg / "other" / "by-root", b"root", mode=0o2755)  # root, not in the group
        os.mkdir(sg / "other" / "root-dir")
        res = run_octofs("status", "--wait-synced", "--timeout", str(SYNC_TIMEOUT_S), str(m.mnt))
        assert res.returncode == 0, res.stderr + m.log()
        snap = tree_snapshot(m.backing)
        # What the kernel does natively (a plain directory gives the same, test_behaviour).
        for d, gid in ((b"own", _NOBODY), (b"other", _OTHER_GID), (b"plain", _NOBODY)):
            f, u, sub = snap[b"sg/" + d + b"/f"], snap[b"sg/" + d + b"/u"], snap[b"sg/" + d + b"/sub"]
            assert (f.uid, f.gid, u.uid, u.gid, sub.gid) == (_NOBODY, gid, _NOBODY, gid, gid), d
            assert u.mode == 0o4755 and sub.mode == (0o755 if d == b"plain" else 0o2755), d
            assert f.mode == (0o2755 if gid == _NOBODY else 0o755), d  # set-group-ID only for a member (umask 022)
        assert snap[b"sg/other/by-root"].gid == _OTHER_GID and snap[b"sg/other/root-dir"].mode == 0o2755
        assert_replica_exact(m, target)


# -- 2. target SIGKILLed and restarted during a workload ------------------------------------------


@pytest.mark.slow
def test_target_sigkilled_and_restarted_during_workload(tmp_path: Path, secret: Path, target: Serve) -> None:
    seed = seed_for("target kills")
    rng = random.Random(seed)
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str})
    kills = 6
    at_kill: list[tuple[int, int, int]] = []  # (goal, target's applied seq, primary's last seq) at each kill
    with mounted(vault) as m:
        work = Workload(m.mnt, seed)
        work.start()
        try:
            for k in range(kills):
                # A random moment: right after the (re)start, or once the target has applied
                # a random number of further ops (mid-stream, or mid-backlog after a restart).
                base = target.applied_seq("vault")
                goal = rng.choice([0, rng.randrange(1, 50), rng.randrange(1, 50), rng.randrange(50, 1500),
                                   rng.randrange(50, 1500)])
                if goal:
                    wait_until(lambda: target.applied_seq("vault") >= base + goal, timeout=60,  # noqa: B023
                               what=f"kill {k}: target applied seq {base} + {goal}\n{target.log()}")
                at_kill.append((goal, target.applied_seq("vault"), last_seq(m)))
                target.kill()
                # While it is down the workload keeps writing (it would raise if a write failed).
                work.wait_for(work.iterations + rng.randrange(5, 60))
                target.start()  # the same port
            work.wait_for(work.iterations + 20)
        finally:
            done = work.stop()
        seq = m.wait_synced(SYNC_TIMEOUT_S)
        assert seq == last_seq(m)
        t = m.target_status("t1")
        assert (t["acked_seq"], t["pending_ops"], t["state"]) == (seq, 0, "connected"), t
        assert t["reconnects"] >= kills, t
        assert_replica_exact(m, target)
    print(f"{done} workload iterations, {seq} ops, {kills} kills at (goal, applied, last): {at_kill}")
    assert any(0 < applied < last for _, applied, last in at_kill), at_kill  # kills came mid-stream
    log = target.log(10**7)
    assert log.count("---- start") == kills + 1
    assert "needs a resync" not in log and "Traceback" not in log


# -- 3. a link cut at random byte offsets ------------------------------------------------------------


@pytest.mark.slow
def test_link_cut_at_random_offsets(tmp_path: Path, secret: Path, target: Serve) -> None:
    seed = seed_for("cutting proxy")
    with CuttingProxy(target.address, seed=seed) as proxy:
        vault = vault_yaml(tmp_path / "p", secret, {"t1": proxy.address_str})
        with mounted(vault) as m:
            work = Workload(m.mnt, seed)
            work.start()
            try:
                wait_until(lambda: len(proxy.cuts) >= 12 or work.error is not None, timeout=90,
                           what=f"12 cuts (proxy: {proxy.connections} connections, {proxy.bytes})")
            finally:
                work.stop()
            # The backlog drains through more cuts; then the link heals and everything arrives.
            cuts_at_end = len(proxy.cuts)
            wait_until(lambda: len(proxy.cuts) >= cuts_at_end + 3 or m.target_status("t1")["pending_ops"] == 0,
                       timeout=60, what="3 more cuts or a drained backlog")
            proxy.heal()
            m.wait_synced(SYNC_TIMEOUT_S)
            assert m.target_status("t1")["state"] == "connected"
            assert_replica_exact(m, target)
    cuts = proxy.cuts
    print(f"{proxy.connections} connections, {len(cuts)} cuts, {proxy.bytes}")
    assert {c.direction for c in cuts} == {"up", "down"} and {c.reset for c in cuts} == {True, False}, cuts
    assert "needs a resync" not in target.log(10**7)


def test_proxy_cuts_at_the_exact_offset() -> None:
    """The test's own link: the upstream gets exactly ``offset`` bytes of each cut connection."""
    import socket

    received: list[int] = []
    server = socket.create_server(("127.0.0.1", 0))

    def sink() -> None:
        for _ in range(6):
            conn, _ = server.accept()
            n = 0
            with conn:
                try:
                    while data := conn.recv(65536):
                        n += len(data)
                except ConnectionResetError:
                    pass
            received.append(n)

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    try:
        with CuttingProxy(server.getsockname(), seed=1, resets=0.0,  # a RST may also drop bytes in flight
                          budget=lambda rng, n, d: rng.randrange(0, 50_000) if d == "up" else 10**9) as proxy:
            for _ in range(6):
                with socket.create_connection(proxy.address) as client:
                    try:
                        while True:
                            client.sendall(os.urandom(4096))
                    except OSError:
                        pass
            thread.join(timeout=30)
    finally:
        server.close()
    assert received == [c.offset for c in proxy.cuts], (received, proxy.cuts)
    assert {c.direction for c in proxy.cuts} == {"up"} and len(proxy.cuts) == 6


# The minimal, deterministic form of what the cut link above runs into (in-process, no FUSE;
# it belongs with the Recorder's unit tests): a task waiting in Recorder.wait_durable is
# cancelled (the shipper's connection was cut, or forwarding turned off) after it took a
# sync ticket but before the worker thread ran it. finish_sync() then raises
# RuntimeError and the ticket stays "in flight" for ever: every later fsync on the
# mount, and the final close, fail, and the mount daemon dies.
async def test_journal_sync_survives_a_cancelled_waiter(tmp_path: Path) -> None:
    import trio
    import trio.testing

    from octofs.journal import JournalWriter
    from octofs.ops import CreateOp
    from octofs.recorder import Recorder

    writer = JournalWriter.open(tmp_path / "journal", vault_id=bytes(16), epoch=1)
    recorder = Recorder(writer)
    recorder.record(CreateOp(b"f", 0o644, 0, 0, 1))
    scope = trio.CancelScope()

    async def waiter() -> None:
        with scope:
            await recorder.wait_durable(1)

    limiter = trio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = 1
    await limiter.acquire()  # every worker thread is busy, so the waiter's fsync has to queue
    released = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # e.g. the link was cut ...
            limiter.release()  # ... and a worker thread is free again
            released = True
    finally:
        if not released:
            limiter.release()
    with trio.fail_after(10):
        await recorder.wait_durable(1)  # the next fsync must work
    assert writer.durable_seq == 1
    writer.close()


# -- 4. forwarding off -------------------------------------------------------------------------------


def test_forwarding_off_keeps_ops_in_the_journal_and_survives_a_remount(
        tmp_path: Path, secret: Path, target: Serve) -> None:
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str})
    replica = target.root / "vault"
    with mounted(vault) as m:
        write_file(m.mnt / "before", b"shipped\n")
        m.wait_synced(SYNC_TIMEOUT_S)
        res = run_octofs("forward", "off", str(m.mnt))
        assert res.returncode == 0 and res.stdout.endswith(" is off\n"), (res.stdout, res.stderr)
        st = m.status()
        assert (st["forwarding"], st["targets"][0]["state"]) == ("off", "off")
        wait_until(lambda: not target.vault_status("vault")["connected"], timeout=30, what="the target disconnected")
        frozen = tree_snapshot(replica, mtime=True)
        applied = target.applied_seq("vault")
        acked = m.target_status("t1")["acked_seq"]
        pending, size = [], []
        for k in range(4):
            write_file(m.mnt / f"while-off-{k}", os.urandom(20_000) * (k + 1))
            os.rename(m.mnt / f"while-off-{k}", m.mnt / f"renamed-{k}")
            st = m.status()
            t = st["targets"][0]
            pending.append(t["pending_ops"])
            size.append(st["journal"]["bytes"])  # the records' bytes (the live segment may have zeros after them)
            assert (st["forwarding"], t["state"], t["acked_seq"]) == ("off", "off", acked), t
            assert t["pending_ops"] == st["journal"]["last_seq"] - acked
            assert target.applied_seq("vault") == applied
        assert pending == sorted(set(pending)) and pending[0] > 0, pending  # growing
        assert size == sorted(set(size)), size  # the journal on disk grows
        res = run_octofs("status", "--wait-synced", "--timeout", "5", str(m.mnt))
        assert res.returncode == 50, (res.returncode, res.stderr)
        assert "forwarding is off" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        # The ops wait on disk, every one of them, in order.
        last = last_seq(m)
        seqs = [r.seq for r in JournalReader(m.journal_dir).records(acked + 1)]
        assert seqs == list(range(acked + 1, last + 1))
        assert tree_snapshot(replica, mtime=True) == frozen
    # Remounted: still off (the setting is saved), still nothing shipped.
    with mounted(vault) as m:
        st = m.status()
        t = st["targets"][0]
        assert (st["forwarding"], t["state"], st["journal"]["last_seq"]) == ("off", "off", last), st
        # Before the first connect, acked_seq is the value the janitor last saved (once a
        # second, not at unmount), so pending_ops may over-count here, never under-count.
        assert t["pending_ops"] >= last - acked, t
        write_file(m.mnt / "after-remount", b"still off\n")
        assert m.target_status("t1")["pending_ops"] > last - acked
        res = run_octofs("status", "--wait-synced", "--timeout", "5", str(m.mnt))
        assert res.returncode == 50, res.stderr
        assert tree_snapshot(replica, mtime=True) == frozen
        assert target.applied_seq("vault") == applied
        res = run_octofs("forward", "on", str(m.mnt))
        assert res.returncode == 0 and res.stdout.endswith(" is on\n"), (res.stdout, res.stderr)
        res = run_octofs("status", "--wait-synced", "--timeout", str(SYNC_TIMEOUT_S), str(m.mnt))
        assert res.returncode == 0, res.stderr + m.log()
        t = m.target_status("t1")
        assert (t["state"], t["pending_ops"]) == ("connected", 0), t
        res = run_octofs("forward", "on", str(m.mnt))
        assert res.returncode == 0 and res.stdout.endswith(" is already on\n"), (res.stdout, res.stderr)
        assert_replica_exact(m, target)


def test_forward_names_the_vault(tmp_path: Path, secret: Path, target: Serve) -> None:
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str}, name="sales")
    with mounted(vault) as m:
        res = run_octofs("forward", "off", str(m.mnt))
        assert (res.returncode, res.stdout) == (0, "octofs: forwarding for vault sales is off\n"), res.stderr
        res = run_octofs("forward", "off", "--json", str(m.mnt))
        assert json.loads(res.stdout) == {"vault": "sales", "status": "already_off"}


def test_lag_counts_ops_journaled_before_a_remount(tmp_path: Path, secret: Path, target: Serve) -> None:
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str})
    with mounted(vault) as m:
        m.wait_synced(SYNC_TIMEOUT_S)
        assert run_octofs("forward", "off", str(m.mnt)).returncode == 0
        write_file(m.mnt / "pending", b"waits in the journal\n")
    with mounted(vault) as m:
        t = m.target_status("t1")
        assert t["pending_ops"] > 0
        assert t["lag_s"] > 0, t  # the pending op is older than this mount


# -- 5. topologies --------------------------------------------------------------------------------------


def test_two_targets_one_stopped_for_a_while(tmp_path: Path, secret: Path) -> None:
    with (serving(tmp_path / "t1", secret, workdir=tmp_path, port=free_port(), name="t1") as t1,
          serving(tmp_path / "t2", secret, workdir=tmp_path, port=free_port(), name="t2") as t2):
        vault = vault_yaml(tmp_path / "p", secret, {"t1": t1.address_str, "t2": t2.address_str})
        with mounted(vault) as m:
            mixed_workload(m.mnt)
            m.wait_synced(SYNC_TIMEOUT_S)
            assert t2.stop(signal.SIGTERM) == 0
            t2_before = tree_snapshot(t2.root / "vault", mtime=True)
            for i in range(50):
                write_file(m.mnt / f"while-t2-down-{i}", os.urandom(5000), fsync=i % 10 == 0)
            os.rename(m.mnt / "app.db", m.mnt / "app-renamed.db")
            # t1 keeps up on its own (a barrier for one target: its acked seq in status).
            seq = last_seq(m)
            wait_until(lambda: m.target_status("t1")["acked_seq"] == seq, timeout=SYNC_TIMEOUT_S, what="t1 acks")
            assert_replica_exact(m, t1)
            t = m.target_status("t2")
            assert t["state"] in ("disconnected", "connecting") and t["pending_ops"] > 0, t
            assert tree_snapshot(t2.root / "vault", mtime=True) == t2_before
            t2.start()  # on the same port, so the same address in vault.yaml
            write_file(m.mnt / "after-t2-back", b"both\n")
            m.wait_synced(SYNC_TIMEOUT_S)
            for name in ("t1", "t2"):
                t = m.target_status(name)
                assert (t["state"], t["pending_ops"]) == ("connected", 0), t
            assert_replica_exact(m, t1)
            assert_replica_exact(m, t2)


def test_two_primaries_into_one_target_and_a_same_name_impostor(tmp_path: Path, secret: Path, target: Serve) -> None:
    va = vault_yaml(tmp_path / "a", secret, {"t": target.address_str}, name="alpha")
    vb = vault_yaml(tmp_path / "b", secret, {"t": target.address_str}, name="beta")
    with mounted(va) as a, mounted(vb) as b:
        for i in range(20):  # interleaved: both streams are live at once
            write_file(a.mnt / f"alpha-{i}", b"A" * (i * 100))
            write_file(b.mnt / f"beta-{i}", b"B" * (i * 100))
        os.mkdir(a.mnt / "only-in-alpha")
        os.symlink("beta-1", b.mnt / "only-in-beta")
        a.wait_synced(SYNC_TIMEOUT_S)
        b.wait_synced(SYNC_TIMEOUT_S)
        assert sorted(os.listdir(target.root)) == [".octofs", "alpha", "beta"]
        alpha_paths = tree_snapshot(target.root / "alpha").keys()
        beta_paths = tree_snapshot(target.root / "beta").keys()
        assert not [p for p in alpha_paths if p.startswith(b"beta") or p == b"only-in-beta"], alpha_paths
        assert not [p for p in beta_paths if p.startswith(b"alpha") or p == b"only-in-alpha"], beta_paths
        assert_replica_exact(a, target, "alpha")
        assert_replica_exact(b, target, "beta")

        # A third primary presents the name "alpha" with another identity (a fresh state dir).
        alpha_before = tree_snapshot(target.root / "alpha", mtime=True)
        vc = vault_yaml(tmp_path / "c", secret, {"t": target.address_str}, name="alpha")
        with mounted(vc) as c:
            write_file(c.mnt / "intruder", b"must not arrive\n")
            error = wait_until(lambda: c.target_status("t")["last_error"], timeout=30,
                               what="the impostor's refusal in its status")
            assert "refused" in error and "vault id" in error, error
            t = c.target_status("t")
            assert t["state"] != "connected" and t["acked_seq"] == 0 and t["pending_ops"] > 0, t
            wait_until(lambda: "a different vault with the same name is refused" in target.log(10**6), timeout=10,
                       what=f"the refusal in the target's log\n{target.log()}")
            assert tree_snapshot(target.root / "alpha", mtime=True) == alpha_before
            # The real alpha keeps streaming meanwhile.
            write_file(a.mnt / "alpha-after", b"still mine\n")
            a.wait_synced(SYNC_TIMEOUT_S)
        v = target.vault_status("alpha")
        assert v["vault_id"] == (a.state_dir / "vault_id").read_text().strip()
        assert not (target.root / "alpha" / "intruder").exists()
        assert_replica_exact(a, target, "alpha")
        assert_replica_exact(b, target, "beta")


# -- 6. status during a stall ----------------------------------------------------------------------------


def test_status_during_a_stall(tmp_path: Path, secret: Path, target: Serve) -> None:
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str})
    with mounted(vault) as m:
        write_file(m.mnt / "first", b"1\n")
        m.wait_synced(SYNC_TIMEOUT_S)
        assert target.stop() == 0
        wait_until(lambda: m.target_status("t1")["state"] in ("disconnected", "connecting"), timeout=30,
                   what="the shipper noticing the target is gone")
        pending = []
        for i in range(3):
            write_file(m.mnt / f"stalled-{i}", os.urandom(1000))
            t = m.target_status("t1")
            assert t["state"] in ("disconnected", "connecting"), t
            pending.append(t["pending_ops"])
        assert pending == sorted(set(pending)) and pending[0] > 0, pending
        lag0 = m.target_status("t1")["lag_s"]
        t = wait_until(lambda: (s := m.target_status("t1"))["lag_s"] > 1.0 and s, timeout=30,
                       what="lag_s to exceed 1 s")
        assert t["lag_s"] > lag0 and t["pending_ops"] == pending[-1], (lag0, t)
        assert t["last_error"], t  # e.g. connection refused
        target.start()
        res = run_octofs("status", "--wait-synced", "--timeout", str(SYNC_TIMEOUT_S), str(m.mnt))
        assert res.returncode == 0, res.stderr + m.log()
        t = m.target_status("t1")
        assert (t["state"], t["pending_ops"], t["lag_s"], t["last_error"]) == ("connected", 0, 0, None), t
        assert_replica_exact(m, target)


# -- 7. exclude over replication -----------------------------------------------------------------------


def test_exclude_over_replication(tmp_path: Path, secret: Path, target: Serve) -> None:
    patterns = ["*.tmp"]
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str}, exclude=patterns)
    replica = target.root / "vault"
    with mounted(vault) as m:
        mnt = m.mnt
        write_file(mnt / "report.txt", b"first version\n")
        write_file(mnt / "scratch.tmp", b"never shipped\n")
        m.wait_synced(SYNC_TIMEOUT_S)
        assert (replica / "report.txt").read_bytes() == b"first version\n"
        # Write-temp-then-rename: the content arrives whole, with its mode, xattrs and mtime.
        body = os.urandom(70_000)
        fd = os.open(mnt / "doc.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, body[:30_000])
        os.pwrite(fd, body[30_000:], 30_000)
        os.fsync(fd)
        os.close(fd)
        os.setxattr(mnt / "doc.tmp", "user.origin", b"editor")
        os.rename(mnt / "doc.tmp", mnt / "doc.txt")
        # ... also a whole directory, and over an existing file.
        (mnt / "site.tmp" / "css").mkdir(parents=True)
        write_file(mnt / "site.tmp" / "index.html", b"<h1>new</h1>\n")
        write_file(mnt / "site.tmp" / "css" / "a.css", b"body{}\n")
        write_file(mnt / "site.tmp" / "junk.tmp", b"excluded inside\n")
        os.rename(mnt / "site.tmp", mnt / "site")
        write_file(mnt / "report.tmp", b"second version\n", fsync=True)
        os.rename(mnt / "report.tmp", mnt / "report.txt")
        # The other way: renamed to an excluded name, it disappears from the target.
        write_file(mnt / "going.txt", b"here for now\n")
        m.wait_synced(SYNC_TIMEOUT_S)
        assert (replica / "going.txt").exists()
        os.rename(mnt / "going.txt", mnt / "going.tmp")
        m.wait_synced(SYNC_TIMEOUT_S)
        assert (replica / "doc.txt").read_bytes() == body
        assert (replica / "report.txt").read_bytes() == b"second version\n"
        assert (replica / "site" / "css" / "a.css").read_bytes() == b"body{}\n"
        assert not (replica / "going.txt").exists()
        assert not [p for p in tree_snapshot(replica) if p.endswith(b".tmp")]
        seq = last_seq(m)
        v = target.vault_status("vault")
        assert (v["applied_seq"], v["needs_resync"]) == (seq, None), v
        lines = diff_snapshots(snapshot_minus_excluded(m.backing, patterns), tree_snapshot(replica, mtime=True))
        assert not lines, "replica differs from backing minus excluded (a=backing, b=replica):\n" + "\n".join(lines)


# -- 8. wrong secret ---------------------------------------------------------------------------------------


def test_wrong_secret_on_the_primary(tmp_path: Path, secret: Path, target: Serve) -> None:
    primary_secret = tmp_path / "primary-secret"
    shutil.copyfile(secret, primary_secret)
    vault = vault_yaml(tmp_path / "p", primary_secret, {"t1": target.address_str})
    replica = target.root / "vault"
    with mounted(vault) as m:
        write_file(m.mnt / "shipped", b"while the secrets matched\n")
        m.wait_synced(SYNC_TIMEOUT_S)
        assert_replica_exact(m, target)
    before = tree_snapshot(replica, mtime=True)
    applied = target.applied_seq("vault")
    primary_secret.write_text(os.urandom(16).hex() + "\n")  # the primary's secret no longer matches
    with mounted(vault) as m:
        write_file(m.mnt / "not-shipped", b"writes still work on the primary\n")
        error = wait_until(lambda: m.target_status("t1")["last_error"], timeout=30, what="an authentication error")
        assert "authentication" in error.lower(), error
        t = m.target_status("t1")
        assert t["state"] != "connected" and t["pending_ops"] > 0, t
        res = run_octofs("status", "--wait-synced", "--timeout", "2", str(m.mnt))
        assert res.returncode == 53, res.stderr
        assert tree_snapshot(replica, mtime=True) == before
        v = target.vault_status("vault")
        assert (v["applied_seq"], v["connected"]) == (applied, False), v
    assert not (replica / "not-shipped").exists()


# -- journal space: segments go once every target has acked them; a full journal waits -------------


def test_acked_segments_dropped_and_full_journal_waits_for_target(tmp_path: Path, secret: Path,
                                                                  target: Serve) -> None:
    """A 1 MiB journal (128 KiB segments) carries 4 MiB of writes: while the target is down
    the writer blocks (nothing fails, nothing is lost); when it returns, acked segments are
    dropped, the writer resumes, and the copy converges."""
    vault = vault_yaml(tmp_path / "p", secret, {"t1": target.address_str}, journal={"max_size": "1MiB"})
    chunk = os.urandom(64 * 1024)
    with mounted(vault) as m:
        target.stop()
        done = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                with open(m.mnt / "stream", "wb") as f:
                    for _ in range(64):  # 4 MiB
                        f.write(chunk)
                        f.flush()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        v = wait_until(lambda: (s := m.status())["blocked_changes"] > 0 and s, timeout=60,
                       what="the writer to block on the full journal")
        assert v["journal_full"] and v["journal"]["bytes"] <= 1024 * 1024
        assert not done.is_set()  # blocked, not failed
        target.start()
        assert done.wait(120), "the writer did not resume after the target came back"
        t.join(10)
        assert not errors, errors
        m.wait_synced(SYNC_TIMEOUT_S)
        v = wait_until(lambda: (s := m.status())["journal"]["first_seq"] > 1 and s, timeout=30,
                       what="acked segments to be dropped")
        assert v["journal"]["bytes"] <= 1024 * 1024 and v["blocked_changes"] == 0 and not v["failsafe"]
    assert_trees_equal(m.backing, target.root / "vault", mtime=True)
    assert (target.root / "vault" / "stream").stat().st_size == 64 * len(chunk)
