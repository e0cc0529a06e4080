"""octofs benchmark: the same workloads on a plain directory and on an octofs mount, interleaved.

Everything octofs-side runs through the `octofs` CLI (`octofs serve` on 127.0.0.1,
`octofs mount` with one async target), as a user would run it. Each repetition runs
every workload once natively and once on the mount (alternating which goes first),
and the table shows medians and the ratio octofs/native from the same run.

The native runs use a plain directory beside the vault's backing dir, on the same
filesystem (octofs owns its backing dir, so the benchmark does not write into it).

Set-up is not timed, and neither is its replication: a workload that writes much before
its timed part (the 128 MiB file of the read workloads, pgbench -i) waits on an octofs
side until the target has it (`settle`), so the target is not still applying the set-up
while the timed part runs. What the timed part writes is replicated while it runs.

A third side, the reference (``--no-passthrough`` skips it): scripts/refpassthrough.py,
a plain pure-Python pyfuse3 passthrough with the same mount options and kernel settings
as octofs and real fsyncs, but nothing journaled or shipped, mounted over its own
directory beside the others and interleaved with them. Its column shows what any Python
FUSE file system reaches on this machine; "octofs/pt" is octofs (async) / passthrough.

Databases: SQLite in WAL mode (synchronous=FULL) and in rollback mode (DELETE,
synchronous=EXTRA), one row per transaction; and pgbench: PostgreSQL (Debian's
package, run as the postgres user on a Unix socket) with its data directory on the
side under test, `pgbench -i`, then `pgbench -c 2 -j 2 -T N`. Without PostgreSQL
the pgbench workload is skipped with a note (JSON: "skipped").

Replication figures, after each octofs run:
  * wait-synced s: how long `octofs status --wait-synced` takes to return (a proxy
    for replication lag; it includes the CLI's own start-up, shown as "idle CLI").
  * wire B/B: the target's `bytes_sent` delta divided by the bytes the workload
    passed to write() (``wchar`` from /proc/self/io, so SQLite's writes count too).
  * replication lag: after the workloads, a probe writes 16-byte records at 1,000/s with
    an fsync every 10 on the async mount while a thread polls the target's copy: p50,
    p99 and max of (seen on the target - the covering fsync returned).
  * RSS behind: forwarding off, 1 GiB written, forwarding on: the mount daemon's RSS
    while the target catches up (it must not grow with how far behind the target is).
With fio installed (scripts/setup installs it) the block-I/O workloads (1 MiB sequential
write, 4 KiB random writes, 1 MiB sequential reads) are fio jobs (psync, one job);
otherwise, or with --no-fio, Python loops (os.write/os.pread...). The cold read drops
the page cache (as root) before its timed read.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import pwd
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
KiB4 = 4096


# -- workloads -----------------------------------------------------------------------------------
# Each takes (directory, size parameters) and returns (amount, seconds): amount in the unit's
# numerator (MiB, ops, files, transactions), seconds of the timed part only.
#
# A workload whose untimed set-up writes much (the file a read workload reads, pgbench -i's
# tables) calls settle(d) before its timed part: on an octofs side that waits until the target
# has the set-up (`octofs status --wait-synced`), so the set-up's replication does not run
# during the timed part and is not charged to it; the native and passthrough sides have
# nothing to wait for. What the timed part itself writes is replicated while it runs, as usual.

_SETTLERS: dict[Path, Callable[[], object]] = {}  # an octofs mountpoint -> its wait_synced


def settle(d: Path) -> None:
    """Wait until the target of the octofs mount holding ``d`` (if any) has everything written so far."""
    for mnt, wait in _SETTLERS.items():
        if d.is_relative_to(mnt):
            wait()
            return


def wl_seq_write(d: Path, p: dict) -> tuple[float, float]:
    """1 MiB sequential writes of N MiB, one fsync at the end."""
    buf = os.urandom(MiB)
    fd = os.open(d / "seq.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(p["seq_mib"]):
            os.write(fd, buf)
        os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return p["seq_mib"], dt


def _rand_writes(d: Path, p: dict, *, fsync_each: bool, n: int) -> tuple[float, float]:
    rng = random.Random(42)
    blocks = p["rand_file_mib"] * MiB // KiB4
    buf = os.urandom(KiB4)
    fd = os.open(d / "rand.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, blocks * KiB4)  # sparse: nothing written before the timed part
        offsets = [rng.randrange(blocks) * KiB4 for _ in range(n)]
        t0 = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, buf, off)
            if fsync_each:
                os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return n, dt


def wl_rand_write_fsync(d: Path, p: dict) -> tuple[float, float]:
    """4 KiB random writes, fsync after each."""
    return _rand_writes(d, p, fsync_each=True, n=p["rand_fsync_ops"])


def wl_rand_write_buffered(d: Path, p: dict) -> tuple[float, float]:
    """4 KiB random writes, no fsync (page cache / FUSE requests)."""
    return _rand_writes(d, p, fsync_each=False, n=p["rand_buffered_ops"])


def wl_seq_read_hot(d: Path, p: dict) -> tuple[float, float]:
    """1 MiB sequential reads of a file that was just written and read once (hot cache)."""
    path = d / "read.bin"
    buf = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(p["read_mib"]):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    settle(d)
    total = 0
    t0 = 0.0
    for rnd in range(1 + p["read_passes"]):  # pass 0 warms the cache, untimed
        if rnd == 1:
            t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                chunk = os.read(fd, MiB)
                if not chunk:
                    break
                if rnd:
                    total += len(chunk)
        finally:
            os.close(fd)
    return total / MiB, time.perf_counter() - t0


def wl_small_files(d: Path, p: dict) -> tuple[float, float]:
    """Create + write 4 KiB + close N files, then delete them all; files/s over both phases."""
    buf = os.urandom(KiB4)
    sub = d / "small"
    sub.mkdir()
    names = [str(sub / f"f{i:06d}") for i in range(p["small_files"])]
    t0 = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.close(fd)
    for name in names:
        os.unlink(name)
    return len(names), time.perf_counter() - t0


def _sqlite(d: Path, p: dict, journal_mode: str, synchronous: str) -> tuple[float, float]:
    """One INSERT of 100 bytes per transaction: each commit waits for at least one fsync."""
    db = sqlite3.connect(d / "bench.db", isolation_level=None)
    try:
        db.execute(f"PRAGMA journal_mode={journal_mode}")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        payload = os.urandom(100)
        n = p["sqlite_tx"]
        t0 = time.perf_counter()
        for i in range(n):
            db.execute("BEGIN")
            db.execute("INSERT INTO t (v) VALUES (?)", (payload,))
            db.execute("COMMIT")
        dt = time.perf_counter() - t0
    finally:
        db.close()
    return n, dt


def wl_sqlite(d: Path, p: dict) -> tuple[float, float]:
    """SQLite, journal_mode=WAL, synchronous=FULL: one fsync of the WAL per commit."""
    return _sqlite(d, p, "WAL", "FULL")


def wl_sqlite_rollback(d: Path, p: dict) -> tuple[float, float]:
    """SQLite, journal_mode=DELETE, synchronous=EXTRA: per commit the journal is created, fsynced,
    the database written and fsynced, the journal unlinked and the directory fsynced (EXTRA: under
    FULL that last fsync is missing and a crash may roll back the last commit)."""
    return _sqlite(d, p, "DELETE", "EXTRA")


# PostgreSQL refuses to run as root: initdb, the server and pgbench run as Debian's
# ``postgres`` user, the server on a Unix socket only, its data directory in the workload's
# directory (so the postgres user must be able to reach it: see main()'s workdir).


def _pg_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/VERSION/bin holding pgbench (Debian's layout), if any."""
    found = [Path(x).parent for x in glob.glob("/usr/lib/postgresql/*/bin/pgbench")]
    return max(found, key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0, default=None)


