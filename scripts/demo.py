"""The octofs demo: a primary and a target on one machine, a live workload, status, and a verified copy.

Everything runs through the `octofs` CLI, as a user would run it. Network traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from octofs.tree import diff_snapshots, tree_snapshot

console = Console()


def octofs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "octofs", *args], text=True, capture_output=True)
    if check and proc.returncode != 0:
        console.print(f"[red]octofs {' '.join(args)} failed ({proc.returncode}):[/red]\n{proc.stderr}")
        raise SystemExit(1)
    return proc


def wait_for_file(path: Path, proc: subprocess.Popen, what: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready after {timeout_s} s")
        time.sleep(0.05)
    return json.loads(path.read_text())


def workload(mnt: Path, transactions: int) -> int:
    """A shop database (SQLite, WAL) and a web tree being published, side by side."""
    rng = random.Random(7)
    db = sqlite3.connect(mnt / "shop.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total_cents INTEGER, note TEXT)")
    www = mnt / "www"
    www.mkdir()
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("workload: orders committed + pages published", total=transactions)
        for i in range(transactions):
            db.execute("INSERT INTO orders (customer, total_cents, note) VALUES (?, ?, ?)",
                       (f"customer-{rng.randrange(500)}", rng.randrange(100, 100000), "x" * rng.randrange(200)))
            if i % 10 == 0:
                db.execute("UPDATE orders SET total_cents = total_cents + 1 WHERE id % 7 = ?", (i % 7,))
            db.commit()
            if i % 25 == 0:  # publish a page the safe way: write a temp file, fsync, rename over
                page = www / f"page{i // 25 % 8}.html"
                tmp = www / f".{page.name}.tmp"
                tmp.write_text(f"<h1>Orders so far: {i + 1}</h1>\n" + "<p>lorem ipsum</p>\n" * rng.randrange(50))
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                tmp.rename(page)
            progress.advance(task)
    (www / "index.html").symlink_to("page0.html")
    os.link(www / "page1.html", www / "latest.html")
    os.setxattr(www / "page1.html", b"user.cache-control", b"max-age=60")
    db.close()
    return transactions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--transactions", type=int, default=600)
    ap.add_argument("--workdir", type=Path, help="where to put everything (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="leave the workdir (and nothing running) behind")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="octofs-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    backing, target_root, mnt, state = work / "backing", work / "target", work / "mnt", work / "state"
    for d in (backing, target_root, mnt):
        d.mkdir(exist_ok=True)
    secret = work / "secret"
    secret.write_text(os.urandom(16).hex() + "\n")
    secret.chmod(0o600)
    console.rule("[bold]octofs demo")
    console.print(f"workdir {work}")

    ready = work / "serve-ready.json"
    serve_log = open(work / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "octofs", "serve", "--root", str(target_root),
                              "--listen", "127.0.0.1:0", "--secret-file", str(secret), "--ready-file", str(ready)],
                             stdout=serve_log, stderr=serve_log)
    mounted = False
    ok = False
    try:
        listen = wait_for_file(ready, serve, "octofs serve")["listen"]
        console.print(f"1. target: [bold]octofs serve[/bold] listening on {listen} (root {target_root})")
        vault_yaml = work / "vault.yaml"
        vault_yaml.write_text(
            "vault: shop\n"
            f"backing: {backing}\n"
            f"state_dir: {state}\n"
            f"secret_file: {secret}\n"
            "exclude: ['*.tmp']\n"
            "targets:\n"
            f"  - name: local\n    address: '{listen}'\n    mode: async\n"
        )
        octofs("mount", str(vault_yaml), str(mnt))
        mounted = True
        console.print(f"2. primary: vault [bold]shop[/bold] mounted on {mnt} (backing {backing})")
        console.print("3. an application writes through the mount:")
        n = workload(mnt, args.transactions)
        console.print("4. [bold]octofs status --wait-synced[/bold]: wait until the target has acked every op")
        t0 = time.monotonic()
        octofs("status", "--wait-synced", "--timeout", "120", str(mnt))  # this vault only, not every mount
        console.print(f"   synced {time.monotonic() - t0:.2f} s after the workload ended")
        console.print("5. [bold]octofs status[/bold]")
        sys.stdout.flush()
        subprocess.run([sys.executable, "-m", "octofs", "status", str(mnt)], check=True)  # straight to the terminal
        console.print(f"   and on the target: [bold]octofs status --root {target_root}[/bold]")
        sys.stdout.flush()
        subprocess.run([sys.executable, "-m", "octofs", "status", "--root", str(target_root)], check=True)
        console.print("6. [bold]octofs sync --verify-only[/bold]: the target compares its copy block by block")
        sys.stdout.flush()
        if subprocess.run([sys.executable, "-m", "octofs", "sync", "--verify-only", str(mnt)]).returncode != 0:
            console.print("[red]octofs found differences[/red]")
            return 1
        console.print("   and independently: the target's copy against the primary's backing dir, byte for byte")
        replica = target_root / "shop"
        a, b = tree_snapshot(backing, mtime=True), tree_snapshot(replica, mtime=True)
        diff = diff_snapshots(a, b)
        if diff:
            console.print("[red]the copies differ:[/red]\n" + "\n".join(diff))
            return 1
        con = sqlite3.connect(f"file:{replica / 'shop.db'}?mode=ro", uri=True)
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        orders = con.execute("SELECT count(*) FROM orders").fetchone()[0]
        con.close()
        size = sum(e.size for e in a.values() if e.kind == "file")
        console.print(f"   [green]identical[/green]: {len(a)} entries, {size:,} bytes (content, type, mode, size, "
                      "mtime, symlinks, hard links, xattrs)")
        console.print(f"   the target's shop.db opens: integrity_check={integrity}, {orders} orders (expected {n})")
        ok = integrity == "ok" and orders == n
        return 0 if ok else 1
    finally:
        if mounted:
            octofs("umount", str(mnt), check=False)
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
        serve_log.close()
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            console.print(f"left {work} behind for inspection")


if __name__ == "__main__":
    sys.exit(main())
