"""Real applications on the mount: SQLite (WAL and rollback journal) and git (issue 2, done-means 3).

Each ends by replaying the journal into an empty directory and comparing it with the
backing dir, so the capture of what these programs do is proven exact.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import mounted, write_vault_yaml
from tests.support.replay import replay_journal
from tests.support.trees import assert_trees_equal

pytestmark = pytest.mark.fuse


def _sqlite_workload(db: Path, mode: str, rows: int) -> None:
    con = sqlite3.connect(db)
    try:
        assert con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        con.execute("CREATE INDEX t_body ON t(body)")
        for i in range(rows):
            con.execute("INSERT INTO t (body) VALUES (?)", (f"row {i} " + "x" * (i % 300),))
            if i % 7 == 0:
                con.execute("UPDATE t SET body = body || '!' WHERE id % 5 = ?", (i % 5,))
            if i % 11 == 0:
                con.execute("DELETE FROM t WHERE id = ?", (i // 2,))
            con.commit()
        con.execute("VACUUM")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def _check_db(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_sqlite_on_mount(tmp_path: Path, mode: str) -> None:
    with mounted(write_vault_yaml(tmp_path)) as m:
        _sqlite_workload(m.mnt / "app.db", mode, rows=400)
        count = _check_db(m.mnt / "app.db")
    assert m.proc.returncode == 0
    replica = tmp_path / "replica"
    replay_journal(m.journal_dir, replica)
    assert_trees_equal(m.backing, replica, mtime=True)
    assert _check_db(replica / "app.db") == count


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed (scripts/setup installs it)")
def test_git_on_mount(tmp_path: Path) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def git(*args: str, cwd: Path) -> str:
        return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout

    with mounted(write_vault_yaml(tmp_path)) as m:
        repo = m.mnt / "repo"
        git("init", "-q", str(repo), cwd=m.mnt)
        for i in range(30):
            (repo / f"file{i % 7}.txt").write_text(f"version {i}\n" * (i + 1))
            if i % 5 == 4:
                (repo / "sub").mkdir(exist_ok=True)
                (repo / "sub" / f"moved{i}").write_text("m")
            git("add", "-A", cwd=repo)
            git("commit", "-q", "-m", f"commit {i}", cwd=repo)
        git("gc", "-q", cwd=repo)
        git("fsck", "--strict", cwd=repo)
        assert len(git("log", "--oneline", cwd=repo).splitlines()) == 30
    assert m.proc.returncode == 0
    replica = tmp_path / "replica"
    replay_journal(m.journal_dir, replica)
    assert_trees_equal(m.backing, replica, mtime=True)
    git("fsck", "--strict", cwd=replica / "repo")
