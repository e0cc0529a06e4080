"""Backups from the target (issue 9): `octofs freeze --exec`, `thaw`, the maximum duration, `octofs snapshot`.

Real parts: an `octofs serve` subprocess, a FUSE mount (`octofs mount --foreground`) replicating to it, a
workload in its own process on the mount, and `octofs freeze` / `snapshot` run as a user would.

- SQLite (done-means 1, 2): a writer commits numbered transactions (ledger: ``n t`` per acknowledged commit)
  while `octofs freeze --exec` tars the target's copy. The exec'd backup runs until the workload has made a
  few hundred more commits (ops arrive all that time; the primary's backlog and the target's frozen status
  are recorded from inside the backup). The archive, restored elsewhere, passes ``PRAGMA integrity_check``,
  holds a gap-free prefix of the transactions, at least every commit the target had before the freeze,
  and equals the primary's journal replayed up to ``OCTOFS_SEQ``. The primary's commit rate while frozen is
  compared with the rate of as many commits just before. After the thaw the target catches up: identical trees.
- The maximum duration (done-means 3): a freeze whose --exec outlives --max thaws by itself (WARNING in the
  serve log, ``last_freeze.how == "expired"`` and a line in `octofs status --root`), and `octofs freeze`
  exits 55 although the command succeeded.
- `octofs snapshot` (done-means 4) during a workload: the copy equals the journal replayed up to the
  reported seq, byte for byte and with mtimes.
- PostgreSQL (done-means 1, slow) is in test_freeze_postgres.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.daemons import (
    REPO,
    MountHandle,
    Serve,
    mounted,
    octofs_cmd,
    run_octofs,
    wait_until,
    write_vault_yaml,
)
from tests.support.replay import replay_journal
from tests.support.sqlite_writer import read_ledger, start_writer
from tests.support.trees import assert_trees_equal

pytestmark = [pytest.mark.fuse]

BACKUP = textwrap.dedent(
    r"""
    import json, os, subprocess, sys, time
    work, ledger, more, root, mnt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    count = lambda: len(open(ledger).read().split("\n")) - 1
    octofs = [sys.executable, "-m", "octofs"]
    info = {"env": {k: v for k, v in os.environ.items() if k.startswith("OCTOFS_")}, "t0": time.monotonic(),
            "ledger0": count()}
    subprocess.run(["tar", "--format=posix", "-C", os.environ["OCTOFS_COPY"], "-cf", work + "/backup.tar", "."],
                   check=True)
    info["tar_s"] = time.monotonic() - info["t0"]
    info["t_tar"], info["ledger_tar"] = time.monotonic(), count()
    deadline = time.monotonic() + 120
    while count() < info["ledger0"] + more:
        assert time.monotonic() < deadline, "the workload stopped"
        time.sleep(0.02)
    info["target"] = json.loads(subprocess.run(octofs + ["status", "--root", root, "--json"], check=True,
                                               capture_output=True, text=True).stdout)
    info["target_text"] = subprocess.run(octofs + ["status", "--root", root], check=True, capture_output=True,
                                         text=True).stdout
    info["primary"] = json.loads(subprocess.run(octofs + ["status", "--json", mnt], check=True,
                                                capture_output=True, text=True).stdout)
    info["t1"], info["ledger1"] = time.monotonic(), count()
    json.dump(info, open(work + "/backup.json", "w"))
    """
)


SLOW_BACKUP = textwrap.dedent(
    r"""
    import json, subprocess, sys, time
    root, mnt = sys.argv[1], sys.argv[2]
    open(mnt + "/during", "wb").write(b"written while frozen")
    deadline = time.monotonic() + 60
    def frozen():
        out = subprocess.run([sys.executable, "-m", "octofs", "status", "--root", root, "--json"], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)["vaults"][0]["frozen"]
    while frozen():
        assert time.monotonic() < deadline, "still frozen after 60 s"
        time.sleep(0.05)
    """
)


def _vault(tmp_path: Path, secret: Path, target: Serve) -> Path:
    return write_vault_yaml(tmp_path / "p", extra={"secret_file": str(secret), "targets": [
        {"name": "t1", "address": target.address_str, "mode": "async"}]})


_ledger = read_ledger


def _rate(ledger: list[tuple[int, float]], start: float, end: float) -> float:
    """Commits per second acknowledged in [start, end) (monotonic clock)."""
    return sum(1 for _, t in ledger if start <= t < end) / (end - start)


class _Writer:
    """The SQLite writer subprocess; stopped (SIGKILL, like a crash) and reaped on exit."""

    def __init__(self, db: Path, ledger: Path) -> None:
        self.ledger = ledger
        self.proc = start_writer(db, ledger, mode="WAL", synchronous="FULL")

    def wait_commits(self, n: int) -> None:
        wait_until(lambda: self.proc.poll() is not None or len(_ledger(self.ledger)) >= n, timeout=120,
                   what=f"{n} commits")
        assert self.proc.poll() is None, self.proc.stderr.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stderr.close()


WINDOW = 200


def _window(writer: _Writer) -> float:
    """Commits/s over the next WINDOW commits."""
    start = len(_ledger(writer.ledger))
    writer.wait_commits(start + WINDOW)
    lg = _ledger(writer.ledger)
    return WINDOW / (lg[start + WINDOW - 1][1] - lg[start - 1][1])


def _rates_around_a_freeze(writer: _Writer, m: MountHandle, root: Path) -> tuple[float, float]:
    """(commits/s not frozen, commits/s frozen): one window each, back to back, after the target caught up."""
    m.wait_synced(120)  # not the catch-up after the last thaw
    normal = _window(writer)
    r = run_octofs("freeze", "vault", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    frozen = _window(writer)
    r = run_octofs("thaw", "vault", "--root", str(root), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "thawed", r.stdout + r.stderr
    return normal, frozen


def _check_db(dbdir: Path) -> list[int]:
    con = sqlite3.connect(dbdir / "app.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [r[0] for r in con.execute("SELECT id FROM t ORDER BY id")]
    finally:
        con.close()


@pytest.mark.slow  # about a minute: the rate is measured over several windows
def test_freeze_exec_tar_during_sqlite_workload(tmp_path: Path, secret: Path, target: Serve) -> None:
    vault = _vault(tmp_path, secret, target)
    ledger = tmp_path / "ledger"
    work = tmp_path / "work"
    work.mkdir()
    replica = target.root / "vault"
    with mounted(vault) as m:
        writer = _Writer(m.mnt / "app.db", ledger)
        try:
            writer.wait_commits(100)
            n_a = len(_ledger(ledger))
            writer.wait_commits(n_a + 500)  # the baseline: as many commits as the backup lasts for
            before_sync = len(_ledger(ledger))
            m.wait_synced()  # the target has at least `before_sync` commits before the freeze
            t_freeze = time.monotonic()
            (work / "backup.py").write_text(BACKUP)
            r = run_octofs("freeze", "vault", "--root", str(target.root), "--max", "5m", "--exec",
                           f"{sys.executable} backup.py {work} {ledger} 500 {target.root} {m.mnt}", cwd=str(work))
            t_thaw = time.monotonic()
            assert r.returncode == 0, r.stdout + r.stderr + target.log()
            assert "vault vault thawed" in r.stderr, r.stderr
            writer.wait_commits(len(_ledger(ledger)) + 50)  # the workload goes on after the thaw
            # The rate, interleaved so that the load of a shared machine drifts alike for both.
            pairs = [_rates_around_a_freeze(writer, m, target.root) for _ in range(3)]
        finally:
            writer.stop()
        m.wait_synced(120)  # done-means 2: the target catches up ...
        assert_trees_equal(m.backing, replica, mtime=True)  # ... and the trees are identical
    info = json.loads((work / "backup.json").read_text())
    seq = int(info["env"]["OCTOFS_SEQ"])
    assert info["env"]["OCTOFS_VAULT"] == "vault" and info["env"]["OCTOFS_COPY"] == str(replica)
    [tv] = info["target"]["vaults"]
    fz = tv["frozen"]
    assert fz is not None and fz["seq"] == seq and tv["applied_seq"] == seq, tv
    assert int(info["env"]["OCTOFS_PRIMARY_TIME_NS"]) == fz["primary_time_ns"] > 0
    assert "FROZEN at seq" in info["target_text"], info["target_text"]
    [pv] = info["primary"]["vaults"]
    [pt] = pv["targets"]
    # Ops kept arriving while frozen: they wait in the primary's journal (and partly in the target's hold).
    assert pt["pending_ops"] > 0 and pt["acked_seq"] <= seq, pt
    assert fz["held_frames"] > 0 and fz["backlog_ops"] > 0, fz

    # Done-means 1: the archive, restored elsewhere.
    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(["tar", "-C", str(restored), "-xf", str(work / "backup.tar")], check=True)
    # It is exactly the primary's state at OCTOFS_SEQ: the journal replayed up to there (compared before
    # SQLite opens it, which checkpoints the WAL into app.db).
    replayed = tmp_path / "replayed"
    replay_journal(m.journal_dir, replayed, upto_seq=seq)
    assert_trees_equal(replayed, restored)
    ids = _check_db(restored)
    assert ids == list(range(1, len(ids) + 1)), "not a gap-free prefix of the transactions"
    assert len(ids) >= before_sync, (len(ids), before_sync)
    assert len(ids) <= info["ledger0"] + 1  # nothing after the freeze (the last may be mid-commit, unacked)

    # The primary's workload while the target was frozen, against the equally long window before it.
    lg = _ledger(ledger)
    span = t_thaw - t_freeze
    during = _rate(lg, t_freeze, t_thaw)
    baseline = 500 / (lg[n_a + 499][1] - lg[n_a - 1][1])
    frozen = (info["ledger1"] - info["ledger_tar"]) / (info["t1"] - info["t_tar"])
    print(f"SQLite commits/s: {baseline:.0f} before; {during:.0f} over the whole `octofs freeze --exec` "
          f"({span:.1f} s, tar {info['tar_s']:.2f} s, on the same 2 cores): {100 * (during / baseline - 1):+.1f} %; "
          f"{frozen:.0f} while frozen after the tar: {100 * (frozen / baseline - 1):+.1f} %")
    ratios = sorted(f / n for n, f in pairs)
    print("SQLite commits/s, interleaved (not frozen, frozen): "
          + ", ".join(f"({n:.0f}, {f:.0f})" for n, f in pairs) + f"; median ratio {ratios[1]:.2f}")
    # The 10 % is measured and reported (README). Gated loosely, on the median of the interleaved
    # pairs: single windows on a shared CI machine swing by a factor of two (load from other jobs).
    assert ratios[1] >= 0.5, pairs


def test_a_freeze_outliving_its_maximum_duration_thaws_by_itself(tmp_path: Path, secret: Path,
                                                                 target: Serve) -> None:
    vault = _vault(tmp_path, secret, target)
    with mounted(vault) as m:
        (m.mnt / "a").write_bytes(b"before")
        m.wait_synced()
        # The command writes on the primary (held by the frozen target), then waits until the freeze is over
        # (polling status), as a backup slower than --max would.
        (tmp_path / "slow_backup.py").write_text(SLOW_BACKUP)
        r = run_octofs("freeze", "vault", "--root", str(target.root), "--max", "1s", "--exec",
                       f"{sys.executable} {tmp_path / 'slow_backup.py'} {target.root} {m.mnt}")
        assert r.returncode == 55, r.stdout + r.stderr
        assert "ended before the command" in r.stderr and "maximum duration of 1 s" in r.stderr, r.stderr
        st = target.vault_status("vault")
        assert st["frozen"] is None and st["last_freeze"]["how"] == "expired", st
        assert st["last_freeze"]["duration_s"] >= 1.0
        text = run_octofs("status", "--root", str(target.root)).stdout
        assert "outlived its maximum duration of 1 s and thawed by itself" in text, text
        assert "WARNING octofs.freeze: vault vault: freeze" in target.log() and "outlived" in target.log()
        m.wait_synced()
        assert_trees_equal(m.backing, target.root / "vault")


def test_snapshot_equals_the_journal_replayed_to_its_seq(tmp_path: Path, secret: Path, target: Serve) -> None:
    vault = _vault(tmp_path, secret, target)
    ledger = tmp_path / "ledger"
    dest = tmp_path / "snap"
    with mounted(vault) as m:
        for i in range(20):
            (m.mnt / f"file{i}").write_bytes(os.urandom(3000 + i))
        os.link(m.mnt / "file0", m.mnt / "hardlink0")
        os.symlink("file1", m.mnt / "symlink1")
        writer = _Writer(m.mnt / "app.db", ledger)
        try:
            writer.wait_commits(200)
            r = run_octofs("snapshot", "vault", str(dest), "--root", str(target.root), "--json")
            assert r.returncode == 0, r.stdout + r.stderr
            writer.wait_commits(len(_ledger(ledger)) + 50)
        finally:
            writer.stop()
        m.wait_synced(120)
        assert_trees_equal(m.backing, target.root / "vault", mtime=True)
    info = json.loads(r.stdout)
    assert info["vault"] == "vault" and info["dest"] == str(dest) and info["primary_time_ns"] > 0, info
    replayed = tmp_path / "replayed"
    seqs = replay_journal(m.journal_dir, replayed, upto_seq=info["seq"])
    assert seqs[-1] == info["seq"] and len(seqs) < len(replay_journal(m.journal_dir, tmp_path / "all"))
    assert_trees_equal(replayed, dest, mtime=True)
    # DEST must not exist: a second snapshot into it is refused (one line, exit 2), and the copy is untouched.
    again = run_octofs("snapshot", "vault", str(dest), "--root", str(target.root))
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    assert_trees_equal(replayed, dest, mtime=True)
    ids = _check_db(dest)
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 1


def test_freeze_errors_are_one_line(tmp_path: Path, secret: Path, target: Serve) -> None:
    r = run_octofs("freeze", "nope", "--root", str(target.root))
    assert r.returncode == 54, r.stderr
    assert r.stderr.strip() == "octofs: error: Cannot freeze vault nope: vault nope is not received here (vaults: none)"
    r = run_octofs("freeze", "v", "--root", str(target.root), "--max", "soon")
    assert r.returncode == 2 and "--max" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_octofs("thaw", "v", "--root", str(tmp_path / "no-serve-here"))
    assert r.returncode == 51 and "Traceback" not in r.stderr, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "OCTOFS_ROOT"}
    r = subprocess.run([sys.executable, "-m", "octofs", "freeze", "v"], capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(REPO)}, check=False)
    assert r.returncode == 2 and "--root" in r.stderr, r.stderr


def test_sigterm_during_exec_thaws(tmp_path: Path, secret: Path, target: Serve) -> None:
    """A scheduler stopping `octofs freeze --exec` (SIGTERM): the command is killed and the vault thawed at once,
    not left frozen until --max."""
    vault = _vault(tmp_path, secret, target)
    with mounted(vault) as m:
        (m.mnt / "a").write_bytes(b"x")
        m.wait_synced()
        proc = subprocess.Popen(octofs_cmd("freeze", "vault", "--root", str(target.root), "--exec", "exec sleep 300"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            wait_until(lambda: (target.vault_status("vault") or {}).get("frozen"), timeout=30, what="the freeze")
            proc.terminate()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for pipe in (proc.stdout, proc.stderr):  # not left to the garbage collector of a later test
                pipe.close()
        assert proc.returncode == 128 + signal.SIGTERM, out + err
        st = target.vault_status("vault")
        assert st["frozen"] is None and st["last_freeze"]["how"] == "thawed", st
        (m.mnt / "b").write_bytes(b"after")
        m.wait_synced()
        assert_trees_equal(m.backing, target.root / "vault")
