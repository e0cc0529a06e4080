"""metrics.py (status → Prometheus text, the HTTP bits) and exporter.py on 127.0.0.1."""

from __future__ import annotations

import pytest
import trio

from octofs import exporter, metrics
from octofs.errors import DaemonNotRunningError
from tests.support.prometheus import get, parse

PRIMARY = {
    "role": "primary", "vault": "sales", "mountpoint": "/mnt/v", "pid": 1, "started_at": 1795550000.25,
    "failsafe": False, "journal_full": False, "blocked_changes": 0, "failure": None, "needs_resync": None,
    "journal": {"first_seq": 1, "last_seq": 7106, "durable_seq": 7100, "segments": 2, "bytes": 7058657},
    "forwarding": "on", "metrics": "127.0.0.1:9108", "fuse_requests": {"taken_spinning": 9, "taken_after_sleep": 4},
    "targets": [
        {"name": "b1", "address": "10.0.0.7:7070", "mode": "sync", "state": "connected", "acked_seq": 7000,
         "pending_ops": 106, "lag_s": 0.25, "last_error": None, "connected_since": 1795550001.5,
         "bytes_sent": 123456789, "reconnects": 3, "owners": True, "sync_state": "degraded", "sync_waiters": 2,
         "degraded_reason": "no ack"},
        {"name": 'we"ird\\name', "address": "x:1", "mode": "async", "state": "backoff", "acked_seq": 0,
         "pending_ops": 7106, "lag_s": 12.0, "last_error": "refused", "connected_since": None, "bytes_sent": 0,
         "reconnects": 0, "owners": None, "sync_state": "async", "sync_waiters": 0, "degraded_reason": None},
    ],
}
TARGET = {
    "role": "target", "root": "/srv/r", "listen": "0.0.0.0:7070", "pid": 2, "owners": True,
    "vaults": [
        {"vault": "sales", "vault_id": "ab", "epoch": 3, "applied_seq": 7000, "durable_seq": 6990, "connected": True,
         "peer": "10.0.0.1:5000", "last_heartbeat_age_s": 1.5, "needs_resync": None, "op_bytes_received": 99},
        {"vault": "new", "vault_id": None, "epoch": None, "applied_seq": None, "durable_seq": None,
         "connected": False, "peer": None, "last_heartbeat_age_s": None, "needs_resync": "gap", "error": "EIO"},
    ],
}

def test_primary_document_renders_every_figure() -> None:
    s = parse(metrics.render(PRIMARY, "0.1.0"))
    assert get(s, "octofs_info", role="primary", vault="sales", version="0.1.0") == 1
    assert get(s, "octofs_journal_last_seq", vault="sales") == 7106
    assert get(s, "octofs_journal_durable_seq", vault="sales") == 7100
    assert get(s, "octofs_journal_bytes", vault="sales") == 7058657
    assert get(s, "octofs_forwarding", vault="sales") == 1
    assert get(s, "octofs_fuse_requests_total", vault="sales", taken="spinning") == 9
    assert get(s, "octofs_fuse_requests_total", vault="sales", taken="after_sleep") == 4
    assert get(s, "octofs_failsafe", vault="sales") == 0
    assert get(s, "octofs_needs_resync", vault="sales") == 0
    t = {"vault": "sales", "target": "b1"}
    assert get(s, "octofs_target_acked_seq", **t) == 7000
    assert get(s, "octofs_target_pending_ops", **t) == 106
    assert get(s, "octofs_target_lag_seconds", **t) == 0.25
    assert get(s, "octofs_target_bytes_sent_total", **t) == 123456789
    assert get(s, "octofs_target_reconnects_total", **t) == 3
    assert get(s, "octofs_target_sync_waiters", **t) == 2
    assert get(s, "octofs_target_info", **t, address="10.0.0.7:7070", mode="sync") == 1
    states = {st: get(s, "octofs_target_state", **t, state=st) for st in metrics.TARGET_STATES}
    assert states == {"connected": 1, "connecting": 0, "disconnected": 0, "off": 0}
    assert get(s, "octofs_target_sync_state", **t, sync_state="degraded") == 1
    assert get(s, "octofs_target_sync_state", **t, sync_state="sync") == 0
    # A label value with a quote and a backslash survives; an unknown state gets its own sample.
    w = {"vault": "sales", "target": 'we"ird\\name'}
    assert get(s, "octofs_target_state", **w, state="backoff") == 1
    assert get(s, "octofs_target_state", **w, state="connected") == 0
    # Unknown (null) is no sample, not a zero.
    assert ("octofs_target_connected_since_seconds", frozenset(w.items())) not in s


