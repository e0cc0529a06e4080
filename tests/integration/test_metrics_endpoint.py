"""The metrics endpoints of a real mount and a real `octofs serve` match `octofs status --json` (issue 8, done-means 5)."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest

from octofs import __version__
from tests.support.daemons import mounted, run_octofs, serving, write_vault_yaml
from tests.support.prometheus import get, parse
from tests.support.trees import assert_trees_equal

pytestmark = pytest.mark.fuse


def scrape(address: str) -> dict:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    finally:
        conn.close()
    return parse(body)


def status_json(*args: str) -> dict:
    result = run_octofs("status", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_metrics_match_status_json_on_primary_and_target(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    with serving(tmp_path / "target", secret, workdir=tmp_path, start=False) as target:
        target.start(extra_args=("--metrics", "127.0.0.1:0"))
        vault_yaml = write_vault_yaml(tmp_path, name="sales", extra={
            "secret_file": str(secret), "metrics": "127.0.0.1:0",
            "targets": [{"name": "b1", "address": target.address_str}]})
        with mounted(vault_yaml) as m:
            for i in range(20):
                (m.mnt / f"f{i}").write_bytes(os.urandom(1000 + i))
            (m.mnt / "d").mkdir()
            (m.mnt / "d" / "big").write_bytes(b"x" * 300_000)
            seq = m.wait_synced()
            assert seq > 40

            address = m.status()["metrics"]
            assert address and address.startswith("127.0.0.1:")
            before = scrape(address)
            [doc] = status_json(str(m.mnt))["vaults"]
            after = scrape(address)

            v = {"vault": "sales"}
            t = {"vault": "sales", "target": "b1"}
            [st] = doc["targets"]
            for sample in (before, after):  # nothing changes while nothing is written: equal, not close
                assert get(sample, "octofs_journal_last_seq", **v) == doc["journal"]["last_seq"] == seq
                assert get(sample, "octofs_journal_durable_seq", **v) == doc["journal"]["durable_seq"]
                assert get(sample, "octofs_journal_first_seq", **v) == doc["journal"]["first_seq"]
                assert get(sample, "octofs_journal_segments", **v) == doc["journal"]["segments"]
                assert get(sample, "octofs_target_acked_seq", **t) == st["acked_seq"] == seq
                assert get(sample, "octofs_target_pending_ops", **t) == st["pending_ops"] == 0
                assert get(sample, "octofs_target_lag_seconds", **t) == st["lag_s"] == 0
                assert get(sample, "octofs_target_state", **t, state="connected") == 1
                assert st["state"] == "connected"
                assert get(sample, "octofs_target_reconnects_total", **t) == st["reconnects"]
                assert get(sample, "octofs_forwarding", **v) == 1 and doc["forwarding"] == "on"
                assert get(sample, "octofs_failsafe", **v) == 0 and doc["failsafe"] is False
                assert get(sample, "octofs_started_at_seconds", **v) == doc["started_at"]
            # The request loop counts FUSE requests (status may look at the mountpoint): in order, and the
            # writes above were taken by octofs's loop, not pyfuse3's stock one (fuse_requests would be null).
            fr = doc["fuse_requests"]
            assert fr is not None and fr["taken_spinning"] + fr["taken_after_sleep"] > 40
            for key, how in (("taken_spinning", "spinning"), ("taken_after_sleep", "after_sleep")):
                n = [get(sample, "octofs_fuse_requests_total", **v, taken=how) for sample in (before, after)]
                assert n[0] <= fr[key] <= n[1], (how, n, fr)
            # Heartbeats may add frame bytes between the three reads: the status sits between the scrapes.
            sent = st["bytes_sent"]
            assert 300_000 < get(before, "octofs_target_bytes_sent_total", **t) <= sent
            assert sent <= get(after, "octofs_target_bytes_sent_total", **t)

            # The target's endpoint against `octofs status --root DIR --json`.
            taddr = target.ready_info["metrics"]
            tbefore = scrape(taddr)
            tdoc = status_json("--root", str(target.root))
            [tv] = tdoc["vaults"]
            assert tv["vault"] == "sales" and tv["durable_seq"] == seq
            assert 300_000 < tv["op_bytes_received"] < sent  # ops, without the frames' overhead
            for key, name in (("applied_seq", "octofs_replica_applied_seq"),
                              ("durable_seq", "octofs_replica_durable_seq"), ("epoch", "octofs_replica_epoch"),
                              ("connected", "octofs_replica_connected"),
                              ("op_bytes_received", "octofs_replica_op_bytes_received_total")):
                assert get(tbefore, name, **v) == tv[key], key
            assert get(tbefore, "octofs_vaults") == 1
            assert get(tbefore, "octofs_owners_reproduced") == tdoc["owners"]
            assert get(tbefore, "octofs_info", role="target", listen=tdoc["listen"], root=tdoc["root"],
                       version=__version__) == 1

            assert_trees_equal(m.backing, target.root / "sales")
        assert m.proc.returncode == 0
