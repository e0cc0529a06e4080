"""A change that cannot be journaled: EIO, then read-only until remount, marked for resync (issue 2)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.support.daemons import mounted, run_octofs, write_vault_yaml
from tests.support.replay import replay_journal
from tests.support.trees import tree_snapshot

pytestmark = pytest.mark.fuse


def test_journal_full_goes_failsafe(tmp_path: Path, secret: Path) -> None:
    # The ops stay in the journal because a target has not acked them (nothing listens on its port):
    # without targets the janitor drops durable segments every second, and on a slow machine it could
    # drop the first ones before the replay below reads the journal from seq 1.
    vault = write_vault_yaml(tmp_path, extra={
        "journal": {"max_size": "256KiB", "when_full": "resync"}, "secret_file": str(secret),
        "targets": [{"name": "down", "address": "127.0.0.1:1"}]})
    with mounted(vault) as m:
        f = m.mnt / "big"
        fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
        written = 0
        try:
            with pytest.raises(OSError) as info:
                for _ in range(1000):
                    os.write(fd, b"x" * 4096)
                    written += 4096
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert 0 < written < 256 * 1024
        # From now on every change is refused with EROFS; reads still work.
        for attempt in (lambda: (m.mnt / "new").write_bytes(b"1"), lambda: os.mkdir(m.mnt / "d"),
                        lambda: os.truncate(f, 0), lambda: os.rename(f, m.mnt / "big2")):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        assert (m.mnt / "big").read_bytes()[:4096] == b"x" * 4096
        status = run_octofs("status", "--json", str(m.mnt))
        assert status.returncode == 0, status.stderr
        v = json.loads(status.stdout)["vaults"][0]
        assert v["failsafe"] is True
        assert "journal" in v["failure"] and v["needs_resync"]
        words = run_octofs("status", str(m.mnt)).stdout.split()
        assert "FAILSAFE" in words and "resync" in words
    assert m.proc.returncode == 0
    assert "the vault is now read-only and needs a resync" in m.log_path.read_text()
    assert (m.state_dir / "needs_resync").exists()
    # The gap between backing dir and journal is exactly the one write that could not be journaled.
    replica = tmp_path / "replica"
    replay_journal(m.journal_dir, replica)
    a, b = tree_snapshot(m.backing), tree_snapshot(replica)
    assert sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p)) == [b"big"]
    assert (replica / "big").stat().st_size == written
    assert (m.backing / "big").stat().st_size == written + 4096

    # Remounted with room in the journal: writable again, and still reported as needing a resync.
    doc = yaml.safe_load(vault.read_text())
    doc["journal"] = {"max_size": "64MiB"}
    del doc["targets"]  # the vault's own mark, not a target's pending Synchronize
    vault.write_text(yaml.safe_dump(doc))
    with mounted(vault) as m:
        (m.mnt / "after").write_bytes(b"ok")
        v = json.loads(run_octofs("status", "--json", str(m.mnt)).stdout)["vaults"][0]
        assert v["failsafe"] is False and v["needs_resync"]


def test_journal_full_blocks_then_continues(tmp_path: Path) -> None:
    """when_full: block (the default): a full journal makes changes wait, never fail.

    Without targets, ops are no longer needed once durable, so the janitor drops
    whole segments and the waiting changes go on; the journal stays bounded.
    """
    vault = write_vault_yaml(tmp_path, extra={"journal": {"max_size": "1MiB"}})
    with mounted(vault) as m:
        chunk = os.urandom(64 * 1024)
        with open(m.mnt / "stream", "wb") as f:
            for i in range(80):  # 5 MiB through a 1 MiB journal
                f.write(chunk)
                f.flush()
                if i % 8 == 7:
                    os.fsync(f.fileno())
        assert (m.mnt / "stream").stat().st_size == 80 * len(chunk)
        v = json.loads(run_octofs("status", "--json", str(m.mnt)).stdout)["vaults"][0]
        assert v["failsafe"] is False and v["needs_resync"] is None
        assert v["journal"]["bytes"] <= 1024 * 1024
        assert v["journal"]["first_seq"] > 1  # segments were dropped
    assert m.proc.returncode == 0
    log = m.log_path.read_text()
    assert "journal is full" in log and "changes resume" in log