def test_target_document_renders_every_figure() -> None:
    s = parse(metrics.render(TARGET, "0.1.0"))
    assert get(s, "octofs_info", role="target", listen="0.0.0.0:7070", root="/srv/r", version="0.1.0") == 1
    assert get(s, "octofs_vaults") == 2
    assert get(s, "octofs_replica_applied_seq", vault="sales") == 7000
    assert get(s, "octofs_replica_durable_seq", vault="sales") == 6990
    assert get(s, "octofs_replica_epoch", vault="sales") == 3
    assert get(s, "octofs_replica_connected", vault="sales") == 1
    assert get(s, "octofs_replica_last_heartbeat_age_seconds", vault="sales") == 1.5
    assert get(s, "octofs_replica_op_bytes_received_total", vault="sales") == 99
    assert get(s, "octofs_replica_needs_resync", vault="new") == 1
    assert get(s, "octofs_replica_error", vault="new") == 1
    assert ("octofs_replica_applied_seq", frozenset({"vault": "new"}.items())) not in s


def test_newline_in_a_label_is_escaped() -> None:
    text = metrics.render({**TARGET, "root": "/a\nb"}, "1")
    assert 'root="/a\\nb"' in text
    parse(text)


@pytest.mark.parametrize(("head", "expected"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", "/metrics")),
    (b"HEAD /metrics?x=1 HTTP/1.0\n\n", ("HEAD", "/metrics")),
])
def test_parse_request(head: bytes, expected) -> None:
    assert metrics.request_complete(head)
    assert metrics.parse_request(head) == expected


@pytest.mark.parametrize("head", [b"", b"\x00\xff\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n",
                                  b"GET /m\xe9 HTTP/1.1\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n"])
def test_parse_request_refuses_garbage(head: bytes) -> None:
    with pytest.raises(metrics.HttpRequestError):
        metrics.parse_request(head)


async def _fetch(address: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        data = bytearray()
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


async def test_exporter_serves_get_metrics_and_refuses_the_rest() -> None:
    calls = []

    async def status() -> dict:
        calls.append(1)
        return PRIMARY

    async with trio.open_nursery() as nursery:
        address = await nursery.start(exporter.serve_metrics, "127.0.0.1", 0, status)
        code, headers, body = await _fetch(address, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        assert code == 200 and headers["Content-Type"] == metrics.CONTENT_TYPE
        assert int(headers["Content-Length"]) == len(body)
        assert body.decode() == metrics.render(PRIMARY, exporter.__version__)
        code, headers, body = await _fetch(address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert (await _fetch(address, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await _fetch(address, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await _fetch(address, b"\x16\x03\x01garbage\r\n\r\n"))[0] == 400
        assert (await _fetch(address, b"GET /" + b"a" * 9000))[0] == 400
        assert len(calls) == 2  # the status is read only for /metrics
        nursery.cancel_scope.cancel()


async def test_exporter_says_503_when_the_status_cannot_be_read() -> None:
    async def status() -> dict:
        raise DaemonNotRunningError(socket="/x.sock", reason="gone")

    async with trio.open_nursery() as nursery:
        address = await nursery.start(exporter.serve_metrics, "127.0.0.1", 0, status)
        code, _, body = await _fetch(address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert code == 503 and b"cannot read the status" in body
        nursery.cancel_scope.cancel()


async def test_exporter_on_a_taken_port_logs_and_returns(caplog) -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(exporter.serve_metrics, "127.0.0.1", 0, None)
        port = int(address.rpartition(":")[2])
        assert await nursery.start(exporter.serve_metrics, "127.0.0.1", port, None) is None
        nursery.cancel_scope.cancel()
    assert "no metrics endpoint: cannot listen on 127.0.0.1" in caplog.text
