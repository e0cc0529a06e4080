"""cli: owns argument parsing, printing and exit codes; the only package that prints or exits.

``main(argv) -> int`` is callable from tests in-process. Every command module
exports ``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from octofs import __version__
from octofs.cli import common

# Command modules, in --help order. Each is imported lazily by name so that a
# command that needs pyfuse3 does not make `octofs status` depend on it.
COMMANDS = ("mount_cmd", "umount_cmd", "serve_cmd", "status_cmd", "sync_cmd", "failover_cmd", "failback_cmd", "forward_cmd", "check_cmd", "discover_cmd",
            "keygen_cmd", "freeze_cmd", "snapshot_cmd", "debug_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="octofs",
        description="Real-time, crash-consistent mirroring of a directory tree.",
        parents=[common.common_parser(suppress_defaults=False)],
    )
    parser.add_argument("--version", action="version", version=f"octofs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"octofs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"octofs.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # argparse does not intermix positionals with options (`forward off --json VAULT`):
        # a command that takes a list of words (``extra_words``) gets the stragglers.
        if getattr(args, "extra_words", None) and not any(e.startswith("-") for e in extras):
            getattr(args, args.extra_words).extend(extras)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    common.setup_logging(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("octofs: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - turned into one message and an exit code
        return common.report_error(exc, args)
