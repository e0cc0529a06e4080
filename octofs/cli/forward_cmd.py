"""cli/forward_cmd.py: `octofs forward on|off [VAULT]`."""

from __future__ import annotations

import argparse
import json

from octofs import paths
from octofs.cli.common import add_command
from octofs.cli.status_cmd import find_vault
from octofs.control import request
from octofs.errors import DaemonError


def add_parser(sub) -> None:
    p = add_command(sub, "forward", "Turn forwarding to the targets on or off (saved across remounts).", run)
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("vault", nargs="?", metavar="VAULT", help="vault name or mountpoint (default: the only mounted vault)")
    p.add_argument("--json", action="store_true", help='print {"status": ...}')


def run(args: argparse.Namespace) -> int:
    state_dir, name = find_vault(args.vault)
    reply = request(paths.control_socket_path(state_dir), "forward", on=args.state == "on")
    if not reply.get("ok"):
        raise DaemonError(reason=reply.get("error", "the daemon refused"))
    if args.json:
        print(json.dumps({"vault": name, "status": reply["status"]}))
    elif not args.quiet:
        word = reply["status"].replace("already_", "already ")
        print(f"octofs: forwarding for vault {name} is {word}")
    return 0
