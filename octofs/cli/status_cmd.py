"""cli/status_cmd.py: `octofs status [--json] [MOUNTPOINT ...]`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from octofs import paths, state
from octofs.cli.common import add_command
from octofs.control import request
from octofs.errors import DaemonNotRunningError, NotMountedError
from octofs.mounttab import FS_TYPE, find_mount, octofs_mounts


def add_parser(sub) -> None:
    p = add_command(sub, "status", "Show each mounted vault: journal, durability, targets, problems.", run)
    p.add_argument("mountpoints", nargs="*", metavar="MOUNTPOINT", help="default: every octofs mount")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (docs/CLI_JSON.md)")


def collect(mountpoints: list[str]) -> list[dict[str, Any]]:
    """One status document per vault, from its daemon or, if that is gone, from its state dir."""
    if mountpoints:
        entries = []
        for m in mountpoints:
            entry = find_mount(Path(os.path.abspath(m)))
            if entry is None or entry.fstype != FS_TYPE:
                raise NotMountedError(mountpoint=m)
            entries.append(entry)
    else:
        entries = octofs_mounts()
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
    vaults = collect(args.mountpoints)
    if args.json:
        print(json.dumps({"vaults": vaults}, indent=2))
        return 0
    if not vaults:
        print("no octofs vault is mounted")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="octofs vaults", title_justify="left")
    for col in ("vault", "mountpoint", "state", "last seq", "durable seq", "journal", "problem"):
        table.add_column(col, justify="right" if "seq" in col or col == "journal" else "left")
    for v in vaults:
        j = v.get("journal") or {}
        problem = v.get("error") or v.get("failure") or ""
        if v.get("needs_resync"):
            problem = (problem + "; " if problem else "") + f"needs resync: {v['needs_resync']}"
        st = "FAILSAFE (read-only)" if v.get("failsafe") else ("ok" if v["daemon"] == "running" else "daemon not running")
        table.add_row(
            str(v.get("vault") or "?"), v["mountpoint"], st,
            str(j.get("last_seq", "-")), str(j.get("durable_seq", "-")),
            f"{j.get('bytes', 0):,} B in {j.get('segments', 0)} seg" if j else "-",
            problem,
        )
    Console(width=160).print(table)
    return 0
