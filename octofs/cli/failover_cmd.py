"""cli/failover_cmd.py: `octofs failover [VAULT]`, the planned switch of a healthy pair (docs/FORMAT.md §11.4)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from octofs.cli.common import add_command
from octofs.control import request
from octofs.errors import DaemonError, UsageError


def add_parser(sub) -> None:
    p = add_command(sub, "failover", "Planned switch: drain this primary, hand the vault over to a target, "
                    "and (with --become-target) receive it back as a target.", run)
    p.add_argument("vault", nargs="?", metavar="VAULT", help="vault name or mountpoint (default: the only mounted one)")
    p.add_argument("--target", metavar="NAME", help="the target to hand over to (default: the only one)")
    p.add_argument("--to", metavar="HOST:PORT",
                   help="the target's health responder (SERVE.yaml health:; default its host, port 7071)")
    p.add_argument("--become-target", metavar="ROOT",
                   help="afterwards, this machine's `octofs serve --root ROOT` receives the vault from the new "
                        "primary (the backing dir must be ROOT/VAULT); the mount is unmounted")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="how long to wait for the drain")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")


def run(args: argparse.Namespace) -> int:
    from octofs import paths
    from octofs.cli.status_cmd import find_vault
    from octofs.config import _parse_address  # the one address parser

    to = None
    if args.to:
        try:
            to = list(_parse_address(args.to, listen=False))
        except ValueError as exc:
            raise UsageError(detail=f"--to: {exc}") from None
        if ":" not in args.to.rpartition("]")[2]:
            to[1] = 7071
    root = os.path.abspath(args.become_target) if args.become_target else None
    state_dir, vault = find_vault(args.vault)
    status = request(paths.control_socket_path(state_dir), "status", io_timeout_s=10)
    reply = request(paths.control_socket_path(state_dir), "failover", io_timeout_s=args.timeout * 2 + 30,
                    target=args.target, to=to, timeout_s=args.timeout, become_target=root)
    if not reply.get("ok"):
        raise DaemonError(reason=reply.get("error", "the daemon refused"))
    if args.json:
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}))
    if not reply.get("accepted"):
        state = "it stays fenced (read-only)" if reply.get("fenced") else "it is still the primary"
        raise DaemonError(reason=f"vault {vault}: the failover did not happen: {reply.get('reason')}; {state}")
    if not args.json and not args.quiet:
        print(f"octofs: vault {vault} handed over to target {reply['target']} at seq {reply['seq']}: it is the "
              f"primary at epoch {reply['epoch']} now; this mount is read-only (fenced)")
    if root is not None:
        from octofs.cli import umount_cmd

        mountpoint = status["mountpoint"]
        umount_cmd.run(argparse.Namespace(mountpoint=mountpoint, lazy=False, quiet=True))
        if not args.json and not args.quiet:
            print(f"octofs: {mountpoint} unmounted; `octofs serve --root {root}` receives vault {vault} "
                  f"(its replica dir {Path(root) / vault}) from the new primary")
    return 0
