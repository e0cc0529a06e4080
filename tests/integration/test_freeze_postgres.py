"""A PostgreSQL backup from the target (issue 9, done-means 1 and 2): `octofs freeze --exec "tar ..."`.

PostgreSQL runs on the primary's mount (as the postgres user, see test_postgres.py) with a writer committing
numbered transactions. On the target, `octofs freeze --exec` tars the frozen copy of the data directory and
then lasts until the writer has committed more transactions (as a longer backup would). The archive,
restored elsewhere, starts as after a crash, recovers, passes ``pg_amcheck`` and holds a gap-free prefix of
the transactions with every one the target had before the freeze. The commit rate while frozen is compared
with the rate just before. After the thaw the target catches up and the trees are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_postgres import (
    PG,
    PGBIN,
    Postgres,
    Writer,
    _check_copy,
    _initdb,
    _ledger,
    _postgres_dir,
)
from tests.support.daemons import (
    free_port,
    mounted,
    run_octofs,
    serving,
    wait_until,
    write_vault_yaml,
)
from tests.support.trees import assert_trees_equal

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

if (PGBIN is None or PG is None or os.geteuid() != 0) and os.environ.get("OCTOFS_REQUIRE_FUSE") != "1":
    pytestmark.append(pytest.mark.skip(reason="needs root and Debian's postgresql package (scripts/setup)"))

# Run by `octofs freeze --exec`: tar the frozen data directory, then last until MORE commits were made.
BACKUP = textwrap.dedent(
    r"""
    import json, os, subprocess, sys, time
    archive, ledger, more = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = lambda: len(open(ledger).read().split())
    m = {"c0": count(), "t0": time.monotonic()}  # commits acknowledged when the copy was already frozen
    subprocess.run(["tar", "--format=posix", "-C", os.environ["OCTOFS_COPY"], "-cf", archive, "pgdata"], check=True)
    m["c_tar"], m["t_tar"] = count(), time.monotonic()
    deadline = time.monotonic() + 120
    while count() < m["c0"] + more:
        assert time.monotonic() < deadline, "the workload stopped"
        time.sleep(0.02)
    m["c1"], m["t1"] = count(), time.monotonic()
    json.dump(m, open(archive + ".json", "w"))
    """
)
MORE = 200


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh 0755 directory under /tmp the postgres user can traverse; removed at the end."""
    d = Path(tempfile.mkdtemp(prefix="octofs-pgfreeze-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_postgres_backup_from_a_frozen_target(base: Path) -> None:
    secret = base / "secret"
    secret.write_text(os.urandom(16).hex() + "\n")
    secret.chmod(0o600)
    ledger = base / "ledger"
    (base / "p").mkdir()
    archive = base / "backup.tar"
    (base / "backup.py").write_text(BACKUP)
    with serving(base / "target", secret, workdir=base, port=free_port()) as target:
        vault = write_vault_yaml(base / "p", extra={
            "secret_file": str(secret), "allow_other": True,
            "targets": [{"name": "t1", "address": target.address_str, "mode": "async"}]})
        sock = _postgres_dir(base / "sock", 0o755)
        pg: Postgres | None = None
        with mounted(vault, base / "mnt") as m:
            try:
                datadir = _postgres_dir(m.mnt / "pgdata")
                _initdb(datadir)
                pg = Postgres(datadir, sock, base / "postgres.log")
                pg.query("CREATE TABLE t (id integer PRIMARY KEY, body text NOT NULL)")
                writer = Writer(pg, 1, ledger)
                writer.start()

                def commits(n: int) -> None:
                    goal = writer.acked + n
                    wait_until(lambda: writer.acked >= goal or not writer.is_alive(), timeout=120,
                               what=f"{n} commits")
                    assert writer.is_alive(), f"the writer stopped: {writer.error}\n{pg.log()}"

                commits(40)
                t_a, n_a = time.monotonic(), writer.acked
                commits(MORE)  # the baseline: as many commits as the backup waits for
                baseline = (writer.acked - n_a) / (time.monotonic() - t_a)
                before_freeze = len(_ledger(ledger))
                m.wait_synced(120)  # the target has at least these before the freeze
                t0, n0 = time.monotonic(), writer.acked
                r = run_octofs("freeze", "vault", "--root", str(target.root), "--max", "10m", "--exec",
                               f"{sys.executable} {base / 'backup.py'} {archive} {ledger} {MORE}")
                t1, n1 = time.monotonic(), writer.acked
                assert r.returncode == 0, r.stdout + r.stderr + target.log()
                during = (n1 - n0) / (t1 - t0)
                commits(20)  # the workload goes on after the thaw
                pg.stop()
                assert pg.proc.returncode == 0, pg.log()
                pg = None
                m.wait_synced(120)  # done-means 2: the target catches up ...
            finally:  # never unmount under a running server
                if pg is not None:
                    pg.reap(pg.kill_all())
        assert_trees_equal(m.backing, target.root / "vault", mtime=True)  # ... and the trees are identical
        fz = json.loads(Path(f"{archive}.json").read_text())
        frozen = (fz["c1"] - fz["c_tar"]) / (fz["t1"] - fz["t_tar"])
        print(f"PostgreSQL commits/s: {baseline:.1f} before; {during:.1f} over the whole `octofs freeze --exec` "
              f"({t1 - t0:.1f} s, tar {fz['t_tar'] - fz['t0']:.2f} s, on the same 2 cores): "
              f"{100 * (during / baseline - 1):+.1f} %; {frozen:.1f} while frozen after the tar: "
              f"{100 * (frozen / baseline - 1):+.1f} %")
        # The 10 % is measured and reported (README). Gated loosely: one `psql` process per commit
        # makes single windows on a shared CI machine swing by a factor of two.
        assert frozen >= 0.33 * baseline, (baseline, frozen)

    restored = base / "restored"
    restored.mkdir()
    subprocess.run(["tar", "-C", str(restored), "-xf", str(archive)], check=True)
    acknowledged = _ledger(ledger)
    rows = _check_copy(restored / "pgdata", base, 0, acknowledged[:before_freeze])  # recovery + pg_amcheck
    frozen_count = fz["c0"]
    # A prefix with everything the target had before; nothing after the freeze (one commit may be in flight).
    assert before_freeze <= rows <= frozen_count + 1, (before_freeze, rows, frozen_count)
    print(f"the archive holds transactions 1..{rows}; {len(acknowledged)} acknowledged in all")
