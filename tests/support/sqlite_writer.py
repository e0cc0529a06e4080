"""The SQLite writer the crash and freeze tests run on a mount.

It commits numbered transactions and appends ``n monotonic_time`` to a ledger outside the
mount after each acknowledged commit, so a test can tell which commits the application saw.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    r"""
    import sqlite3, sys, time
    db, mode, synchronous, ledger_path = sys.argv[1:5]
    con = sqlite3.connect(db, isolation_level=None)
    con.execute(f"PRAGMA journal_mode={mode}")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    n = con.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
    ledger = open(ledger_path, "a")
    while True:
        n += 1
        con.execute("BEGIN")
        con.execute("INSERT INTO t (id, body) VALUES (?, ?)", (n, "x" * (n % 500)))
        if n % 5 == 0:
            con.execute("UPDATE t SET body = body || '!' WHERE id = ?", (n // 2,))
        con.execute("COMMIT")
        ledger.write(f"{n} {time.monotonic()}\n"); ledger.flush()   # acknowledged
    """
)


def start_writer(db: Path, ledger: Path, *, mode: str, synchronous: str,
                 stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """Start the writer on ``db`` (journal ``mode``, ``synchronous`` level), recording into ``ledger``."""
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(db), mode, synchronous, str(ledger)],
                            stdout=subprocess.DEVNULL, stderr=stderr)


def read_ledger(path: Path) -> list[tuple[int, float]]:
    """The acknowledged commits so far: ``(n, monotonic time)``, in commit order."""
    if not path.exists():
        return []
    return [(int(n), float(t)) for n, t in (line.split() for line in path.read_text().splitlines())]
