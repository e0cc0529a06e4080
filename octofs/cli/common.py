"""cli/common.py: owns the options shared by every command, logging setup and error reporting."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback

from octofs.errors import OctofsError


def common_parser(*, suppress_defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command (borg-style).

    The copy attached to each subcommand has SUPPRESS defaults, so a value given
    before the command is not overwritten by the subcommand's default.
    """
    d = (lambda v: argparse.SUPPRESS) if suppress_defaults else (lambda v: v)
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("-v", "--verbose", action="count", default=d(0), help="more log output (repeatable)")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="errors only")
    g.add_argument("--debug", action="store_true", default=d(False), help="debug logging and tracebacks")
    g.add_argument(
        "--debug-module", action="append", default=d([]), metavar="NAME",
        help="debug logging for one module (octofs.NAME), repeatable; 'all' for everything",
    )
    g.add_argument("--log-format", choices=("text", "json"), default=d("text"), help="log line format")
    return p


def add_command(sub, name: str, help_text: str, run) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, parents=[common_parser(suppress_defaults=True)])
    p.set_defaults(func=run)
    return p


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        })


def setup_logging(args: argparse.Namespace, *, default_level: int = logging.WARNING, stream=None,
                  log_file: str | None = None) -> None:
    """Configure the root logger from the common options."""
    if getattr(args, "debug", False):
        level = logging.DEBUG
    elif getattr(args, "quiet", False):
        level = logging.ERROR
    else:
        level = max(logging.DEBUG, default_level - 10 * getattr(args, "verbose", 0))
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(stream or sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in getattr(args, "debug_module", []) or []:
        logging.getLogger("octofs" if name == "all" else f"octofs.{name}").setLevel(logging.DEBUG)
        if level > logging.DEBUG:
            root.setLevel(logging.DEBUG)
            handler.addFilter(_ModuleFilter(level, args.debug_module))


class _ModuleFilter(logging.Filter):
    """Lets DEBUG through only for the modules named with --debug-module."""

    def __init__(self, level: int, modules: list[str]) -> None:
        super().__init__()
        self.level = level
        self.prefixes = tuple("octofs" if m == "all" else f"octofs.{m}" for m in modules)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.name.startswith(self.prefixes)


def report_error(exc: BaseException, args: argparse.Namespace | None = None) -> int:
    """Print one line (and a hint) for an OctofsError; a traceback only for bugs or --debug."""
    debug = bool(args is not None and getattr(args, "debug", False))
    if isinstance(exc, OctofsError) and exc.exit_code != 1:
        print(f"octofs: error: {exc.message}", file=sys.stderr)
        if exc.hint_text:
            print(f"octofs: hint: {exc.hint_text}", file=sys.stderr)
        if debug:
            traceback.print_exception(exc)
        return exc.exit_code
    if isinstance(exc, SystemExit):
        raise exc
    traceback.print_exception(exc)
    print(f"octofs: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1
