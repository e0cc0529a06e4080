"""cli/status_cmd.py: `octofs status [--json] [MOUNTPOINT ...]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from octofs import paths, state
from octofs.cli.common import add_command
from octofs.control import request
from octofs.errors import (
    DaemonError,
    DaemonNotRunningError,
    NotMountedError,
    UsageError,
    WaitTimeoutError,
)
from octofs.mounttab import FS_TYPE, find_mount, octofs_mounts


def add_parser(sub) -> None:
    p = add_command(sub, "status", "Show each mounted vault: journal, durability, targets, problems.", run)
    p.add_argument("mountpoints", nargs="*", metavar="MOUNTPOINT", help="default: every octofs mount")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (docs/CLI_JSON.md)")
    p.add_argument("--wait-synced", nargs="?", const=0, type=int, metavar="SEQ",
                   help="block until every target has acked SEQ (default: everything journaled now); "
                        "exit 0 when synced, 53 on timeout, 50 when forwarding is off")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="for --wait-synced (default 60)")
    p.add_argument("--root", metavar="DIR", help="show the target (`octofs serve --root DIR`) instead: "
                                                  "the vaults it receives, applied seq, last heartbeat")


def _link(t: dict[str, Any]) -> str:
    """TLS, compression (agreed, and the ratio so far) and the bandwidth limit of a target, in a few words."""
    parts = ["TLS" if t.get("tls") else "plain"]
    if t.get("compression"):
        ratio = t.get("op_bytes_sent", 0) / t["bytes_sent"] if t.get("bytes_sent") else 0
        parts.append(f"{t['compression']} {ratio:.1f}x" if ratio else t["compression"])
    elif t.get("compress", "none") != "none":
        parts.append(f"compress {t['compress']}")
    if t.get("bandwidth_bps"):
        parts.append(f"≤{t['bandwidth_bps'] / 2**20:g} MiB/s")
    return ", ".join(parts)


def target_status(root: str) -> dict[str, Any]:
    """The status document of the `octofs serve` running on ``root``."""
    from octofs.replica import control_socket_path

    reply = request(control_socket_path(Path(root)), "status")
    reply.pop("ok", None)
    return reply


def print_target(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    owners = "reproduced" if doc.get("owners") else "NOT reproduced (serve is not running as root)"
    console.print(f"octofs serve on {doc.get('listen')}, root {doc.get('root')}, pid {doc.get('pid')}; file owners {owners}")
    table = Table(title="vaults received", title_justify="left")
    for col in ("vault", "role", "vault id", "epoch", "applied seq", "durable seq", "primary", "last heartbeat",
                "failover", "problem"):
        table.add_column(col, overflow="fold", justify="right" if "seq" in col or col == "epoch" else "left")
    for v in doc.get("vaults", []):
        age = v.get("last_heartbeat_age_s")
        problem = v.get("error") or (f"needs resync: {v['needs_resync']}" if v.get("needs_resync") else "")
        fo = v.get("failover") or {}
        watch = f"{fo['state']}" + (f": {fo['detail']}" if fo.get("detail") else "") if fo else "-"
        table.add_row(v["vault"], v.get("role", "target"), (v.get("vault_id") or "-")[:12], str(v.get("epoch")),
                      str(v.get("applied_seq")), str(v.get("durable_seq")), v.get("peer") or "(not connected)",
                      "-" if age is None else f"{age:.1f} s ago", watch, problem)
    console.print(table)
    # Frozen vaults, and freezes that ended by themselves (octofs freeze).
    from octofs.cli.freeze_cmd import freeze_lines

    for line in freeze_lines(doc):
        console.print(line, highlight=False, markup=False)
    for v in doc.get("vaults", []):
        tk = v.get("takeover")
        if not tk:
            continue
        console.print(f"vault {v['vault']}: taken over at epoch {tk.get('epoch')} (seq {tk.get('seq')}), "
                      f"{tk.get('state')}; mounted on {tk.get('mountpoint')}; detection {tk.get('detection_s')} s; "
                      f"{tk.get('reason')}")
        mount = tk.get("mount") or {}
        if mount:
            console.print(f"  mount: exit {mount.get('rc')} in {mount.get('duration_s')} s")
        for h in tk.get("hooks") or []:
            outcome = "ok" if h["rc"] == 0 else ("TIMED OUT" if h.get("timed_out") else f"FAILED (exit {h['rc']})")
            console.print(f"  hook {outcome} in {h['duration_s']} s: {h['command']}")


def find_vault(which: str | None) -> tuple[Path, str]:
    """(state dir, vault name) of a mounted vault named by name or mountpoint, or the only one."""
    entries = octofs_mounts()

    def name_of(state_dir: Path, fallback: str) -> str:
        try:
            return str(request(paths.control_socket_path(state_dir), "status", io_timeout_s=5).get("vault") or fallback)
        except DaemonNotRunningError:
            return fallback

    if which is not None:
        mp = Path(os.path.abspath(which))
        for e in entries:
            if e.mountpoint == mp:
                return Path(e.source), name_of(Path(e.source), which)
        for e in entries:
            try:
                reply = request(paths.control_socket_path(Path(e.source)), "status", io_timeout_s=5)
            except DaemonNotRunningError:
                continue
            if reply.get("vault") == which:
                return Path(e.source), which
        raise NotMountedError(mountpoint=which)
    if len(entries) != 1:
        raise UsageError(detail=f"{len(entries)} vaults are mounted: name one (by vault name or mountpoint)")
    return Path(entries[0].source), name_of(Path(entries[0].source), str(entries[0].mountpoint))


def wait_synced(mountpoints: list[str], seq: int, timeout_s: float) -> int:
    entries = collect_entries(mountpoints)
    if not entries:
        raise NotMountedError(mountpoint="(none mounted)")
    for entry in entries:
        reply = request(paths.control_socket_path(Path(entry.source)), "wait_synced",
                        io_timeout_s=timeout_s + 30, seq=seq or None, timeout_s=timeout_s)
        if not reply.get("ok"):
            raise DaemonError(reason=reply.get("error", "the daemon refused"))
        if not reply["synced"]:
            if reply.get("reason") == "forwarding is off":
                raise DaemonError(reason=f"{entry.mountpoint}: forwarding is off, nothing is being shipped")
            raise WaitTimeoutError(timeout_s=timeout_s, what=f"the targets of {entry.mountpoint} to ack seq {reply['seq']}")
    return 0


def collect_entries(mountpoints: list[str]):
    if mountpoints:
        entries = []
        for m in mountpoints:
            entry = find_mount(Path(os.path.abspath(m)))
            if entry is None or entry.fstype != FS_TYPE:
                raise NotMountedError(mountpoint=m)
            entries.append(entry)
    else:
        entries = octofs_mounts()
    return entries


def collect(mountpoints: list[str]) -> list[dict[str, Any]]:
    """One status document per vault, from its daemon or, if that is gone, from its state dir."""
    entries = collect_entries(mountpoints)
    out = []
    for entry in entries:
        state_dir = Path(entry.source)
        try:
            reply = request(paths.control_socket_path(state_dir), "status")
            reply.pop("ok", None)
            reply["daemon"] = "running"
        except DaemonNotRunningError as exc:
            reply = {
                "role": "primary",
                "vault": None,
                "mountpoint": str(entry.mountpoint),
                "state_dir": str(state_dir),
                "daemon": "not running",
                "error": exc.message,
                "needs_resync": state.needs_resync(state_dir),
            }
        out.append(reply)
    return out


def run(args: argparse.Namespace) -> int:
    if args.root is not None:
        doc = target_status(args.root)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print_target(doc)
        return 0
    if args.wait_synced is not None:
        return wait_synced(args.mountpoints, args.wait_synced, args.timeout)
    vaults = collect(args.mountpoints)
    if args.json:
        print(json.dumps({"vaults": vaults}, indent=2))
        return 0
    if not vaults:
        print("no octofs vault is mounted")
        return 0
    from rich.console import Console
    from rich.table import Table

    # A terminal gets tables at its width (cells fold, never truncate); a pipe gets 160 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="octofs vaults", title_justify="left")
    for col in ("vault", "mountpoint", "state", "forwarding", "last seq", "durable seq", "journal", "problem"):
        table.add_column(col, justify="right" if "seq" in col or col == "journal" else "left", overflow="fold")
    for v in vaults:
        j = v.get("journal") or {}
        problem = v.get("error") or v.get("failure") or ""
        if v.get("needs_resync"):
            why = v["needs_resync"]
            problem = (problem + "; " if problem else "") + ("needs resync" if problem and problem in why
                                                             else f"needs resync: {why}")
        if v.get("fenced"):
            st = f"FENCED (read-only; epoch {v.get('epoch')}): another machine is the primary"
            problem = (problem + "; " if problem else "") + v["fenced"]
        elif v.get("failsafe"):
            st = "FAILSAFE (read-only)"
        elif v.get("blocked_changes"):
            st = f"BLOCKED: journal full, {v['blocked_changes']} change(s) waiting for the targets"
        elif v.get("journal_full"):
            st = "journal full"
        else:
            st = "ok" if v["daemon"] == "running" else "daemon not running"
        table.add_row(
            str(v.get("vault") or "?"), v["mountpoint"], st, str(v.get("forwarding", "-")),
            str(j.get("last_seq", "-")), str(j.get("durable_seq", "-")),
            f"{j.get('bytes', 0):,} B in {j.get('segments', 0)} seg" if j else "-",
            problem,
        )
    console.print(table)
    targets = [(v, t) for v in vaults for t in v.get("targets") or []]
    if targets:
        tt = Table(title="targets", title_justify="left")
        for col in ("vault", "target", "address", "link", "mode", "state", "acked seq", "pending ops", "lag s", "sent",
                    "last error"):
            tt.add_column(col, justify="right" if col in ("acked seq", "pending ops", "lag s", "sent") else "left",
                          overflow="fold")
        for v, t in targets:
            mode = t["mode"] if t.get("sync_state") != "degraded" else "sync, DEGRADED to async"
            tt.add_row(str(v.get("vault")), t["name"], t["address"], _link(t), mode, t["state"], str(t["acked_seq"]),
                       str(t["pending_ops"]), f"{t['lag_s']:.1f}", f"{t['bytes_sent']:,} B",
                       t.get("degraded_reason") or t.get("last_error") or "")
        console.print(tt)
    return 0
