"""metrics.py: owns the Prometheus text exposition of a status document, and the tiny HTTP it travels in.

Sans-I/O: ``render(status)`` turns the very dict that ``octofs status --json``
shows (a primary's or a target's, docs/CLI_JSON.md) into text format 0.0.4;
``parse_request``/``response`` are the HTTP/1.x bytes. exporter.py serves them
with trio. docs/METRICS.md lists every metric.

Invariants:
- Every figure comes from the status document and nothing else, so a scrape and
  ``status --json`` taken at the same moment agree.
- A field that is null (unknown) gives no sample rather than a made-up 0.
- Label values are escaped (backslash, double quote, newline) as the format requires.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8 * 1024

TARGET_STATES = ("connected", "connecting", "disconnected", "off")
SYNC_STATES = ("async", "sync", "degraded")


@dataclass
class _Family:
    name: str
    kind: str  # gauge | counter
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


class _Builder:
    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict[str, str], value: Any) -> None:
        """One sample; None (unknown) adds the family's HELP but no sample."""
        fam = self.families.setdefault(name, _Family(name, kind, help_text))
        if value is None:
            return
        if isinstance(value, bool):
            value = int(value)
        fam.samples.append((labels, value))

    def text(self) -> str:
        lines = []
        for fam in self.families.values():
            lines.append(f"# HELP {fam.name} {fam.help}")
            lines.append(f"# TYPE {fam.name} {fam.kind}")
            for labels, value in fam.samples:
                lines.append(f"{fam.name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(status: dict[str, Any], version: str = "") -> str:
    """The metrics of one daemon, from its status document.

    Args:
        status: the control socket's ``status`` reply (``role`` primary or target).
        version: octofs's version, for ``octofs_info``.

    Returns:
        Prometheus text format 0.0.4, ending in a newline.
    """
    b = _Builder()
    if status.get("role") == "target":
        _render_target(b, status, version)
    else:
        _render_primary(b, status, version)
    return b.text()


def _render_primary(b: _Builder, doc: dict[str, Any], version: str) -> None:
    vault = str(doc.get("vault"))
    v = {"vault": vault}
    b.add("octofs_info", "gauge", "Always 1; labels say what this daemon is.",
          {"role": "primary", "vault": vault, "version": version}, 1)
    b.add("octofs_started_at_seconds", "gauge", "When the daemon started, seconds since the epoch.", v,
          doc.get("started_at"))
    j = doc.get("journal") or {}
    for key, help_text in (("last_seq", "Highest seq appended to the journal."),
                           ("durable_seq", "Highest seq fsynced in the journal."),
                           ("first_seq", "Oldest seq still kept in the journal."),
                           ("segments", "Number of journal segment files."),
                           ("bytes", "Total size of the journal segment files in bytes.")):
        b.add(f"octofs_journal_{key}", "gauge", help_text, v, j.get(key))
    b.add("octofs_failsafe", "gauge", "1 once a change could not be journaled (read-only until remount).", v,
          doc.get("failsafe"))
    b.add("octofs_journal_full", "gauge", "1 while the journal is within its headroom of max_size.", v,
          doc.get("journal_full"))
    b.add("octofs_blocked_changes", "gauge", "Changes waiting for room in the journal.", v,
          doc.get("blocked_changes"))
    b.add("octofs_needs_resync", "gauge", "1 if the vault must be synchronized to its targets.", v,
          doc.get("needs_resync") is not None)
    fr = doc.get("fuse_requests") or {}
    for how in ("spinning", "after_sleep"):
        b.add("octofs_fuse_requests_total", "counter",
              "FUSE requests taken by the request loop, while it spun or after it slept.",
              {**v, "taken": how}, fr.get(f"taken_{how}"))
    if doc.get("forwarding") is not None:
        b.add("octofs_forwarding", "gauge", "1 when forwarding is on.", v, doc.get("forwarding") == "on")
    for t in doc.get("targets") or []:
        vt = {"vault": vault, "target": str(t.get("name"))}
        b.add("octofs_target_info", "gauge", "Always 1; labels give the target's address and mode.",
              {**vt, "address": str(t.get("address")), "mode": str(t.get("mode"))}, 1)
        b.add("octofs_target_acked_seq", "gauge", "Highest seq the target has made durable.", vt, t.get("acked_seq"))
        b.add("octofs_target_pending_ops", "gauge", "Ops journaled but not yet acked by the target.", vt,
              t.get("pending_ops"))
        b.add("octofs_target_lag_seconds", "gauge", "Age of the oldest op the target has not acked.", vt,
              t.get("lag_s"))
        b.add("octofs_target_bytes_sent_total", "counter", "Frame bytes sent to the target since the daemon started.",
              vt, t.get("bytes_sent"))
        b.add("octofs_target_reconnects_total", "counter", "Connections lost or refused since the daemon started.",
              vt, t.get("reconnects"))
        b.add("octofs_target_connected_since_seconds", "gauge", "When the current connection was made.", vt,
              t.get("connected_since"))
        b.add("octofs_target_sync_waiters", "gauge", "fsyncs waiting for this target's durable ack.", vt,
              t.get("sync_waiters"))
        _one_hot(b, "octofs_target_state", "1 for the target's current state, 0 for the others.", vt, "state",
                 t.get("state"), TARGET_STATES)
        _one_hot(b, "octofs_target_sync_state", "1 for the sync state (async, sync, degraded), 0 for the others.",
                 vt, "sync_state", t.get("sync_state"), SYNC_STATES)


def _render_target(b: _Builder, doc: dict[str, Any], version: str) -> None:
    b.add("octofs_info", "gauge", "Always 1; labels say what this daemon is.",
          {"role": "target", "listen": str(doc.get("listen")), "root": str(doc.get("root")), "version": version}, 1)
    b.add("octofs_owners_reproduced", "gauge", "1 when file owners are reproduced (serve runs as root).", {},
          doc.get("owners"))
    vaults = doc.get("vaults") or []
    b.add("octofs_vaults", "gauge", "Vaults this target receives.", {}, len(vaults))
    for entry in vaults:
        v = {"vault": str(entry.get("vault"))}
        b.add("octofs_replica_applied_seq", "gauge", "Highest seq applied to the replica dir.", v,
              entry.get("applied_seq"))
        b.add("octofs_replica_durable_seq", "gauge", "Highest seq durable on this disk (what was acked).", v,
              entry.get("durable_seq"))
        b.add("octofs_replica_epoch", "gauge", "Highest epoch seen for the vault.", v, entry.get("epoch"))
        b.add("octofs_replica_connected", "gauge", "1 while a primary is connected for the vault.", v,
              entry.get("connected"))
        b.add("octofs_replica_last_heartbeat_age_seconds", "gauge", "Seconds since the primary's last heartbeat.", v,
              entry.get("last_heartbeat_age_s"))
        b.add("octofs_replica_op_bytes_received_total", "counter",
              "Op record bytes received for the vault since serve started (frame overhead not counted).",
              v, entry.get("op_bytes_received"))
        b.add("octofs_replica_needs_resync", "gauge", "1 if replay stopped and a Synchronize is needed.", v,
              entry.get("needs_resync") is not None)
        b.add("octofs_replica_error", "gauge", "1 if the replica dir could not be opened.", v, "error" in entry)


def _one_hot(b: _Builder, name: str, help_text: str, labels: dict[str, str], key: str, current: Any,
             known: Iterable[str]) -> None:
    values = list(known)
    if current is not None and current not in values:
        values.append(str(current))
    for value in values:
        b.add(name, "gauge", help_text, {**labels, key: value}, value == current)


# -- HTTP/1.x, just enough for a scraper ------------------------------------------------------


class HttpRequestError(ValueError):
    """Not an HTTP request we can read (answer 400)."""


def request_complete(data: bytes) -> bool:
    """Whether ``data`` holds the whole request head (we never read a body)."""
    return b"\r\n\r\n" in data or b"\n\n" in data


def parse_request(data: bytes) -> tuple[str, str]:
    """``(method, path)`` of a request head, the query string dropped.

    Raises:
        HttpRequestError: not an HTTP/1.x request line.
    """
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HttpRequestError("not an HTTP/1.x request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise HttpRequestError("request line is not ASCII") from None
    return method, target.split("?", 1)[0]


def response(status: int, body: str, *, content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               503: "Service Unavailable"}
    payload = body.encode("utf-8")
    headers = (f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
               f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return headers.encode("ascii") + (b"" if head_only else payload)


def answer(method: str, path: str, render_metrics) -> bytes:
    """The response to one request; ``render_metrics()`` is called only for GET/HEAD /metrics."""
    if method not in ("GET", "HEAD"):
        return response(405, "only GET\n")
    if path == "/metrics":
        return response(200, render_metrics(), content_type=CONTENT_TYPE, head_only=method == "HEAD")
    if path == "/":
        return response(200, "octofs metrics: GET /metrics\n", head_only=method == "HEAD")
    return response(404, "not found: try /metrics\n", head_only=method == "HEAD")
