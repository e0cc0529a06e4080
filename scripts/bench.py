"""octofs benchmark: the same workloads on a plain directory and on an octofs mount, interleaved.

Everything octofs-side runs through the `octofs` CLI (`octofs serve` on 127.0.0.1,
`octofs mount` with one async target), as a user would run it. Each repetition runs
every workload once natively and once on the mount (alternating which goes first),
and the table shows medians and the ratio octofs/native from the same run.

The native runs use a plain directory beside the vault's backing dir, on the same
filesystem (octofs owns its backing dir, so the benchmark does not write into it).

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
fio is not used yet: every workload is a Python implementation (os.write/os.pread...).
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


@dataclass(frozen=True)
class Workload:
    name: str
    unit: str
    fn: Callable[[Path, dict], tuple[float, float]]
    fsyncs: bool = False  # also run on a mount whose target is in sync mode


WORKLOADS = [
    Workload("seq-write-1m-fsync", "MiB/s", wl_seq_write, fsyncs=True),
    Workload("rand-write-4k-fsync", "ops/s", wl_rand_write_fsync, fsyncs=True),
    Workload("rand-write-4k-buffered", "ops/s", wl_rand_write_buffered),
    Workload("seq-read-1m-hot", "MiB/s", wl_seq_read_hot),
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
    args = ap.parse_args()
    console = Console(stderr=args.json)
    console.width = max(console.width, 130)  # keep the table's columns readable on narrow/piped output
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
    results = {w.name: {"unit": w.unit, "native": [], "octofs": [], "sync": [], "wait_synced_s": [],
                        "wire_bytes": [], "written_bytes": []} for w in workloads}
    ok = False
    try:
        console.print(f"octofs bench: workdir {work}; {args.reps} rep(s); sizes {sizes}")
        fs.start()
        if fs_sync is not None:
            fs_sync.start()
        idle_cli = [fs.wait_synced() for _ in range(3)]
        for rep in range(args.reps):
            for wl in workloads:
                r = results[wl.name]
                sides = ["native", "octofs"] + (["sync"] if fs_sync is not None and wl.fsyncs else [])
                shift = rep % len(sides)  # rotate which side goes first
                for side in sides[shift:] + sides[:shift]:
                    if side == "native":
                        r["native"].append(run_once(wl, native_dir, sizes))
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
                              + (f", octofs sync {r['sync'][-1]:,.1f}" if r["sync"] else "") + f" {wl.unit}")
        ok = True
    finally:
        problems = fs.stop() + (fs_sync.stop() if fs_sync is not None else [])
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

    doc = {"reps": args.reps, "quick": args.quick, "sizes": sizes, "fio": False,
           "idle_wait_synced_s": statistics.median(idle_cli), "workloads": {}}
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
        }

    table = Table(title=f"octofs vs native, medians of {args.reps} (targets on 127.0.0.1: "
                        "'octofs' async, 'sync' in sync mode)")
    for col in ("workload", "unit", "native", "octofs", "ratio", "sync", "sync ratio", "wait-synced s",
                "wire B/B"):
        table.add_column(col, justify="left" if col in ("workload", "unit") else "right")
    for name, w in doc["workloads"].items():
        wire = w["wire_bytes_per_byte_written"]
        table.add_row(name, w["unit"], f"{w['native_median']:,.1f}", f"{w['octofs_median']:,.1f}",
                      f"{w['ratio']:.3f}",
                      "-" if w["sync_median"] is None else f"{w['sync_median']:,.1f}",
                      "-" if w["sync_ratio"] is None else f"{w['sync_ratio']:.3f}",
                      f"{w['wait_synced_s_median']:.2f}", "-" if wire is None else f"{wire:.2f}")
    console.print(table)
    console.print(f"wait-synced s includes the CLI's start-up: an idle `octofs status --wait-synced` takes "
                  f"{doc['idle_wait_synced_s']:.2f} s. sync: a second mount whose target is in sync mode "
                  "(fsync-heavy workloads). wire B/B: target bytes_sent / bytes passed to write(). "
                  "fio: not used (Python workloads).")

    if args.png:
        if importlib.util.find_spec("matplotlib") is None:
            console.print(f"--png {args.png}: skipped, matplotlib is not installed")
        else:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            names = list(doc["workloads"])
            fig, ax = plt.subplots(figsize=(8, 4))
            ax.barh(names, [doc["workloads"][n]["ratio"] for n in names])
            ax.axvline(1.0, color="grey", linestyle="--")
            ax.set_xlabel("octofs / native (higher is better)")
            ax.invert_yaxis()
            fig.tight_layout()
            fig.savefig(args.png, dpi=100)
            console.print(f"chart written to {args.png}")
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
