"""cli/snapshot_cmd.py: `octofs snapshot VAULT DEST`: a consistent copy of a target's replica dir.

Freeze (octofs/freeze.py), copy ``ROOT/VAULT`` to ``DEST`` with ``cp -a --reflink=auto`` (a reflink copy —
btrfs, XFS with reflink, bcachefs — takes no data blocks and little time; elsewhere it is a full copy taken
while frozen), thaw. DEST holds exactly the vault's files; the seq and the primary's time it corresponds to
are printed (``--json``: one JSON document, docs/CLI_JSON.md), not written into DEST.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from octofs.cli.common import add_command
from octofs.cli.freeze_cmd import add_root, control, parse_max, primary_time
from octofs.errors import FreezeLostError, SnapshotError, UsageError

DEFAULT_MAX = "1h"


def add_parser(sub) -> None:
    p = add_command(sub, "snapshot", "On a target: copy VAULT's replica dir to DEST as it was at one seq "
                    "(frozen for the copy; reflinks where the filesystem has them).", run)
    p.add_argument("vault", metavar="VAULT", help="the vault's name (its replica dir is ROOT/VAULT)")
    p.add_argument("dest", metavar="DEST", help="where the copy goes; must not exist (its parent must)")
    add_root(p)
    p.add_argument("--max", default=DEFAULT_MAX, metavar="DURATION",
                   help=f"give up (thaw) if the copy takes longer than this (default {DEFAULT_MAX})")
    p.add_argument("--json", action="store_true", help="print the result as JSON (docs/CLI_JSON.md)")


def run(args: argparse.Namespace) -> int:
    max_s = parse_max(args.max)
    dest = Path(os.path.abspath(args.dest))
    if dest.exists() or dest.is_symlink():
        raise UsageError(detail=f"{dest} already exists; octofs snapshot creates DEST itself")
    if not dest.parent.is_dir():
        raise UsageError(detail=f"{dest.parent} is not a directory")
    cp = shutil.which("cp")
    if cp is None:
        raise SnapshotError(vault=args.vault, dest=str(dest), reason="no `cp` on PATH")
    info = control(args, "freeze", vault=args.vault, max_s=max_s)
    t0 = time.monotonic()
    try:
        # -a: links, modes, owners, times, xattrs, hard links; -T: DEST is the copy itself, not a folder for it.
        proc = subprocess.run([cp, "-a", "--reflink=auto", "-T", "--", info["replica_dir"], str(dest)],
                              capture_output=True, text=True, check=False)
    finally:
        reply = control(args, "thaw", vault=args.vault, id=info["id"])
    frozen_s = time.monotonic() - t0
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"cp exited with {proc.returncode}"])[-1]
        raise SnapshotError(vault=args.vault, dest=str(dest), reason=f"{detail} (the partial copy is left in place)")
    if reply.get("status") != "thawed":
        raise FreezeLostError(vault=args.vault, what=f"the copy into {dest}",
                              how=(reply.get("last_freeze") or {}).get("how") or "it was no longer in force")
    result = {"vault": args.vault, "dest": str(dest), "seq": info["seq"], "primary_time_ns": info.get("primary_time_ns"),
              "frozen_s": round(frozen_s, 3), "replica_dir": info["replica_dir"]}
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        print(f"octofs: snapshot of vault {args.vault} at seq {info['seq']} (primary time {primary_time(info)}) "
              f"in {dest}; replay was held for {frozen_s:.2f} s")
    return 0
