"""A primary and a target in two network namespaces (tests/support/netns.py), with the tools of a WAN test.

- ``primary_mount(host, vault_yaml, mnt)``: `octofs mount` whose sockets live in ``host``'s namespace
  (``nsenter --net``: the FUSE mount stays in the test's mount namespace, so the test reads and writes it).
- ``serve_in(host, workdir, name, serve_yaml)``: `octofs serve` in ``host``'s namespace from a SERVE.yaml dict.
- ``capture(host, port)``: tcpdump on ``host``'s eth0 into a pcap file; the bytes once stopped.
- ``shape_rate(host, rate)``: ``tc tbf`` on ``host``'s eth0 egress. ``drop_randomly(host, percent)``:
  nftables drops that share of ``host``'s outgoing packets at random. ``delay_proxy(...)``: a TCP relay in
  a namespace that holds every chunk for a fixed time in each direction. This kernel has no ``sch_netem``
  (CONFIG_NET_SCH_NETEM is not set), so delay and loss are made with these two instead of ``tc netem``.

Every process is started by the helper and stopped (SIGTERM, then SIGKILL) on the way out; every
qdisc and table lives in the test's namespaces and goes with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.support.daemons import REPO, MountHandle, octofs_cmd, run_octofs, wait_until
from tests.support.fuse import is_octofs_mounted, unmount, wait_for_ready
from tests.support.netns import Host


def netns_cmd(host: Host, *argv: str) -> list[str]:
    """``argv`` in ``host``'s network namespace only (same mount namespace as the test)."""
    return ["nsenter", f"--net=/run/netns/{host.ns}", *argv]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@contextlib.contextmanager
