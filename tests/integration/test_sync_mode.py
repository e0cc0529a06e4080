"""Sync mode (issue 5): an fsync returns only once every sync target has the op durably;
an unreachable sync target degrades after sync_timeout (or blocks with on_timeout: block)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.support.daemons import (
    Serve,
    mounted,
    wait_until,
    write_vault_yaml,
)
from tests.support.trees import assert_trees_equal

pytestmark = pytest.mark.fuse


def _vault(tmp_path: Path, secret: Path, target: Serve, **t) -> Path:
    return write_vault_yaml(tmp_path / "p", extra={
        "secret_file": str(secret), "targets": [{"name": "t1", "address": target.address_str, "mode": "sync", **t}]})


def _fsync_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fsync_returns_only_when_the_target_has_it(tmp_path: Path, secret: Path, target: Serve) -> None:
    (tmp_path / "p").mkdir()
    with mounted(_vault(tmp_path, secret, target)) as m:
        m.wait_synced(60)
        for i in range(20):
            _fsync_write(m.mnt / "ledger", f"commit {i}\n".encode())
            # No barrier here: the fsync itself was the barrier. The target must already
            # hold every op up to the journal's end durably.
            last = m.status()["journal"]["last_seq"]
            assert target.vault_status("vault")["durable_seq"] >= last
            assert (target.root / "vault" / "ledger").read_bytes().count(b"\n") == i + 1
        t = m.target_status("t1")
        assert t["sync_state"] == "sync" and t["mode"] == "sync"
    assert_trees_equal(m.backing, target.root / "vault", mtime=True)


def test_unreachable_sync_target_degrades_then_recovers(tmp_path: Path, secret: Path, target: Serve) -> None:
    (tmp_path / "p").mkdir()
    with mounted(_vault(tmp_path, secret, target, sync_timeout="1s")) as m:
        m.wait_synced(60)
        target.stop()
        _fsync_write(m.mnt / "f", b"while the target is down\n")  # returns after ~sync_timeout
        t = m.target_status("t1")
        assert t["sync_state"] == "degraded" and "sync_timeout" in t["degraded_reason"]
        for _ in range(5):  # degraded: fsyncs no longer wait for it
            _fsync_write(m.mnt / "f", b"more\n")
        assert "degraded to async" in m.log_path.read_text()
        target.start()
        m.wait_synced(90)
        wait_until(lambda: m.target_status("t1")["sync_state"] == "sync", timeout=30, what="sync mode to resume")
        assert "sync mode resumed" in m.log_path.read_text()
    assert_trees_equal(m.backing, target.root / "vault", mtime=True)


def test_on_timeout_block_waits_for_the_target(tmp_path: Path, secret: Path, target: Serve) -> None:
    (tmp_path / "p").mkdir()
    with mounted(_vault(tmp_path, secret, target, sync_timeout="1s", on_timeout="block")) as m:
        m.wait_synced(60)
        target.stop()
        done = threading.Event()
        thread = threading.Thread(target=lambda: (_fsync_write(m.mnt / "f", b"must reach the target\n"), done.set()),
                                  daemon=True)
        thread.start()
        wait_until(lambda: m.target_status("t1")["sync_waiters"] == 1, timeout=30, what="the fsync to wait")
        # Well past sync_timeout, the fsync is still waiting and the target is not degraded.
        wait_until(lambda: m.target_status("t1")["lag_s"] > 2.0, timeout=30, what="time to pass")
        assert not done.is_set() and m.target_status("t1")["sync_state"] == "sync"
        target.start()
        assert done.wait(90), "the fsync did not return after the target came back"
        thread.join(10)
        assert target.vault_status("vault")["durable_seq"] >= m.status()["journal"]["last_seq"] - 1
    assert_trees_equal(m.backing, target.root / "vault", mtime=True)
