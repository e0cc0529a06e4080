"""SQLite on the mount, killed for real (issue 5, done-means 1 and 3).

A writer commits numbered transactions and records each acknowledged commit in a
ledger outside the mount. The writer and the mount daemon are SIGKILLed together
at a random moment, several times; each time a copy of the target's database must
pass ``PRAGMA integrity_check``, hold a gap-free prefix of the transactions and —
in sync mode — every transaction the writer saw committed. Then the target itself
is SIGKILLed and restarted during the workload: the same checks hold after it
catches up.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemons import (
    Serve,
    mounted,
    run_octofs,
    wait_until,
    write_vault_yaml,
)
from tests.support.sqlite_writer import read_ledger, start_writer
from tests.support.trees import assert_trees_equal

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

SEED = int(os.environ.get("OCTOFS_TEST_SEED", random.randrange(2**32)))

def _ledger(path: Path) -> list[int]:
    return [n for n, _ in read_ledger(path)]


def _check_copy(replica_dir: Path, work: Path, acknowledged: list[int], *, sync: bool) -> int:
    """Copy the target's database files, open the copy, check it; return how many rows it holds."""
    copy = work / f"copy-{time.monotonic_ns()}"
    copy.mkdir()
    for name in ("app.db", "app.db-wal", "app.db-journal"):
        if (replica_dir / name).exists():
            shutil.copy2(replica_dir / name, copy / name)
    con = sqlite3.connect(copy / "app.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = [r[0] for r in con.execute("SELECT id FROM t ORDER BY id")]
    finally:
        con.close()
    assert ids == list(range(1, len(ids) + 1)), "not a gap-free prefix of the transactions"
    if sync:
        missing = sorted(set(acknowledged) - set(ids))
        assert not missing, f"sync mode lost acknowledged commits: {missing[:10]} ({len(missing)})"
    return len(ids)


def _vault(tmp_path: Path, secret: Path, target: Serve, mode: str, on_timeout: str = "degrade") -> Path:
    return write_vault_yaml(tmp_path / "p", extra={"secret_file": str(secret), "targets": [
        {"name": "t1", "address": target.address_str, "mode": mode, "sync_timeout": "2s", "on_timeout": on_timeout}]})


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_primary_killed_with_writer(tmp_path: Path, secret: Path, target: Serve, journal_mode: str,
                                    mode: str) -> None:
    rng = random.Random(SEED)
    print(f"OCTOFS_TEST_SEED={SEED}")
    (tmp_path / "p").mkdir()
    # on_timeout: block — "zero acknowledged commits lost" is the promise of sync mode that
    # does not degrade; a degraded target (sync_timeout passed on a busy machine) is async.
    vault = _vault(tmp_path, secret, target, mode, on_timeout="block")
    ledger = tmp_path / "ledger"
    rounds = 3
    for round_no in range(rounds):
        with mounted(vault) as m:
            before = len(_ledger(ledger))
            # EXTRA, not FULL: in DELETE (rollback) mode a transaction commits when its journal
            # is unlinked, and only EXTRA fsyncs the directory after that. Under FULL the commit
            # point never reaches the disk (or octofs) as a barrier, and SQLite itself says a
            # power cut right after such a commit may roll it back.
            writer = start_writer(m.mnt / "app.db", ledger, mode=journal_mode, synchronous="EXTRA")
            try:
                goal = before + rng.randint(20, 120)
                wait_until(lambda: writer.poll() is not None or len(_ledger(ledger)) >= goal, timeout=120,
                           what=f"{goal} commits")
                assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
                # The crash: the application and the primary's daemon die together.
                os.kill(writer.pid, signal.SIGKILL)
                os.kill(m.proc.pid, signal.SIGKILL)
            finally:
                writer.kill()
                writer.wait(10)
                writer.stderr.close()
            m.proc.wait(10)
            assert run_octofs("umount", str(m.mnt)).returncode == 0  # the stale mount
        acknowledged = _ledger(ledger)
        rows = _check_copy(target.root / "vault", tmp_path, acknowledged, sync=(mode == "sync"))
        print(f"round {round_no}: {len(acknowledged)} commits acknowledged, the target's copy holds {rows}")
        assert rows >= (len(acknowledged) if mode == "sync" else 1)
    # A last clean mount: SQLite recovers on the primary too, and the target converges to it.
    with mounted(vault) as m:
        con = sqlite3.connect(m.mnt / "app.db")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert set(_ledger(ledger)) <= {r[0] for r in con.execute("SELECT id FROM t")}
        con.close()
        m.wait_synced(90)
    assert_trees_equal(m.backing, target.root / "vault", mtime=True)


def test_target_killed_during_sync_workload(tmp_path: Path, secret: Path, target: Serve) -> None:
    rng = random.Random(SEED)
    print(f"OCTOFS_TEST_SEED={SEED}")
    (tmp_path / "p").mkdir()
    ledger = tmp_path / "ledger"
    with mounted(_vault(tmp_path, secret, target, "sync")) as m:
        writer = start_writer(m.mnt / "app.db", ledger, mode="wal", synchronous="EXTRA", stderr=subprocess.DEVNULL)
        try:
            for _ in range(3):
                goal = len(_ledger(ledger)) + rng.randint(20, 80)
                wait_until(lambda: len(_ledger(ledger)) >= goal, timeout=120, what=f"{goal} commits")
                target.kill()
                # The application keeps committing: after sync_timeout the target is degraded.
                goal = len(_ledger(ledger)) + 10
                wait_until(lambda: len(_ledger(ledger)) >= goal, timeout=60, what="commits while the target is down")
                target.start()
                wait_until(lambda: m.target_status("t1")["sync_state"] == "sync", timeout=90,
                           what="the target to catch up and sync mode to resume")
        finally:
            writer.kill()
            writer.wait(10)
        m.wait_synced(90)
        acknowledged = _ledger(ledger)
        rows = _check_copy(target.root / "vault", tmp_path, acknowledged, sync=True)
        assert rows >= len(acknowledged)
        assert target.vault_status("vault")["applied_seq"] == m.status()["journal"]["last_seq"]
    assert_trees_equal(m.backing, target.root / "vault", mtime=True)