def pgbench_unavailable() -> str | None:
    """Why the pgbench workload cannot run here, or None when it can."""
    if _pg_bindir() is None:
        return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pgbench; scripts/setup installs it)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no postgres user"
    if os.geteuid() != 0:
        return "it needs root (to run PostgreSQL as the postgres user)"
    return None


def _as_postgres(cmd: list, *, timeout: float, what: str) -> str:
    """Run a PostgreSQL tool as the postgres user; its stdout, or RuntimeError with its output."""
    pg = pwd.getpwnam("postgres")
    r = subprocess.run([str(c) for c in cmd], user=pg.pw_uid, group=pg.pw_gid, extra_groups=[], cwd="/",
                       env=_pg_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def _pg_env() -> dict:
    return {"PATH": f"{_pg_bindir()}:/usr/bin:/bin", "HOME": "/tmp", "LC_ALL": "C.UTF-8"}


def wl_pgbench(d: Path, p: dict) -> tuple[float, float]:
    """PostgreSQL (fsync on) with its data directory in ``d``: initdb, ``pgbench -i -s S``, then the
    timed part, ``pgbench -c 2 -j 2 -T N`` (TPC-B-like: each transaction commits, WAL fsync).

    Returns (transactions, seconds) as pgbench measured them (tps without connection set-up).
    The server is stopped (and reaped) before returning, so its writes count in ``wchar()``.
    """
    bindir, pg = _pg_bindir(), pwd.getpwnam("postgres")
    os.chown(d, pg.pw_uid, pg.pw_gid)
    try:
        _as_postgres(["test", "-w", d, "-a", "-x", d], timeout=30, what=f"access to {d}")
    except RuntimeError:
        raise RuntimeError(f"the postgres user cannot reach {d}: give a --workdir whose parents every user "
                           "may search (e.g. under /var/tmp)") from None
    datadir = d / "pgdata"
    # The socket lives outside d: a socket's path is limited to 107 bytes.
    sock = Path(tempfile.mkdtemp(prefix="octofs-bench-pg-", dir="/tmp"))
    os.chown(sock, pg.pw_uid, pg.pw_gid)
    log = sock / "postgres.log"
    server = None
    try:
        # --no-sync: the set-up's files are not fsynced one by one (untimed; the timed part fsyncs).
        _as_postgres([bindir / "initdb", "-D", datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--locale=C.UTF-8", "--no-sync"], timeout=600, what="initdb")
        with open(log, "wb") as logf:
            server = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(datadir), "-k", str(sock), "-c", "listen_addresses=",
                 "-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "full_page_writes=on"],
                user=pg.pw_uid, group=pg.pw_gid, extra_groups=[], cwd="/", env=_pg_env(),
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + 120
        while subprocess.run([str(bindir / "pg_isready"), "-q", "-h", str(sock)], user=pg.pw_uid, group=pg.pw_gid,
                             extra_groups=[], cwd="/", env=_pg_env(), check=False).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on {datadir} did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        _as_postgres([bindir / "pgbench", "-h", sock, "-i", "-q", "-s", p["pgbench_scale"], "postgres"],
                     timeout=1800, what="pgbench -i")
        settle(d)
        out = _as_postgres([bindir / "pgbench", "-h", sock, "-c", "2", "-j", "2", "-T", p["pgbench_s"], "postgres"],
                           timeout=p["pgbench_s"] + 600, what="pgbench")
        done = re.search(r"number of transactions actually processed: (\d+)", out)
        tps = re.search(r"tps = ([0-9.]+)", out)
        if not done or not tps:
            raise RuntimeError(f"unexpected pgbench output:\n{out}")
        return int(done[1]), int(done[1]) / float(tps[1])
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown (a checkpoint, then exit)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)  # its own session: the postmaster and its children
                server.wait(timeout=30)
        shutil.rmtree(sock, ignore_errors=True)


# -- fio (when installed) and the cold read --------------------------------------------------------
# With fio on PATH (scripts/setup installs it) the five block-I/O workloads run as fio jobs
# (psync engine, one job); without it, or with --no-fio, as the Python loops above.

FIO: str | None = None  # set by main(): the fio binary, or None for the Python workloads


def _fio(d: Path, rw: str, *extra: str) -> dict:
    """Run one fio job in ``d``; return its JSON result for the job."""
    out = subprocess.run([FIO, "--name=bench", f"--filename={d / 'fio.bin'}", f"--rw={rw}", "--ioengine=psync",
                          "--fallocate=none", "--output-format=json", *extra],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]  # fio may print notes before the JSON


def _fio_rate(job: dict, side: str, unit_bytes: int) -> tuple[float, float]:
    io = job[side]
    return io["io_bytes"] / unit_bytes, max(io["runtime"], 1) / 1000  # runtime: ms


def fio_seq_write(d: Path, p: dict) -> tuple[float, float]:
    return _fio_rate(_fio(d, "write", "--bs=1M", f"--size={p['seq_mib']}m", "--end_fsync=1"), "write", MiB)


def fio_rand_write(d: Path, p: dict, *, fsync_each: bool) -> tuple[float, float]:
    n = p["rand_fsync_ops" if fsync_each else "rand_buffered_ops"]
    job = _fio(d, "randwrite", "--bs=4k", f"--size={p['rand_file_mib']}m", f"--io_size={n * 4}k",
               "--randseed=42", *(["--fsync=1"] if fsync_each else []))
    return _fio_rate(job, "write", KiB4)


def _write_file(path: Path, mib: int) -> None:
    buf = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


def fio_seq_read_hot(d: Path, p: dict) -> tuple[float, float]:
    _write_file(d / "fio.bin", p["read_mib"])
    settle(d)
    _fio(d, "read", "--bs=1M", f"--size={p['read_mib']}m", "--invalidate=0")  # warm the cache, untimed
    job = _fio(d, "read", "--bs=1M", f"--size={p['read_mib']}m", "--invalidate=0", f"--loops={p['read_passes']}")
    return _fio_rate(job, "read", MiB)


def drop_caches_unavailable() -> str | None:
    """Why the cold read cannot run here (it needs root to drop the page cache), or None."""
    return None if os.access("/proc/sys/vm/drop_caches", os.W_OK) else "dropping the page cache needs root"


def _drop_caches() -> None:
    os.sync()  # only clean pages can be dropped
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wl_seq_read_cold(d: Path, p: dict) -> tuple[float, float]:
    """1 MiB sequential reads of a file no cache holds (page cache dropped before the timed read)."""
    path = d / ("fio.bin" if FIO else "read.bin")
    _write_file(path, p["read_mib"])
    settle(d)
    _drop_caches()
    if FIO:
        return _fio_rate(_fio(d, "read", "--bs=1M", f"--size={p['read_mib']}m", "--invalidate=1"), "read", MiB)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        while chunk := os.read(fd, MiB):
            total += len(chunk)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return total / MiB, dt


def _with_fio(python_fn: Callable, fio_fn: Callable) -> Callable[[Path, dict], tuple[float, float]]:
    def run(d: Path, p: dict) -> tuple[float, float]:
        return fio_fn(d, p) if FIO else python_fn(d, p)
    run.__doc__ = python_fn.__doc__
    return run


@dataclass(frozen=True)
class Workload:
    name: str
    unit: str
    fn: Callable[[Path, dict], tuple[float, float]]
    fsyncs: bool = False  # also run on a mount whose target is in sync mode


WORKLOADS = [
    Workload("seq-write-1m-fsync", "MiB/s", _with_fio(wl_seq_write, fio_seq_write), fsyncs=True),
    Workload("rand-write-4k-fsync", "ops/s",
             _with_fio(wl_rand_write_fsync, lambda d, p: fio_rand_write(d, p, fsync_each=True)), fsyncs=True),
    Workload("rand-write-4k-buffered", "ops/s",
             _with_fio(wl_rand_write_buffered, lambda d, p: fio_rand_write(d, p, fsync_each=False))),
    Workload("seq-read-1m-hot", "MiB/s", _with_fio(wl_seq_read_hot, fio_seq_read_hot)),
    Workload("seq-read-1m-cold", "MiB/s", wl_seq_read_cold),  # skipped, with a note, without root
    Workload("small-files", "files/s", wl_small_files),
    Workload("sqlite-wal-full", "tx/s", wl_sqlite, fsyncs=True),
    Workload("sqlite-delete-extra", "tx/s", wl_sqlite_rollback, fsyncs=True),
    Workload("pgbench", "tps", wl_pgbench, fsyncs=True),  # skipped, with a note, without PostgreSQL
]

DEFAULT_SIZES = {"seq_mib": 128, "rand_file_mib": 64, "rand_fsync_ops": 1000, "rand_buffered_ops": 20000,
                 "read_mib": 128, "read_passes": 2, "small_files": 1000, "sqlite_tx": 500,
                 "pgbench_scale": 2, "pgbench_s": 10}
QUICK_SIZES = {"seq_mib": 8, "rand_file_mib": 4, "rand_fsync_ops": 100, "rand_buffered_ops": 1000,
               "read_mib": 8, "read_passes": 1, "small_files": 100, "sqlite_tx": 50,
               "pgbench_scale": 1, "pgbench_s": 2}


# -- octofs through its CLI ----------------------------------------------------------------------


def _env() -> dict:
    pp = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{pp}" if pp else str(REPO)}


def octofs(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "octofs", *args], check=False, text=True, capture_output=True,
                          env=_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"octofs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def wchar() -> int:
    """Bytes this process has passed to write()-like syscalls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


class Octofs:
    """A target (`octofs serve`) and a vault mounted with it as its one target (``mode``: async or sync)."""

    def __init__(self, work: Path, mode: str = "async") -> None:
        self.work, self.mode = work, mode
        self.backing, self.target_root = work / "backing", work / "target"
        self.mnt, self.state = work / "mnt", work / "state"
        self.serve: subprocess.Popen | None = None
        self.mounted = False

    def start(self) -> None:
        for d in (self.backing, self.target_root, self.mnt):
            d.mkdir(parents=True, exist_ok=True)
        secret = self.work / "secret"
        secret.write_text(os.urandom(16).hex() + "\n")
        secret.chmod(0o600)
        ready = self.work / "serve-ready.json"
        with open(self.work / "serve.log", "wb") as log:
            self.serve = subprocess.Popen(
                [sys.executable, "-m", "octofs", "serve", "--root", str(self.target_root), "--listen",
                 "127.0.0.1:0", "--secret-file", str(secret), "--ready-file", str(ready)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(), cwd="/")
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.serve.poll() is not None:
                raise RuntimeError(f"octofs serve exited with {self.serve.returncode}; see {self.work}/serve.log")
            if time.monotonic() > deadline:
                raise RuntimeError("octofs serve not ready after 30 s")
            time.sleep(0.05)
        listen = json.loads(ready.read_text())["listen"]
        vault_yaml = self.work / "vault.yaml"
        vault_yaml.write_text(
            f"vault: bench-{self.mode}\n"
            f"backing: {self.backing}\n"
            f"state_dir: {self.state}\n"
            f"secret_file: {secret}\n"
            "allow_other: true\n"  # the pgbench workload's server runs as the postgres user
            "targets:\n"
            f"  - name: local\n    address: '{listen}'\n    mode: {self.mode}\n")
        octofs("mount", str(vault_yaml), str(self.mnt))
        self.mounted = True
        self.wait_synced()
        _SETTLERS[self.mnt] = self.wait_synced

    def status(self) -> dict:
        [vault] = json.loads(octofs("status", "--json", str(self.mnt)).stdout)["vaults"]
        return vault

    def bytes_sent(self) -> int:
        return sum(t["bytes_sent"] for t in self.status()["targets"])

    def wait_synced(self, timeout: float = 300) -> float:
        """Seconds `octofs status --wait-synced` took to return."""
        t0 = time.perf_counter()
        octofs("status", "--wait-synced", "--timeout", str(timeout), str(self.mnt), timeout=timeout + 60)
        return time.perf_counter() - t0

    def stop(self) -> list[str]:
        problems = []
        if self.mounted:
            res = octofs("umount", str(self.mnt), check=False)
            if res.returncode != 0:
                problems.append(f"octofs umount: {res.stderr.strip()}")
                octofs("umount", "--lazy", str(self.mnt), check=False)
            self.mounted = os.path.ismount(self.mnt)
            if self.mounted:
                problems.append(f"{self.mnt} is still mounted")
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            try:
                self.serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait(timeout=30)
        return problems


class Passthrough:
    """The reference: scripts/refpassthrough.py (a plain pyfuse3 passthrough, nothing journaled or
    shipped, mounted like octofs) over ``work/backing`` on ``work/mnt``."""

    def __init__(self, work: Path) -> None:
        self.work, self.backing, self.mnt = work, work / "backing", work / "mnt"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        for d in (self.backing, self.mnt):
            d.mkdir(parents=True, exist_ok=True)
        ready = self.work / "ready.json"
        with open(self.work / "refpassthrough.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "refpassthrough.py"), str(self.backing), str(self.mnt),
                 "--ready-file", str(ready), "--allow-other"],  # allow_other: pgbench's server is the postgres user
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(), cwd="/")
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"refpassthrough exited with {self.proc.returncode}; "
                                   f"see {self.work}/refpassthrough.log")
            if time.monotonic() > deadline:
                raise RuntimeError("refpassthrough not ready after 30 s")
            time.sleep(0.05)

    def stop(self) -> list[str]:
        """Unmount (the process then exits by itself); terminate, kill and lazy-unmount as the fallback."""
        problems = []
        if self.proc is None:
            return problems
        res = subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False, capture_output=True, text=True)
        if res.returncode != 0 and self.proc.poll() is None:
            problems.append(f"fusermount3 -u {self.mnt}: {res.stderr.strip()}")
            self.proc.terminate()  # its SIGTERM handler unmounts
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            problems.append("refpassthrough did not exit within 30 s of its unmount")
            self.proc.kill()
            self.proc.wait(timeout=30)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True)
            problems.append(f"{self.mnt} was still mounted")
        if self.proc.returncode not in (0, None):
            problems.append(f"refpassthrough exited with {self.proc.returncode}; see {self.work}/refpassthrough.log")
        return problems


# -- replication lag and memory ---------------------------------------------------------------------


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure_lag(fs: Octofs, seconds: float, rate: float, fsync_every: int = 10) -> dict:
    """Replication lag as an application sees it: time from a write's fsync on the mount until its bytes
    are on the target.

    A probe appends 16-byte records (its number and the time) at up to ``rate`` per second and fsyncs
    after every ``fsync_every`` of them (10: a database committing every 10 ms at 1,000 writes/s); a
    thread polls the target's copy of the file (its replica dir, same machine, same clock) and notes when
    each record appears. Lag = seen - the covering fsync returned, 0 when it was there before. (An fsync
    after every write would measure how many barriers a second the target's disk can make durable: each
    is a flush there, DESIGN invariant 2.)
    """
    name = "lag-probe.bin"
    dst = fs.target_root / f"bench-{fs.mode}" / name
    n = max(1, int(seconds * rate))
    fsynced, seen = [0.0] * n, [0.0] * n
    done = threading.Event()

    def poll() -> None:
        fd, i = None, 0
        try:
            while i < n and not done.is_set():
                if fd is None:
                    try:
                        fd = os.open(dst, os.O_RDONLY)
                    except FileNotFoundError:
                        time.sleep(0.0002)
                        continue
                data = os.pread(fd, 16 * (n - i), 16 * i)
                now = time.perf_counter()
                got = 0
                while got < len(data) // 16 and int.from_bytes(data[16 * got:16 * got + 8], "little") == i + 1:
                    seen[i] = now
                    i, got = i + 1, got + 1
                if not got:
                    time.sleep(0.0002)
        finally:
            if fd is not None:
                os.close(fd)

    fd = os.open(fs.mnt / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        t_start = time.perf_counter()
        for i in range(n):
            delay = t_start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            os.pwrite(fd, (i + 1).to_bytes(8, "little") + time.time_ns().to_bytes(8, "little"), 16 * i)
            if (i + 1) % fsync_every == 0 or i == n - 1:
                os.fsync(fd)
                now = time.perf_counter()
                for k in range(i - (i % fsync_every), i + 1):  # the writes this fsync covered
                    fsynced[k] = now
        elapsed = time.perf_counter() - t_start
        poller.join(timeout=60)
    finally:
        done.set()
        os.close(fd)
    os.unlink(fs.mnt / name)
    lags = [max(0.0, seen[i] - fsynced[i]) * 1000 for i in range(n) if seen[i]]
    if not lags:
        raise RuntimeError("lag probe: no write reached the target within 60 s")
    return {"writes": n, "writes_per_s": n / elapsed, "target_rate": rate, "fsync_every": fsync_every,
            "missing": n - len(lags),
            "p50_ms": _percentile(lags, 0.5), "p99_ms": _percentile(lags, 0.99), "max_ms": max(lags)}


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def measure_rss_behind(fs: Octofs, mib: int) -> dict:
    """Mount-daemon memory while a target is far behind: forwarding off, ``mib`` MiB written (1 MiB
    writes, files of 64 MiB), then forwarding on; RSS sampled every 20 ms until the target caught up."""
    pid = int((fs.state / "pid").read_text())
    octofs("forward", "off", str(fs.mnt))  # the mountpoint: vault names may repeat across bench runs
    d = fs.mnt / "rss-probe"
    d.mkdir()
    buf = os.urandom(MiB)
    try:
        for k in range(0, mib, 64):
            fd = os.open(d / f"f{k}", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for _ in range(min(64, mib - k)):
                    os.write(fd, buf)
                os.fsync(fd)
            finally:
                os.close(fd)
        pending = fs.status()["targets"][0]["pending_ops"]
        before = _rss_mib(pid)
    finally:
        octofs("forward", "on", str(fs.mnt))
    waiter = subprocess.Popen([sys.executable, "-m", "octofs", "status", "--wait-synced", "--timeout", "600",
                               str(fs.mnt)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = before
    t0 = time.perf_counter()
    while waiter.poll() is None:
        peak = max(peak, _rss_mib(pid))
        time.sleep(0.02)
    catch_up_s = time.perf_counter() - t0
    if waiter.returncode != 0:
        raise RuntimeError(f"rss probe: the target did not catch up ({waiter.returncode})")
    shutil.rmtree(d)
    return {"behind_mib": mib, "behind_ops": pending, "rss_before_mib": before, "rss_peak_catch_up_mib": peak,
            "catch_up_s": catch_up_s, "hwm_mib": _rss_mib(pid, "VmHWM")}


def measure_synchronize(work: Path, nfiles: int, big_mib: int) -> dict:
    """Synchronize (issue 4): a target pre-filled with the same tree as the backing dir (``nfiles``
    small files and one ``big_mib`` MiB file in which one 4 KiB page differs) is compared at first
    contact. Reports the time, the bytes on the wire and the file data sent."""
    fs = Octofs(work)
    replica = fs.target_root / "bench-async"
    for d in (fs.backing, replica):
        d.mkdir(parents=True)
    for i in range(nfiles):
        p = fs.backing / f"d{i // 250:03d}" / f"f{i % 250:03d}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(f"file {i}\n".encode() * (1 + i % 40))
    chunk = os.urandom(MiB)
    with open(fs.backing / "big.img", "wb") as f:
        for i in range(big_mib):
            f.write(i.to_bytes(8, "little") + chunk[8:])
    subprocess.run(["cp", "-a", f"{fs.backing}/.", str(replica)], check=True)
    with open(replica / "big.img", "r+b") as f:
        f.seek(random.Random(1).randrange(big_mib * 256) * 4096)
        f.write(os.urandom(4096))
    st = os.stat(fs.backing / "big.img")
    os.utime(replica / "big.img", ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        fs.start()  # waits until synced: the first-contact Synchronize has finished
        [t] = fs.status()["targets"]
        job = t["synchronize"]
        if job is None or job["state"] != "done":
            raise RuntimeError(f"synchronize probe: no finished Synchronize ({job})")
        return {"files": nfiles, "big_mib": big_mib, "elapsed_s": job["elapsed_s"], "bytes_on_wire": t["bytes_sent"],
                "repair_bytes": job["repair_bytes"], "differences": job["differences"],
                "bytes_compared": job["bytes_compared"]}
    finally:
        fs.stop()


# -- the run ---------------------------------------------------------------------------------------


def run_once(wl: Workload, base: Path, sizes: dict) -> float:
    d = base / f"run-{wl.name}"
    d.mkdir()
    try:
        amount, secs = wl.fn(d, sizes)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return amount / secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds, for tests)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every workload on each side (default 3)")
    ap.add_argument("--workloads", help="comma-separated subset of: " + ",".join(w.name for w in WORKLOADS))
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout (table goes to stderr)")
    ap.add_argument("--png", type=Path, help="write a chart of the ratios (only if matplotlib is installed)")
    ap.add_argument("--no-sync", action="store_true",
                    help="skip the second mount with a sync-mode target (used for fsync-heavy workloads)")
    ap.add_argument("--workdir", type=Path, help="where to put everything (default: a new temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (logs, journal) afterwards")
    ap.add_argument("--no-fio", action="store_true", help="use the Python workloads even if fio is installed")
    ap.add_argument("--no-passthrough", action="store_true",
                    help="skip the reference side (scripts/refpassthrough.py, a plain pyfuse3 passthrough)")
    ap.add_argument("--wan", action="store_true",
                    help="instead: replication over shaped links in network namespaces (compress, bandwidth, "
                         "delay + loss; scripts/bench_wan.py)")
    args = ap.parse_args()
    if args.wan:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_wan import run_wan

        return run_wan(Console(stderr=args.json), quick=args.quick, as_json=args.json, workdir=args.workdir,
                       keep=args.keep)
    global FIO
    FIO = None if args.no_fio else shutil.which("fio")
    console = Console(stderr=args.json)
    console.width = max(console.width, 160)  # keep the table's columns readable on narrow/piped output
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    by_name = {w.name: w for w in WORKLOADS}
    if args.workloads:
        names = [n.strip() for n in args.workloads.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            ap.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
        workloads = [by_name[n] for n in names]
    else:
        workloads = list(WORKLOADS)
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    skipped = {}
    if any(w.name == "pgbench" for w in workloads) and (why := pgbench_unavailable()):
        skipped["pgbench"] = why
        workloads = [w for w in workloads if w.name != "pgbench"]
        console.print(f"[yellow]pgbench: skipped, {why}[/yellow]")
    if any(w.name == "seq-read-1m-cold" for w in workloads) and (why := drop_caches_unavailable()):
        skipped["seq-read-1m-cold"] = why
        workloads = [w for w in workloads if w.name != "seq-read-1m-cold"]
        console.print(f"[yellow]seq-read-1m-cold: skipped, {why}[/yellow]")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="octofs-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    if args.workdir is None:
        work.chmod(0o755)  # not mkdtemp's 0700: pgbench's server (the postgres user) works in here
    native_dir = work / "native"
    native_dir.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fs = Octofs(work / "async")
    use_sync = not args.no_sync and any(w.fsyncs for w in workloads)
    fs_sync = Octofs(work / "sync", mode="sync") if use_sync else None
    pt = None if args.no_passthrough else Passthrough(work / "passthrough")
    results = {w.name: {"unit": w.unit, "native": [], "octofs": [], "sync": [], "passthrough": [],
                        "wait_synced_s": [], "wire_bytes": [], "written_bytes": []} for w in workloads}
    ok = False
    try:
        console.print(f"octofs bench: workdir {work}; {args.reps} rep(s); sizes {sizes}")
        fs.start()
        if fs_sync is not None:
            fs_sync.start()
        if pt is not None:
            pt.start()
        idle_cli = [fs.wait_synced() for _ in range(3)]
        for rep in range(args.reps):
            for wl in workloads:
                r = results[wl.name]
                sides = (["native", "octofs"] + (["passthrough"] if pt is not None else [])
                         + (["sync"] if fs_sync is not None and wl.fsyncs else []))
                shift = rep % len(sides)  # rotate which side goes first
                for side in sides[shift:] + sides[:shift]:
                    if side == "native":
                        r["native"].append(run_once(wl, native_dir, sizes))
                        continue
                    if side == "passthrough":
                        r["passthrough"].append(run_once(wl, pt.mnt, sizes))
                        continue
                    if side == "sync":
                        fs_sync.wait_synced()
                        r["sync"].append(run_once(wl, fs_sync.mnt, sizes))
                        continue
                    fs.wait_synced()  # earlier cleanups shipped, so the delta is this run's alone
                    sent0, w0 = fs.bytes_sent(), wchar()
                    d = fs.mnt / f"run-{wl.name}"
                    d.mkdir()
                    amount, secs = wl.fn(d, sizes)
                    written = wchar() - w0
                    r["octofs"].append(amount / secs)
                    r["wait_synced_s"].append(fs.wait_synced())
                    r["wire_bytes"].append(fs.bytes_sent() - sent0)
                    r["written_bytes"].append(written)
                    shutil.rmtree(d)
                console.print(f"  rep {rep + 1}/{args.reps} {wl.name}: native {r['native'][-1]:,.1f}, "
                              f"octofs {r['octofs'][-1]:,.1f}"
                              + (f", passthrough {r['passthrough'][-1]:,.1f}" if r["passthrough"] else "")
                              + (f", octofs sync {r['sync'][-1]:,.1f}" if r["sync"] else "") + f" {wl.unit}")
        fs.wait_synced()
        lag = measure_lag(fs, *((1.0, 200.0) if args.quick else (10.0, 1000.0)))
        console.print(f"  replication lag: {lag['writes']} writes at {lag['writes_per_s']:,.0f}/s, an fsync every "
                      f"{lag['fsync_every']}: "
                      f"p50 {lag['p50_ms']:.2f} ms, p99 {lag['p99_ms']:.2f} ms, max {lag['max_ms']:.2f} ms")
        rss = measure_rss_behind(fs, 16 if args.quick else 1024)
        syn = measure_synchronize(work / "synchronize", *((1000, 16) if args.quick else (10_000, 1024)))
        console.print(f"  Synchronize of {syn['files']:,} identical files + a {syn['big_mib']} MiB file with one 4 KiB "
                      f"page changed: {syn['elapsed_s']:.2f} s, {syn['bytes_on_wire']:,} bytes on the wire, "
                      f"{syn['repair_bytes']:,} bytes of file data sent")
        console.print(f"  mount daemon RSS with the target {rss['behind_mib']} MiB behind: "
                      f"{rss['rss_before_mib']:.0f} MiB, peak while it caught up {rss['rss_peak_catch_up_mib']:.0f} MiB")
        ok = True
    finally:
        problems = (fs.stop() + (fs_sync.stop() if fs_sync is not None else [])
                    + (pt.stop() if pt is not None else []))
        for p in problems:
            console.print(f"[red]{p}[/red]")
        if problems:
            ok = False
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        elif args.workdir is None or args.keep:
            console.print(f"left {work} behind")
    if not ok:
        return 1

    doc = {"reps": args.reps, "quick": args.quick, "sizes": sizes, "fio": FIO is not None,
           "idle_wait_synced_s": statistics.median(idle_cli), "workloads": {},
           "lag": lag,  # async target: fsync on the mount -> bytes on the target (measure_lag)
           "rss_behind": rss,  # mount daemon memory while a target catches up (measure_rss_behind)
           "synchronize": syn}  # first-contact Synchronize of an identical tree + one changed page
    if skipped:
        doc["skipped"] = skipped  # workload name -> why it did not run
    for name, r in results.items():
        nat, octo = statistics.median(r["native"]), statistics.median(r["octofs"])
        written = sum(r["written_bytes"])
        doc["workloads"][name] = {
            "unit": r["unit"], "native_median": nat, "octofs_median": octo, "ratio": octo / nat,
            "native_samples": r["native"], "octofs_samples": r["octofs"],
            # the same workload on a mount whose target is in sync mode (fsync-heavy workloads only)
            "sync_median": statistics.median(r["sync"]) if r["sync"] else None,
            "sync_ratio": statistics.median(r["sync"]) / nat if r["sync"] else None,
            "sync_samples": r["sync"],
            "wait_synced_s_median": statistics.median(r["wait_synced_s"]),
            "wait_synced_s_samples": r["wait_synced_s"],
            "wire_bytes_per_byte_written": (sum(r["wire_bytes"]) / written) if written else None,
            "wire_bytes_samples": r["wire_bytes"], "written_bytes_samples": r["written_bytes"],
            # the reference, scripts/refpassthrough.py (None with --no-passthrough): passthrough/native,
            # and octofs (async) / passthrough, the share of a plain Python FUSE passthrough octofs reaches
            "passthrough_median": statistics.median(r["passthrough"]) if r["passthrough"] else None,
            "passthrough_ratio": statistics.median(r["passthrough"]) / nat if r["passthrough"] else None,
            "octofs_pt_ratio": octo / statistics.median(r["passthrough"]) if r["passthrough"] else None,
            "passthrough_samples": r["passthrough"],
        }

    table = Table(title=f"octofs vs native, medians of {args.reps} (targets on 127.0.0.1: "
                        "'octofs' async, 'sync' in sync mode; 'passthrough' the reference)")
    for col in ("workload", "unit", "native", "octofs", "ratio", "sync", "sync ratio", "wait-synced s",
                "wire B/B", "passthrough", "octofs/pt"):
        table.add_column(col, justify="left" if col in ("workload", "unit") else "right")
    for name, w in doc["workloads"].items():
        wire = w["wire_bytes_per_byte_written"]
        table.add_row(name, w["unit"], f"{w['native_median']:,.1f}", f"{w['octofs_median']:,.1f}",
                      f"{w['ratio']:.3f}",
                      "-" if w["sync_median"] is None else f"{w['sync_median']:,.1f}",
                      "-" if w["sync_ratio"] is None else f"{w['sync_ratio']:.3f}",
                      f"{w['wait_synced_s_median']:.2f}", "-" if wire is None else f"{wire:.2f}",
                      "-" if w["passthrough_median"] is None else f"{w['passthrough_median']:,.1f}",
                      "-" if w["octofs_pt_ratio"] is None else f"{w['octofs_pt_ratio']:.3f}")
    console.print(table)
    console.print(f"wait-synced s includes the CLI's start-up: an idle `octofs status --wait-synced` takes "
                  f"{doc['idle_wait_synced_s']:.2f} s. sync: a second mount whose target is in sync mode "
                  "(fsync-heavy workloads). wire B/B: target bytes_sent / bytes passed to write(). "
                  + ("passthrough: scripts/refpassthrough.py, a plain pyfuse3 passthrough mounted like octofs "
                     "(real fsyncs, nothing journaled or shipped); octofs/pt: octofs async / passthrough, the "
                     "share of what a Python FUSE file system reaches here. " if pt is not None else "")
                  + ("fio: the block-I/O workloads are fio jobs." if FIO else "fio: not installed or --no-fio, "
                     "the block-I/O workloads are Python loops."))
    console.print(f"replication lag (async target, {lag['writes']} writes at {lag['writes_per_s']:,.0f}/s, "
                  f"an fsync every {lag['fsync_every']}): p50 {lag['p50_ms']:.2f} ms, p99 {lag['p99_ms']:.2f} ms, "
                  f"max {lag['max_ms']:.2f} ms. Mount daemon RSS with the target {rss['behind_mib']} MiB "
                  f"({rss['behind_ops']:,} ops) behind: {rss['rss_before_mib']:.0f} MiB; peak while catching up "
                  f"{rss['rss_peak_catch_up_mib']:.0f} MiB ({rss['catch_up_s']:.1f} s); lifetime peak "
                  f"{rss['hwm_mib']:.0f} MiB.")
    console.print(f"Synchronize at first contact of {syn['files']:,} identical files and a {syn['big_mib']} MiB file "
                  f"with one 4 KiB page changed: {syn['elapsed_s']:.2f} s, {syn['bytes_on_wire']:,} bytes on the "
                  f"wire, {syn['repair_bytes']:,} bytes of file data sent ({syn['differences']} difference).")

    if args.png:
        if importlib.util.find_spec("matplotlib") is None:
            console.print(f"--png {args.png}: skipped, matplotlib is not installed")
        else:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            names = list(doc["workloads"])
            ws = [doc["workloads"][n] for n in names]
            fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
            ys = range(len(names))
            bars = ax.barh([y - 0.2 for y in ys], [w["ratio"] for w in ws], height=0.4, label="async target")
            ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
            sync = [(y, w["sync_ratio"]) for y, w in zip(ys, ws) if w["sync_ratio"]]
            if sync:
                bars = ax.barh([y + 0.2 for y, _ in sync], [r for _, r in sync], height=0.4, label="sync target")
                ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
            ax.set_yticks(list(ys), names)
            ax.set_xscale("log")  # ratios span 0.01 to 1: a linear axis hides the small ones
            ax.axvline(1.0, color="grey", linestyle="--")
            ax.set_xlabel("octofs / native, same run (log scale; higher is better)")
            ax.set_title(f"octofs vs native, medians of {args.reps}; lag p50 {lag['p50_ms']:.1f} ms, "
                         f"p99 {lag['p99_ms']:.1f} ms", fontsize=10)
            ax.set_xlim(right=max(2.0, *(w["ratio"] * 1.5 for w in ws)))  # room for the labels
            ax.legend(loc="best", fontsize=8)
            ax.invert_yaxis()
            fig.tight_layout()
            fig.savefig(args.png, dpi=100)
            console.print(f"chart written to {args.png}")
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
