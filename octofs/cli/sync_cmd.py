"""cli/sync_cmd.py: `octofs sync [VAULT] [--target NAME] [--verify-only]`: Synchronize or verify the targets."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from octofs import paths
from octofs.cli.common import add_command
from octofs.cli.status_cmd import find_vault
from octofs.control import request
from octofs.errors import DaemonError, DifferencesFoundError, WaitTimeoutError

POLL_S = 0.2


def add_parser(sub) -> None:
    p = add_command(sub, "sync", "Synchronize the targets with the primary, sending only what differs "
                    "(or, with --verify-only, report the differences).", run)
    p.add_argument("vault", nargs="?", help="vault name or mountpoint (default: the only mounted vault)")
    p.add_argument("--target", metavar="NAME", help="only this target (default: every target of the vault)")
    p.add_argument("--verify-only", action="store_true",
                   help="compare and list every difference; change nothing; exit 3 if there is any")
    p.add_argument("--no-wait", action="store_true", help="start it and return (see `octofs status`)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up waiting after S seconds")
    p.add_argument("--json", action="store_true", help="print the final state of each job as JSON")


def _job_of(status: dict, target: str, job_id: str) -> dict | None:
    for t in status.get("targets", []):
        if t["name"] == target:
            job = t.get("synchronize")
            if job is not None and job.get("id") == job_id:
                return job
    return None


def _describe(job: dict) -> str:
    return (f"{job.get('files', 0)} files, {_size(job.get('bytes_compared', 0))} compared, "
            f"{_size(job.get('repair_bytes', 0))} sent")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    state_dir, name = find_vault(args.vault)
    sock = paths.control_socket_path(state_dir)
    fields = {"verify": args.verify_only}
    if args.target:
        fields["target"] = args.target
    reply = request(sock, "sync", **fields)
    if not reply.get("ok"):
        raise DaemonError(reason=reply.get("error", "the daemon refused"))
    jobs = {j["target"]: j["id"] for j in reply["jobs"]}
    word = "verify" if args.verify_only else "Synchronize"
    if args.no_wait:
        if args.json:
            print(json.dumps({"vault": name, "jobs": reply["jobs"]}))
        elif not args.quiet:
            for target, job_id in jobs.items():
                print(f"octofs: {word} {job_id[:8]} of target {target} started (see `octofs status`)")
        return 0

    finals = _wait(sock, jobs, args, show=not args.quiet and not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps({"vault": name, "jobs": finals}))
    total_differences = 0
    for target, job in finals.items():
        total_differences += job.get("differences", 0)
        if args.json or args.quiet:
            continue
        if args.verify_only:
            for line in job.get("lines", []):
                print(f"{target}: {line}")
            shown = len(job.get("lines", []))
            if job.get("differences", 0) > shown:
                print(f"{target}: ... and {job['differences'] - shown} more")
            for line in job.get("unverified_lines", []):
                print(f"{target}: {line}")
            verdict = "identical" if not job.get("differences") else f"{job['differences']} difference(s)"
            if job.get("unverified"):
                verdict += f", {job['unverified']} path(s) changing throughout, not verified"
            print(f"octofs: target {target}: {verdict} ({_describe(job)} in {job['elapsed_s']:.2f} s)")
        else:
            print(f"octofs: target {target}: Synchronize done in {job['elapsed_s']:.2f} s: "
                  f"{job.get('differences', 0)} difference(s) repaired; {_describe(job)}")
    if args.verify_only and total_differences:
        raise DifferencesFoundError(count=total_differences)
    return 0


def _wait(sock, jobs: dict[str, str], args: argparse.Namespace, *, show: bool) -> dict[str, dict]:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    finals: dict[str, dict] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True, disable=not show)
    with progress:
        tasks = {t: progress.add_task(f"{t}", total=None, detail="starting") for t in jobs}
        while len(finals) < len(jobs):
            status = request(sock, "status")
            for target, job_id in jobs.items():
                if target in finals:
                    continue
                job = _job_of(status, target, job_id)
                if job is None:
                    # A reset or a newer job replaced it (the target reconnected needing more): follow that one.
                    t = next((t for t in status.get("targets", []) if t["name"] == target), None)
                    newer = (t or {}).get("synchronize")
                    if newer is not None and newer.get("kind") == ("verify" if args.verify_only else "sync"):
                        jobs[target] = job_id = newer["id"]
                        job = newer
                if job is None:
                    continue
                rate = job.get("rate_bps") or 0
                progress.update(tasks[target], total=max(job.get("bytes_known", 0), 1),
                                completed=job.get("bytes_compared", 0),
                                detail=f"{job.get('files', 0)} files, {_size(job.get('repair_bytes', 0))} sent, "
                                       f"{_size(rate)}/s")
                if job.get("state") == "done":
                    finals[target] = job
            if len(finals) < len(jobs):
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeoutError(timeout_s=args.timeout, what="the Synchronize to finish")
                time.sleep(POLL_S)
    return finals