def primary_mount(host: Host, vault_yaml: Path, mnt: Path) -> Iterator[MountHandle]:
    doc = yaml.safe_load(vault_yaml.read_text())
    mnt.mkdir(exist_ok=True)
    log_path = vault_yaml.parent / f"mount-{mnt.name}.log"
    ready = vault_yaml.parent / f"ready-{mnt.name}.json"
    ready.unlink(missing_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(netns_cmd(host, *octofs_cmd("-v", "mount", "--foreground", "--ready-file",
                                                            str(ready), str(vault_yaml), str(mnt))),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env())
    try:
        wait_for_ready(proc, ready, mnt, 30, log_path)
        yield MountHandle(proc, mnt, Path(doc["backing"]), Path(doc["state_dir"]), log_path)
    finally:
        unmount(proc, mnt)
        if is_octofs_mounted(mnt):
            run_octofs("umount", str(mnt))


@contextlib.contextmanager
def serve_in(host: Host, workdir: Path, name: str, serve_yaml: dict) -> Iterator[subprocess.Popen]:
    Path(serve_yaml["root"]).mkdir(exist_ok=True)
    path = workdir / f"serve-{name}.yaml"
    path.write_text(json.dumps(serve_yaml))
    ready = workdir / f"ready-{name}.json"
    log_path = workdir / f"serve-{name}.log"
    ready.unlink(missing_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(netns_cmd(host, *octofs_cmd("-v", "serve", str(path), "--ready-file", str(ready))),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env(), cwd="/")
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout=30, what=f"serve {name} ready")
        assert proc.poll() is None, f"serve {name} exited:\n{log_path.read_text()[-3000:]}"
        yield proc
    finally:
        _stop(proc)


class Capture:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = b""


@contextlib.contextmanager
def capture(host: Host, port: int, path: Path) -> Iterator[Capture]:
    """tcpdump of TCP port ``port`` on ``host``'s eth0 (full packets) into ``path``; ``.data`` once stopped."""
    err_path = path.with_suffix(".err")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(netns_cmd(host, "tcpdump", "-i", "eth0", "-s", "0", "-U", "--immediate-mode", "-n", "-w", str(path),
                                          "tcp", "port", str(port)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    cap = Capture(path)
    try:
        # tcpdump says "listening on eth0" once its socket is open.
        wait_until(lambda: b"listening on" in err_path.read_bytes() or proc.poll() is not None, timeout=30,
                   what="tcpdump listening")
        assert proc.poll() is None, err_path.read_text()
        yield cap
    finally:
        _stop(proc, signal.SIGINT)  # SIGINT: tcpdump flushes the file and exits
        cap.data = path.read_bytes() if path.exists() else b""


def shape_rate(host: Host, rate: str) -> None:
    """``tc tbf`` on ``host``'s eth0 egress: at most ``rate`` (e.g. ``10mbit``)."""
    subprocess.run(["tc", "-n", host.ns, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                    "burst", "32kbit", "latency", "400ms"], check=True, capture_output=True, timeout=30)


def drop_randomly(host: Host, percent: int) -> None:
    """nftables in ``host``'s namespace drops ``percent`` % of its outgoing packets on eth0, at random.

    GSO is turned off on eth0 first, so a "packet" is one MTU-sized segment as on a real wire
    (a veth otherwise passes 64 KiB super-packets, and 1 % of those would be a handful).
    """
    for setting in (("gso_max_size", "1500"), ("gso_max_segs", "1")):
        subprocess.run(["ip", "-n", host.ns, "link", "set", "eth0", *setting], check=True, capture_output=True,
                       timeout=30)
    rules = ("table inet octofs_loss {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
             f"  oifname \"eth0\" numgen random mod 100 < {percent} counter drop\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", host.ns, "nft", "-f", "-"], input=rules.encode(), check=True,
                   capture_output=True, timeout=30)


def dropped_packets(host: Host) -> int:
    """How many packets ``drop_randomly`` has dropped in ``host`` so far."""
    out = subprocess.run(["ip", "netns", "exec", host.ns, "nft", "list", "table", "inet", "octofs_loss"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return int(out.split("counter packets ")[1].split()[0])


DELAY_PROXY = r"""
import heapq, selectors, socket, sys, threading, time
listen_host, listen_port, up_host, up_port, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((listen_host, listen_port)); srv.listen(16)
print("ready", flush=True)
def pipe(a, b):
    # every chunk read from a is written to b `delay` seconds later, in order
    queue = []
    lock = threading.Condition()
    done = [False]
    def writer():
        while True:
            with lock:
                while not queue and not done[0]:
                    lock.wait()
                if not queue:
                    break
                due, data = queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with lock:
                queue.pop(0)
            try:
                b.sendall(data)
            except OSError:
                break
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    t = threading.Thread(target=writer, daemon=True); t.start()
    while True:
        try:
            data = a.recv(65536)
        except OSError:
            data = b""
        with lock:
            if not data:
                done[0] = True
            else:
                queue.append((time.monotonic() + delay, data))
            lock.notify()
        if not data:
            break
while True:
    c, _ = srv.accept()
    u = socket.create_connection((up_host, up_port))
    for s in (c, u):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
"""


@contextlib.contextmanager
def delay_proxy(host: Host, listen: tuple[str, int], upstream: tuple[str, int], delay_s: float) -> Iterator[None]:
    """A TCP relay in ``host``'s namespace: ``listen`` → ``upstream``, each direction delayed by ``delay_s``."""
    proc = subprocess.Popen(netns_cmd(host, sys.executable, "-c", DELAY_PROXY, listen[0], str(listen[1]),
                                      upstream[0], str(upstream[1]), str(delay_s)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"ready", line + proc.stdout.read()
        yield
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def sample(fn, *, until, interval: float = 0.1, timeout: float = 300) -> list[tuple[float, object]]:
    """(time, fn()) every ``interval`` s until ``until(value)`` is true; for rates measured from status."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        out.append((time.monotonic(), value))
        if until(value):
            return out
        assert time.monotonic() < deadline, f"timed out sampling; last {value!r}"
        time.sleep(interval)


def compressible(size: int, seed: int) -> bytes:
    """Log-like text: compresses about 5-10x with zstd level 1, like real logs or SQL dumps."""
    rng = random.Random(seed)
    words = [b"GET", b"POST", b"/api/v1/orders", b"/static/app.js", b"200", b"404", b"user=", b"session="]
    out = bytearray()
    n = 0
    while len(out) < size:
        n += 1
        out += b"2026-11-24T12:%02d:%02d.%06dZ host%d " % (n // 3600 % 60, n // 60 % 60, rng.randrange(10**6),
                                                         rng.randrange(8))
        out += b" ".join(rng.choice(words) for _ in range(6)) + b" %d\n" % rng.randrange(10**5)
    return bytes(out[:size])
