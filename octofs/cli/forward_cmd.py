"""cli/forward_cmd.py: `octofs forward on|off [VAULT]`."""

from __future__ import annotations

import argparse
import json

from octofs import paths
from octofs.cli.common import add_command
from octofs.cli.status_cmd import find_vault
from octofs.control import request
from octofs.errors import DaemonError, UsageError


def add_parser(sub) -> None:
    p = add_command(sub, "forward", "Turn forwarding to the targets on or off (saved across remounts).", run)
    # One list, not two positionals: argparse would consume an optional VAULT as empty
    # when an option stands between the two (`forward off --json /mnt/x`).
    p.add_argument("words", nargs="+", metavar="on|off [VAULT]",
                   help="on or off, then the vault name or mountpoint (default: the only mounted vault)")
    p.add_argument("--json", action="store_true", help='print {"vault": ..., "status": ...}')
    p.set_defaults(extra_words="words")


def run(args: argparse.Namespace) -> int:
    if args.words[0] not in ("on", "off") or len(args.words) > 2:
        raise UsageError(detail="usage: octofs forward on|off [VAULT]")
    state_dir, name = find_vault(args.words[1] if len(args.words) == 2 else None)
    reply = request(paths.control_socket_path(state_dir), "forward", on=args.words[0] == "on")
    if not reply.get("ok"):
        raise DaemonError(reason=reply.get("error", "the daemon refused"))
    if args.json:
        print(json.dumps({"vault": name, "status": reply["status"]}))
    elif not args.quiet:
        word = reply["status"].replace("already_", "already ")
        print(f"octofs: forwarding for vault {name} is {word}")
    return 0
