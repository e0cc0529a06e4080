"""cli/discover_cmd.py: `octofs discover [--timeout S] [--json]`: the `octofs serve` instances on the LAN."""

from __future__ import annotations

import argparse
import json
import sys

from octofs.cli.common import add_command
from octofs.errors import UsageError


def add_parser(sub) -> None:
    p = add_command(sub, "discover", "List the `octofs serve` targets that answer on the local network.", run)
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="how long to wait for answers (default 2)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (docs/CLI_JSON.md)")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 600:
        raise UsageError(detail=f"--timeout: expected seconds from 0 to 600, got {args.timeout:g}")
    from octofs import beacon

    found = beacon.discover(args.timeout)
    targets = [{
        "name": f.answer.name,
        "address": f.address,
        "source": f.source,
        "version": f.answer.version,
        "protocols": list(f.answer.protocols),
        "fingerprint": f.answer.fingerprint,
    } for f in found]
    if args.json:
        print(json.dumps({"targets": targets}, indent=2))
        return 0
    if not targets:
        print(f"no octofs serve answered within {args.timeout:g} s")
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="octofs targets on the local network", title_justify="left")
    for col in ("name", "address", "version", "protocols", "fingerprint"):
        table.add_column(col, overflow="fold")
    for t in targets:
        table.add_row(t["name"], t["address"], t["version"], ",".join(map(str, t["protocols"])), t["fingerprint"])
    console.print(table)
    return 0
