"""cli/freeze_cmd.py: `octofs freeze VAULT [--exec CMD]` and `octofs thaw VAULT`, on a target.

Both talk to the `octofs serve` daemon of ``--root`` over its control socket (commands ``freeze`` and
``thaw``; octofs/freeze.py). A frozen vault's replica dir is a state the primary had, made durable; ops keep
arriving and wait (in the primary's journal) until the thaw.

``--exec CMD`` runs CMD through the shell against the frozen copy, with ``OCTOFS_VAULT``, ``OCTOFS_COPY``
(the replica dir), ``OCTOFS_SEQ`` and ``OCTOFS_PRIMARY_TIME_NS`` in its environment and the caller's working
directory, then thaws and exits with CMD's exit code. If the freeze ended before CMD did (its maximum
duration, a takeover, a restart of `octofs serve`), a CMD that succeeded is reported as FreezeLostError
(exit 55): what it read may not be consistent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from octofs.cli.common import add_command
from octofs.control import request
from octofs.errors import DaemonError, FreezeError, FreezeLostError, UsageError

DEFAULT_MAX = "1h"


def add_parser(sub) -> None:
    p = add_command(sub, "freeze", "On a target: hold replay of VAULT at a batch boundary, so that a backup "
                    "reads a consistent copy (a state the primary had); --exec runs the backup and thaws.",
                    run)
    p.add_argument("vault", metavar="VAULT", help="the vault's name (its replica dir is ROOT/VAULT)")
    add_root(p)
    p.add_argument("--max", default=DEFAULT_MAX, metavar="DURATION",
                   help=f"thaw by itself after this long (default {DEFAULT_MAX}; e.g. 90s, 30m, 2h)")
    p.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                   help="run CMD (through the shell) against the frozen copy, then thaw; exit with CMD's exit code. "
                        "Environment: OCTOFS_VAULT, OCTOFS_COPY (the replica dir), OCTOFS_SEQ, OCTOFS_PRIMARY_TIME_NS")
    p.add_argument("--json", action="store_true", help="print the freeze (and the thaw) as JSON (docs/CLI_JSON.md)")

    t = add_command(sub, "thaw", "On a target: resume replay of a frozen VAULT; it catches up with what the "
                    "primary held meanwhile.", run_thaw)
    t.add_argument("vault", metavar="VAULT", help="the vault's name")
    add_root(t)
    t.add_argument("--json", action="store_true", help="print the reply as JSON (docs/CLI_JSON.md)")


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="DIR", default=os.environ.get("OCTOFS_ROOT"),
                   help="the target root of `octofs serve --root DIR` (default: $OCTOFS_ROOT)")


def control(args: argparse.Namespace, cmd: str, **fields: Any) -> dict[str, Any]:
    """One control request to the serve daemon of ``args.root``; ``ok: false`` raises FreezeError."""
    from octofs.replica import control_socket_path

    if not args.root:
        raise UsageError(detail=f"octofs {args.command}: give --root DIR (the root of `octofs serve`) or set "
                                "OCTOFS_ROOT")
    reply = request(control_socket_path(Path(os.path.abspath(args.root))), cmd, io_timeout_s=120, **fields)
    if not reply.pop("ok", False):
        error = reply.get("error", "the daemon refused")
        if error.startswith("unknown command"):
            raise DaemonError(reason=f"the octofs serve on {args.root} does not know `{cmd}` (an older version?)")
        raise FreezeError(vault=fields.get("vault", "?"), reason=error)
    return reply


def parse_max(text: str) -> float:
    from octofs.config import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(detail=f"--max: {exc}") from None
    if seconds <= 0:
        raise UsageError(detail=f"--max: the maximum duration must be more than 0, got {text!r}")
    return seconds


def iso(unix_s: float | None) -> str:
    if unix_s is None:
        return "unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_s)) + f".{int(unix_s * 1000) % 1000:03d}Z"


def primary_time(info: dict[str, Any]) -> str:
    ns = info.get("primary_time_ns")
    return "unknown" if ns is None else iso(ns / 1e9)


def run(args: argparse.Namespace) -> int:
    max_s = parse_max(args.max)
    if args.exec_cmd is not None:
        return run_exec(args, max_s)
    info = control(args, "freeze", vault=args.vault, max_s=max_s)
    if args.json:
        print(json.dumps(info))
    elif not args.quiet:
        print(f"octofs: vault {args.vault} frozen at seq {info['seq']} (primary time {primary_time(info)}); "
              f"{info['replica_dir']} stays as it is until `octofs thaw {args.vault}` or {iso(info['until'])}")
    return 0


def run_exec(args: argparse.Namespace, max_s: float) -> int:
    # SIGTERM (a scheduler stopping the backup) as an exception: CMD is then killed, and the thaw below
    # still runs; otherwise the vault would stay frozen until --max.
    # SIGTERM is held off from before the freeze is asked for until CMD has started: arriving in between,
    # it would end the CLI with the vault frozen, or (inside Popen) leave CMD running, holding our stdout
    # and stderr, with no one to kill it. CMD itself starts with it unblocked.
    previous = signal.signal(signal.SIGTERM, _terminated)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        info = control(args, "freeze", vault=args.vault, max_s=max_s)
    except BaseException:  # nothing is frozen: a SIGTERM held meanwhile now ends the CLI as it would have
        signal.signal(signal.SIGTERM, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        raise
    started = time.monotonic()
    rc: int | None = None
    child: subprocess.Popen | None = None
    try:
        try:
            env = {**os.environ, "OCTOFS_VAULT": args.vault, "OCTOFS_COPY": info["replica_dir"],
                   "OCTOFS_SEQ": str(info["seq"]), "OCTOFS_PRIMARY_TIME_NS":
                   "" if info.get("primary_time_ns") is None else str(info["primary_time_ns"])}
            if not args.quiet and not args.json:
                print(f"octofs: vault {args.vault} frozen at seq {info['seq']} (primary time "
                      f"{primary_time(info)}); running: {args.exec_cmd}", file=sys.stderr)
            child = subprocess.Popen(args.exec_cmd, shell=True, env=env, preexec_fn=_unblock_sigterm)  # noqa: PLW1509 (single-threaded CLI)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending one is raised here
        rc = child.wait()
    except _Terminated:
        rc = -signal.SIGTERM
        if child is not None:
            child.kill()
            child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Thaw whatever happened to CMD (an interrupt included); only this freeze.
        reply = control(args, "thaw", vault=args.vault, id=info["id"])
    elapsed = time.monotonic() - started
    code = rc if rc >= 0 else 128 + (-rc)  # killed by a signal: the shell's convention
    if args.json:
        print(json.dumps({"freeze": info, "thaw": reply, "exit_code": code, "elapsed_s": round(elapsed, 3)}))
    if reply.get("status") != "thawed":
        last = reply.get("last_freeze") or {}
        how = last.get("how") if last.get("id") == info["id"] else None
        how = {"expired": f"its maximum duration of {info['max_s']:g} s passed"}.get(how or "", how) or \
            "it was no longer in force (a takeover, or `octofs serve` restarted)"
        if code != 0:
            print(f"octofs: warning: the freeze of vault {args.vault} ended before the command did ({how})",
                  file=sys.stderr)
            return code
        raise FreezeLostError(vault=args.vault, what=f"the command {args.exec_cmd!r}", how=how)
    if not args.quiet and not args.json:
        outcome = "succeeded" if code == 0 else f"failed (exit {code}{_signal_name(rc)})"
        print(f"octofs: the command {outcome} in {elapsed:.1f} s; vault {args.vault} thawed", file=sys.stderr)
    return code


class _Terminated(Exception):
    pass


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _terminated(signum, frame) -> None:
    raise _Terminated()


def _signal_name(rc: int) -> str:
    if rc >= 0:
        return ""
    try:
        return f", {signal.Signals(-rc).name}"
    except ValueError:
        return ""


def run_thaw(args: argparse.Namespace) -> int:
    reply = control(args, "thaw", vault=args.vault)
    if args.json:
        print(json.dumps(reply))
        return 0
    if args.quiet:
        return 0
    last = reply.get("last_freeze") or {}
    if reply["status"] == "thawed":
        print(f"octofs: vault {args.vault} thawed after {last.get('duration_s', 0):.1f} s frozen at seq "
              f"{last.get('seq')}; it catches up now")
    else:
        said = f"vault {args.vault} was not frozen"
        if last:
            said += f" (the last freeze, at seq {last.get('seq')}, ended {iso(last.get('ended'))}: {last.get('how')})"
        print(f"octofs: {said}")
    return 0


def freeze_lines(doc: dict[str, Any]) -> list[str]:
    """Lines for `octofs status --root`: each frozen vault, and each whose last freeze expired."""
    lines = []
    for v in doc.get("vaults", []):
        fz = v.get("frozen")
        if fz:
            backlog = "unknown" if fz.get("backlog_ops") is None else f"{fz['backlog_ops']} op(s)"
            lines.append(
                f"vault {v['vault']}: FROZEN at seq {fz['seq']} (primary time {primary_time(fz)}) since "
                f"{iso(fz['since'])}, until {iso(fz['until'])} at the latest (max {fz['max_s']:g} s); backlog "
                f"{backlog} (primary's last seq {fz.get('primary_last_seq')}), {fz['held_frames']} frame(s) "
                f"= {fz['held_bytes']} bytes held here" + ("" if fz.get("reading") else ", not reading (budget full)"))
        last = v.get("last_freeze")
        if last and last.get("how") == "expired" and not fz:
            lines.append(f"vault {v['vault']}: the freeze at seq {last['seq']} outlived its maximum duration of "
                         f"{last['max_s']:g} s and thawed by itself at {iso(last['ended'])}")
    return lines
